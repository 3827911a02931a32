//! A configuration file, loaded as every process loads it: laid over the
//! built-in defaults and validated (`Config::from_toml`, the path
//! `Config::load` takes for a file), then turned into the topology plan.
//!
//! Input: the file's text (files that are not UTF-8 are refused on reading).
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_core::topology::TopologyPlan;
use warren_core::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            config
                .validate()
                .expect("a loaded configuration validates again");
            let plan = TopologyPlan::from_config(&config);
            let _ = plan.render();
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.trim().is_empty(), "an empty error: {e:?}");
        }
    }
});
