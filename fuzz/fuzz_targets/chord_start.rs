//! A chord start on `P.chords` (`Start::parse`, as the folding scheduler
//! reads it) and a member's outcome on `P.chord.<id>` (`Fold::add`).
//!
//! Input: the message body, as is; read both as a start (of chord `c`) and
//! as an outcome added to a fold of 4 members.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_core::chord::{Added, Fold, Start, MAX_MEMBERS, MAX_RESULT_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(start) = Start::parse(Some("c"), data) {
        assert!((1..=MAX_MEMBERS).contains(&start.size));
        // What a producer writes for it reads back the same.
        assert_eq!(
            Start::parse(Some("c"), &start.encode()).as_ref(),
            Ok(&start)
        );
    }
    let mut fold = Fold::new(4);
    let first = fold.add(data);
    let again = fold.add(data);
    match first {
        Added::New => {
            assert_eq!(again, Added::Duplicate);
            assert_eq!(fold.count(), 1);
        }
        _ => assert_eq!(
            (first, again, fold.count()),
            (Added::Refused, Added::Refused, 0)
        ),
    }
    if fold.count() == 1 {
        let start = Start::parse(Some("c"), br#"{"size":4,"callback":{"type":"a.b"}}"#)
            .expect("a good start");
        let body: serde_json::Value =
            serde_json::from_slice(&fold.callback("c", &start).body).expect("JSON");
        let results = body["results"].as_array().expect("results");
        assert_eq!(results.len(), 4);
        for r in results.iter().flat_map(|r| [&r["result"], &r["error"]]) {
            assert!(serde_json::to_string(r).unwrap().len() <= MAX_RESULT_BYTES + 64);
        }
    }
});
