//! A task published to `P.delay`, as the scheduler takes it in: its headers
//! checked (`check_headers`), its due time read from `x-warren-eta` and
//! `x-delay` (`delay::due_at_ms`), then the hops through the delay tiers
//! (`delay::next_hop`) until its release.
//!
//! Input (see `warren_fuzz::Fields`): a byte for the kind of `x-warren-eta`
//! and one for `x-delay` (mod 8: absent, short string, long string, 64-bit,
//! 32-bit, 8-bit unsigned integer, double, timestamp), a `u64` for the clock
//! (mod the year 10000, in Unix ms), a `u64` for `scheduler.max_delay_ms`
//! (0 means the default), then the fields holding the eta's value and the
//! delay's value (text, or a big-endian number).
#![no_main]

use amq_protocol_types::{AMQPValue, FieldTable, LongString, ShortString};
use chrono::DateTime;
use libfuzzer_sys::fuzz_target;
use warren_core::delay::{due_at_ms, next_hop, release_tiers, tiers, Hop, FINAL_HOLD_MS};
use warren_core::headers::{self, int_value};
use warren_core::task::check_headers;
use warren_fuzz::Fields;

/// Unix ms of 10000-01-01: the clock never reads later.
const CLOCK_END_MS: u64 = 253_402_300_800_000;
/// `scheduler.max_delay_ms` in `config/default.toml` (10 years).
const DEFAULT_MAX_DELAY_MS: u64 = 315_576_000_000;

fn number(bytes: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[8 - n..].copy_from_slice(&bytes[..n]);
    i64::from_be_bytes(b)
}

fn value(kind: u8, bytes: &[u8]) -> Option<AMQPValue> {
    let n = number(bytes);
    Some(match kind % 8 {
        0 => return None,
        1 => {
            // What a broker client can receive: at most 255 bytes of UTF-8.
            let mut text = String::from_utf8_lossy(bytes).into_owned();
            while text.len() > 255 {
                text.pop();
            }
            AMQPValue::ShortString(ShortString::from(text))
        }
        2 => AMQPValue::LongString(LongString::from(bytes.to_vec())),
        3 => AMQPValue::LongLongInt(n),
        4 => AMQPValue::LongInt(n as i32),
        5 => AMQPValue::ShortShortUInt(n as u8),
        6 => AMQPValue::Double(f64::from_bits(n as u64)),
        _ => AMQPValue::Timestamp(n as u64),
    })
}

fuzz_target!(|data: &[u8]| {
    let mut f = Fields::new(data);
    let (eta_kind, delay_kind) = (f.byte(), f.byte());
    let now = (f.u64() % CLOCK_END_MS) as i64;
    let max_delay_ms = match f.u64() {
        0 => DEFAULT_MAX_DELAY_MS,
        m => m,
    };
    let eta = value(eta_kind, f.field());
    let delay = value(delay_kind, f.field());
    let mut table = FieldTable::default();
    if let Some(v) = eta.clone() {
        table.insert(headers::ETA.into(), v);
    }
    if let Some(v) = delay.clone() {
        table.insert(headers::DELAY.into(), v);
    }
    let h = Some(&table);
    assert!(check_headers(h).is_ok(), "two small headers fit");

    let due = match due_at_ms(h, now, max_delay_ms) {
        Ok(due) => due,
        Err(e) => {
            let codes = ["no_delay", "bad_header", "delay_too_long"];
            assert!(codes.contains(&e.code), "undocumented code {}", e.code);
            assert!(!e.message.is_empty() && !e.message.contains('\n'), "{e:?}");
            if eta.is_none() && delay.is_none() {
                assert_eq!(e.code, "no_delay");
            }
            return;
        }
    };
    assert!(eta.is_some() || delay.is_some(), "due time from no header");
    assert!(due >= now, "past due times mean now");
    assert!((due - now) as u64 <= max_delay_ms, "due beyond the maximum");
    match (&eta, &delay) {
        (None, Some(d)) => {
            let ms = int_value(d).expect("accepted x-delay is an integer");
            assert_eq!(due, now.saturating_add(ms).max(now));
        }
        (Some(AMQPValue::LongString(s)), _) => {
            let text = String::from_utf8_lossy(s.as_bytes());
            if let Ok(t) = DateTime::parse_from_rfc3339(text.trim()) {
                assert_eq!(due, t.timestamp_millis().max(now), "eta {text:?}");
            }
        }
        _ => {}
    }

    // The hops: never released early, each hop a tier that exists, and a
    // bounded number of them.
    let (tiers, release) = (tiers(max_delay_ms), release_tiers(max_delay_ms));
    for release in [&release[..], &[][..]] {
        let mut remaining = due - now;
        for hop in 0.. {
            assert!(hop < 200, "{} ms took over 200 hops", due - now);
            match next_hop(remaining, &tiers, release) {
                Hop::Wait(n) => {
                    assert!(tiers.contains(&n), "no tier {n}");
                    assert!(
                        n as i64 * 1000 <= remaining,
                        "tier {n} overshoots {remaining}"
                    );
                    remaining -= n as i64 * 1000;
                }
                Hop::ReleaseTier(n) => {
                    assert!(release.contains(&n), "no release tier {n}");
                    let early = remaining - n as i64 * 1000;
                    assert!(
                        (0..1000).contains(&early),
                        "release tier {n} at {remaining}"
                    );
                    break;
                }
                Hop::Release => {
                    let bound = if release.is_empty() {
                        FINAL_HOLD_MS
                    } else {
                        999
                    };
                    assert!(
                        remaining <= bound,
                        "released in process {remaining} ms early"
                    );
                    break;
                }
            }
        }
    }
});
