//! A cron expression, read as configuration validation and the scheduler
//! read it (`config::parse_cron`), then its fire times searched as the
//! scheduler searches them, in a time zone.
//!
//! Input: a byte choosing a time zone and a start time near a daylight
//! saving change (mod 6), then the expression's text.
#![no_main]

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use libfuzzer_sys::fuzz_target;
use warren_core::config::parse_cron;

/// Zones and start times: UTC, a spring-forward and a fall-back night in
/// Paris and New York, a half-hour shift (Lord Howe).
const STARTS: [(Tz, i64); 6] = [
    (Tz::UTC, 1_800_000_000),
    (Tz::Europe__Paris, 1_774_745_000),     // 2026-03-29 00:43 UTC
    (Tz::Europe__Paris, 1_792_886_400),     // 2026-10-25 00:00 UTC
    (Tz::America__New_York, 1_772_949_600), // 2026-03-08 06:00 UTC
    (Tz::America__New_York, 1_793_502_000), // 2026-11-01 05:00 UTC
    (Tz::Australia__Lord_Howe, 1_775_313_000), // 2026-04-04 14:30 UTC
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let Ok(expr) = std::str::from_utf8(text) else {
        return;
    };
    let cron = match parse_cron(expr) {
        Ok(cron) => cron,
        Err(why) => {
            assert!(!why.is_empty() && !why.contains('\n'), "{why:?}");
            return;
        }
    };
    let (tz, start) = STARTS[usize::from(pick) % STARTS.len()];
    let mut t: DateTime<Tz> = Utc.timestamp_opt(start, 0).unwrap().with_timezone(&tz);
    for _ in 0..3 {
        let Ok(next) = cron.find_next_occurrence(&t, false) else {
            break;
        };
        assert!(next > t, "{expr:?}: next {next} not after {t}");
        if let Ok(prev) = cron.find_previous_occurrence(&next, true) {
            assert!(prev <= next, "{expr:?}: previous {prev} after {next}");
        }
        t = next;
    }
});
