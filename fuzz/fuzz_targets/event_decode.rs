//! A status event body, decoded as `warren watch`, the client's `call` and
//! the tracker do (`Event::from_json`), then re-encoded and its result
//! capped as the tracker stores it (`event::cap_result`).
//!
//! Input: the message body, as is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_core::event::{cap_result, Event};

fuzz_target!(|data: &[u8]| {
    let Ok(event) = Event::from_json(data) else {
        return;
    };
    let body = event.to_json();
    let again = Event::from_json(&body).expect("a re-encoded event decodes");
    assert_eq!(again.to_json(), body, "decode and encode agree");
    assert!(
        event.routing_key().len() <= 255,
        "event routing key too long"
    );
    if let Some(result) = event.result {
        let text = serde_json::to_string(&result).expect("serializes");
        // A cap somewhere inside the result, as limits.max_result_bytes.
        let max = data.len() % (text.len() + 1);
        let capped = cap_result(result.clone(), max);
        if text.len() <= max {
            assert_eq!(capped, result, "a result within the cap is kept");
        } else {
            assert_eq!(capped["truncated"], true);
            assert_eq!(capped["bytes"], text.len());
            let preview = capped["preview"].as_str().expect("preview is text");
            assert!(preview.len() <= 1024 && text.starts_with(preview));
        }
    }
});
