//! A delivery from a work queue, as the worker reads it: the header limits
//! checked in triage (`check_headers`), the task type (`task_type_of`) and
//! the envelope read in prepare (`TaskEnvelope::parse`); and the saved
//! expiration the scheduler restores (`headers::original_expiration`); and
//! the unique key (`flow::UniqueKey::from_headers`).
//!
//! Input (see `warren_fuzz::Fields`): a flags byte (bit 0: delivered through
//! `P.tasks`; bits 1-5: content type, content encoding, `type` property,
//! message id, headers present), a byte choosing `limits.max_body_bytes`
//! (2^(b mod 21)), a `u32` padding length (mod 70,000; a long string header
//! of that size, so the 64 KiB limit is in reach), then the fields routing
//! key, content type, content encoding, type, message id, headers (AMQP
//! field table, as on the wire), and the body as the rest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use warren_core::event::{Event, TaskState};
use warren_core::flow::{UniqueKey, MAX_UNIQUE_MS, MIN_UNIQUE_MS};
use warren_core::headers::{self, MAX_HEADER_BYTES, MAX_HEADER_DEPTH};
use warren_core::routes::{is_valid_task_type, MAX_TYPE_BYTES};
use warren_core::task::{check_headers, is_json_content_type, task_type_of, MessageMeta};
use warren_core::TaskEnvelope;
use warren_fuzz::{decode_table, depth, encode_table, Fields};

const TASKS: &str = "warren.tasks";
const ROUTING: [&str; 2] = [TASKS, "warren.unroutable"];

/// Every code `TaskEnvelope::parse` documents.
const PARSE_CODES: &[&str] = &[
    "content_type",
    "content_encoding",
    "too_large",
    "not_json",
    "bad_header",
    "bad_type",
    "type_too_long",
];

fuzz_target!(|data: &[u8]| {
    let mut f = Fields::new(data);
    let flags = f.byte();
    let max_body_bytes = 1usize << (f.byte() % 21);
    let pad = (f.u32() % 70_000) as usize;
    let routing_key = f.text();
    let content_type = f.text();
    let content_encoding = f.text();
    let type_ = f.text();
    let message_id = f.text();
    let header_bytes = f.field();
    let body = f.rest();
    let on = |bit: u8| flags & (1 << bit) != 0;

    let mut table = if on(5) {
        // Bytes the broker client refuses never reach Warren.
        let Some(t) = decode_table(header_bytes) else {
            return;
        };
        Some(t)
    } else {
        None
    };
    if pad > 0 {
        let t = table.get_or_insert_with(Default::default);
        headers::set_str(t, "x-pad", &"p".repeat(pad));
    }
    let meta = MessageMeta {
        exchange: if on(0) { TASKS.into() } else { String::new() },
        routing_key,
        content_type: on(1).then_some(content_type),
        content_encoding: on(2).then_some(content_encoding),
        type_: on(3).then_some(type_),
        message_id: on(4).then_some(message_id),
        headers: table,
        ..Default::default()
    };
    let h = meta.headers.as_ref();

    // Triage: the limits hold for exactly the tables that fit them, measured
    // as the wire encoder writes them.
    let checked = check_headers(h);
    if let Some(t) = h {
        let shape = headers::shape(t);
        let wire = encode_table(t).len();
        assert_eq!(shape.bytes, wire, "shape counts the encoded bytes");
        assert_eq!(shape.depth, depth(t), "shape counts the nesting");
        let fits = wire <= MAX_HEADER_BYTES && shape.depth <= MAX_HEADER_DEPTH;
        match &checked {
            Ok(()) => assert!(
                fits,
                "accepted headers of {wire} bytes, {} deep",
                shape.depth
            ),
            Err(e) => {
                assert!(!fits, "refused headers that fit: {e}");
                let want = if wire > MAX_HEADER_BYTES {
                    "headers_too_large"
                } else {
                    "headers_too_deep"
                };
                assert_eq!(e.code, want);
            }
        }
    } else {
        assert!(checked.is_ok());
    }

    // The expiration the scheduler would restore on release is one the
    // property can hold, whatever the producer forged.
    if let Some(exp) = headers::original_expiration(h) {
        assert!(exp.as_str().len() <= 255 && exp.as_str().parse::<u64>().is_ok());
    }

    // The unique key: whatever the producer sent, a lock queue name of fixed
    // length and a window within bounds, or a refusal.
    if let Ok(Some(k)) = UniqueKey::from_headers(h) {
        assert_eq!(k.hash.len(), 32);
        assert!(k.hash.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!((MIN_UNIQUE_MS..=MAX_UNIQUE_MS).contains(&k.window_ms));
    }

    // The type, and the routing key of the event that reports on it (an
    // AMQP short string: at most 255 bytes, whatever the type).
    let task_type = task_type_of(&meta, &ROUTING);
    if on(0) {
        assert_eq!(task_type, meta.routing_key);
    }
    let ev = Event::new("id", &task_type, TaskState::Dead, 0);
    assert!(ev.routing_key().len() <= 255, "event routing key too long");

    // Prepare: the envelope, whether or not triage let it through.
    match TaskEnvelope::parse(&meta, &task_type, "id", body, max_body_bytes) {
        Ok(task) => {
            assert!(is_json_content_type(meta.content_type.as_deref()));
            assert!(body.len() <= max_body_bytes);
            assert!(task_type.len() <= MAX_TYPE_BYTES && is_valid_task_type(&task_type));
            let args: Value = serde_json::from_slice(body).expect("accepted body is JSON");
            assert_eq!(task.args, args);
            // Retries and dead copies carry the original body, not the args
            // re-encoded (which may differ in the last bit of a long decimal).
            serde_json::to_vec(&task.args).expect("args re-encode for handlers and events");
            assert!(task.attempt >= 1);
            if !headers::get_flag(h, headers::REPUBLISHED) {
                assert_eq!(task.attempt, 1, "a producer cannot set the attempt");
            }
            assert_eq!(
                task.max_retries,
                headers::get_non_negative(h, headers::MAX_RETRIES).unwrap()
            );
            assert_eq!(
                task.timeout_ms,
                headers::get_non_negative(h, headers::TIMEOUT_MS).unwrap()
            );
        }
        Err(e) => {
            assert!(
                PARSE_CODES.contains(&e.code),
                "undocumented code {}",
                e.code
            );
            assert!(!e.message.is_empty() && !e.message.contains('\n'), "{e:?}");
        }
    }
});
