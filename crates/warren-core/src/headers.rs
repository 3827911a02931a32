//! Header names and the reading of integer headers, whatever a producer sent.

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};

/// The attempt number (1 on first execution), set by the system.
pub const ATTEMPT: &str = "x-warren-attempt";
/// The last failure's message, set by the system after a failure.
pub const LAST_ERROR: &str = "x-warren-last-error";
/// Why a message sits in `P.dead`.
pub const DEAD_REASON: &str = "x-warren-dead-reason";
/// Human detail for the dead reason (what exactly was invalid).
pub const DEAD_DETAIL: &str = "x-warren-dead-detail";
/// The work queue a dead task was taken from, when known.
pub const DEAD_QUEUE: &str = "x-warren-dead-queue";
/// Marks a copy the system re-published, so its `x-warren-attempt` is trusted.
pub const REPUBLISHED: &str = "x-warren-republished";
/// How many times a task was redelivered without reaching an outcome
/// (counted by workers, so poison detection works on classic queues).
pub const REDELIVERIES: &str = "x-warren-redeliveries";
/// Producer override of the retry policy's max retries.
pub const MAX_RETRIES: &str = "x-warren-max-retries";
/// Producer override of the handler's time limit.
pub const TIMEOUT_MS: &str = "x-warren-timeout-ms";
/// Delay in milliseconds from now (same name as the delayed-message plugin).
pub const DELAY: &str = "x-delay";
/// Absolute due time, RFC 3339 or Unix milliseconds.
pub const ETA: &str = "x-warren-eta";

/// Keeps a task's own AMQP `expiration` while the system holds a copy without
/// it (a retry waiting in the delay tiers, a task parked in `P.dead`); read
/// it back with [`original_expiration`].
pub const ORIGINAL_EXPIRATION: &str = "x-warren-original-expiration";

/// Set on a copy in `P.dead` whose producer headers were too large or too
/// deep to carry (see [`unfit`]): how many bytes they took on the wire.
pub const HEADERS_DROPPED: &str = "x-warren-headers-dropped";

/// On a task parked in `P.paused.<type>` while its type is paused: the full
/// name of the queue it was taken from, where it goes back on resume.
pub const PAUSED_FROM: &str = "x-warren-paused-from";

/// On a copy of a changed task: the `at` (Unix ms) of the latest change
/// record applied to it (contract section 5); a copy without it, or with an
/// older one, is superseded by a later change.
pub const CHANGED: &str = "x-warren-changed";

/// Largest header table, in encoded bytes, that a task may carry. Every copy
/// the system re-publishes (retry, dead, requeue, release) adds a few KiB of
/// its own headers, and an AMQP header frame cannot be split: 64 KiB leaves
/// room for them within RabbitMQ's default `frame_max` of 128 KiB. A task
/// over it is invalid (`headers_too_large`) and parked without its headers.
pub const MAX_HEADER_BYTES: usize = 65_536;

/// Deepest nesting of tables and arrays a task's headers may have (RabbitMQ's
/// own `x-death` uses three levels). Deeper headers make the task invalid
/// (`headers_too_deep`), so no copy the system publishes carries them.
pub const MAX_HEADER_DEPTH: usize = 32;

/// The encoded size and the nesting depth of a header table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderShape {
    /// Bytes on the wire, the table's own 4-byte length included.
    pub bytes: usize,
    /// 1 for a flat table, plus one per nested table or array.
    pub depth: usize,
}

/// Measures `table` without recursion, so a hostile table nested thousands
/// deep costs no stack.
pub fn shape(table: &FieldTable) -> HeaderShape {
    enum Item<'a> {
        Table(&'a FieldTable, usize),
        Value(&'a AMQPValue, usize),
    }
    let (mut bytes, mut depth) = (0usize, 0usize);
    let mut stack = vec![Item::Table(table, 1)];
    while let Some(item) = stack.pop() {
        match item {
            Item::Table(t, level) => {
                depth = depth.max(level);
                bytes += 4;
                for (k, v) in t {
                    bytes += 1 + k.as_str().len();
                    stack.push(Item::Value(v, level));
                }
            }
            Item::Value(v, level) => {
                bytes += 1; // the type tag
                bytes += match v {
                    AMQPValue::Void => 0,
                    AMQPValue::Boolean(_)
                    | AMQPValue::ShortShortInt(_)
                    | AMQPValue::ShortShortUInt(_) => 1,
                    AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
                    AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
                    AMQPValue::DecimalValue(_) => 5,
                    AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
                    AMQPValue::ShortString(s) => 1 + s.as_str().len(),
                    AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
                    AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
                    AMQPValue::FieldArray(a) => {
                        depth = depth.max(level + 1);
                        stack.extend(a.as_slice().iter().map(|v| Item::Value(v, level + 1)));
                        4
                    }
                    AMQPValue::FieldTable(t) => {
                        stack.push(Item::Table(t, level + 1));
                        0 // the nested table counts its own length
                    }
                };
            }
        }
    }
    HeaderShape { bytes, depth }
}

/// What makes `headers` unfit to carry, if anything: over
/// [`MAX_HEADER_BYTES`] or nested deeper than [`MAX_HEADER_DEPTH`].
pub fn unfit(headers: Option<&FieldTable>) -> Option<HeaderShape> {
    let s = shape(headers?);
    (s.bytes > MAX_HEADER_BYTES || s.depth > MAX_HEADER_DEPTH).then_some(s)
}

/// A header whose value is not what the contract allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {key}: {problem}")]
pub struct HeaderError {
    /// The header name.
    pub key: String,
    /// What is wrong with its value.
    pub problem: String,
}

/// Reads an integer from any AMQP integer width, or from a string of ASCII
/// digits with an optional sign. Everything else is an error.
pub fn int_value(value: &AMQPValue) -> Result<i64, String> {
    match value {
        AMQPValue::ShortShortInt(v) => Ok(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Ok(i64::from(*v)),
        AMQPValue::ShortInt(v) => Ok(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Ok(i64::from(*v)),
        AMQPValue::LongInt(v) => Ok(i64::from(*v)),
        AMQPValue::LongUInt(v) => Ok(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Ok(*v),
        AMQPValue::ShortString(s) => parse_int_text(s.as_str().as_bytes()),
        AMQPValue::LongString(s) => parse_int_text(s.as_bytes()),
        other => Err(format!("expected an integer, got {}", type_word(other))),
    }
}

fn parse_int_text(bytes: &[u8]) -> Result<i64, String> {
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
    let digits = match bytes.first() {
        Some(b'+') | Some(b'-') => &bytes[1..],
        _ => bytes,
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!("expected an integer, got the string {shown:?}"));
    }
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| format!("integer {shown} is out of range"))
}

fn type_word(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "a boolean",
        AMQPValue::Float(_) | AMQPValue::Double(_) | AMQPValue::DecimalValue(_) => {
            "a fractional number"
        }
        AMQPValue::FieldArray(_) => "an array",
        AMQPValue::FieldTable(_) => "a table",
        AMQPValue::ByteArray(_) => "a byte array",
        AMQPValue::Timestamp(_) => "a timestamp",
        AMQPValue::Void => "void",
        _ => "another type",
    }
}

/// Reads an optional integer header; absent is `Ok(None)`.
pub fn get_int(headers: Option<&FieldTable>, key: &str) -> Result<Option<i64>, HeaderError> {
    let Some(value) = headers.and_then(|h| h.inner().get(key)) else {
        return Ok(None);
    };
    int_value(value).map(Some).map_err(|problem| HeaderError {
        key: key.to_owned(),
        problem,
    })
}

/// Reads an optional non-negative integer header that must fit in `u64`.
pub fn get_non_negative(
    headers: Option<&FieldTable>,
    key: &str,
) -> Result<Option<u64>, HeaderError> {
    match get_int(headers, key)? {
        None => Ok(None),
        Some(v) if v >= 0 => Ok(Some(v as u64)),
        Some(v) => Err(HeaderError {
            key: key.to_owned(),
            problem: format!("{v} is negative, expected 0 or more"),
        }),
    }
}

/// Reads a header as text, if it is a string.
pub fn get_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// The [`ORIGINAL_EXPIRATION`] header as an `expiration` property to restore:
/// a string of at most 255 bytes holding a `u64` (what the broker accepts).
/// Anything else is `None`, as a producer may forge the header: restoring a
/// longer value would panic in the AMQP library, another one would make the
/// broker close the publishing channel.
pub fn original_expiration(headers: Option<&FieldTable>) -> Option<ShortString> {
    get_str(headers, ORIGINAL_EXPIRATION)
        .filter(|e| e.parse::<u64>().is_ok())
        .and_then(|e| ShortString::try_new(e).ok())
}

/// Whether a boolean header is present and true.
pub fn get_flag(headers: Option<&FieldTable>, key: &str) -> bool {
    matches!(
        headers.and_then(|h| h.inner().get(key)),
        Some(AMQPValue::Boolean(true))
    )
}

/// Sets a string header.
pub fn set_str(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(key.into(), AMQPValue::LongString(value.into()));
}

/// Sets a 64-bit signed integer header.
pub fn set_int(headers: &mut FieldTable, key: &str, value: i64) {
    headers.insert(key.into(), AMQPValue::LongLongInt(value));
}

/// Sets a boolean header.
pub fn set_flag(headers: &mut FieldTable, key: &str) {
    headers.insert(key.into(), AMQPValue::Boolean(true));
}

/// Removes every header whose name `drop` selects.
pub fn remove_where(headers: &mut FieldTable, drop: impl Fn(&str) -> bool) {
    let kept: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(k, _)| !drop(k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    *headers = FieldTable::from(kept);
}

/// Removes the named headers.
pub fn remove(headers: &mut FieldTable, keys: &[&str]) {
    remove_where(headers, |k| keys.contains(&k));
}

/// The count a quorum queue adds to a message it delivers again; it belongs
/// to that queue's delivery, not to the task.
pub const DELIVERY_COUNT: &str = "x-delivery-count";

/// Whether a header is the broker's record of a message's past: its
/// dead-lettering (`x-death`, `x-first-death-*`, `x-last-death-*`), which
/// grows on every delay hop, or a quorum queue's [`DELIVERY_COUNT`].
/// Neither is copied into a task Warren publishes again.
pub fn is_death_record(key: &str) -> bool {
    key == "x-death"
        || key == DELIVERY_COUNT
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::{FieldArray, LongString, ShortString};

    fn table(key: &str, v: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(key.into(), v);
        t
    }

    #[test]
    fn every_integer_width_is_read() {
        let cases = [
            AMQPValue::ShortShortInt(-5),
            AMQPValue::ShortShortUInt(5),
            AMQPValue::ShortInt(-5),
            AMQPValue::ShortUInt(5),
            AMQPValue::LongInt(-5),
            AMQPValue::LongUInt(5),
            AMQPValue::LongLongInt(-5),
        ];
        for v in cases {
            let got = int_value(&v).unwrap();
            assert_eq!(got.abs(), 5, "{v:?}");
        }
        assert_eq!(
            int_value(&AMQPValue::LongLongInt(i64::MAX)).unwrap(),
            i64::MAX
        );
    }

    #[test]
    fn digit_strings_with_sign_are_read() {
        let s = |x: &str| AMQPValue::LongString(LongString::from(x));
        assert_eq!(int_value(&s("42")).unwrap(), 42);
        assert_eq!(int_value(&s("+42")).unwrap(), 42);
        assert_eq!(int_value(&s("-42")).unwrap(), -42);
        assert_eq!(
            int_value(&AMQPValue::ShortString(ShortString::from("7"))).unwrap(),
            7
        );
    }

    #[test]
    fn hostile_values_are_errors_not_panics() {
        let s = |x: &[u8]| AMQPValue::LongString(LongString::from(x.to_vec()));
        for bad in [
            &b""[..],
            b"-",
            b"+",
            b"1.5",
            b" 1",
            b"1 ",
            b"0x10",
            b"1e3",
            b"\xff\xfe",
            b"99999999999999999999999",
            b"\xd9\xa3", // Arabic-Indic digit three: not ASCII
        ] {
            assert!(int_value(&s(bad)).is_err(), "{bad:?} should be rejected");
        }
        for bad in [
            AMQPValue::Boolean(true),
            AMQPValue::Double(1.0),
            AMQPValue::Float(1.0),
            AMQPValue::Void,
            AMQPValue::Timestamp(5),
            AMQPValue::FieldArray(FieldArray::default()),
            AMQPValue::FieldTable(FieldTable::default()),
        ] {
            assert!(int_value(&bad).is_err(), "{bad:?} should be rejected");
        }
        let long = "9".repeat(10_000);
        let err = int_value(&s(long.as_bytes())).unwrap_err();
        assert!(err.len() < 200, "error text stays short: {err}");
    }

    #[test]
    fn removing_headers() {
        let mut t = FieldTable::default();
        set_int(&mut t, DELAY, 5);
        set_str(&mut t, "x-death", "d");
        set_str(&mut t, "x-first-death-queue", "q");
        set_int(&mut t, DELIVERY_COUNT, 2);
        set_str(&mut t, "keep", "k");
        remove(&mut t, &[DELAY]);
        remove_where(&mut t, is_death_record);
        let keys: Vec<&str> = t.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["keep"]);
    }

    #[test]
    fn typed_getters() {
        let t = table(MAX_RETRIES, AMQPValue::LongInt(-1));
        assert_eq!(get_int(Some(&t), MAX_RETRIES).unwrap(), Some(-1));
        let err = get_non_negative(Some(&t), MAX_RETRIES).unwrap_err();
        assert_eq!(
            err.to_string(),
            "header x-warren-max-retries: -1 is negative, expected 0 or more"
        );
        assert_eq!(get_int(None, MAX_RETRIES).unwrap(), None);
        assert_eq!(get_int(Some(&t), TIMEOUT_MS).unwrap(), None);
        let mut t = FieldTable::default();
        set_flag(&mut t, REPUBLISHED);
        set_str(&mut t, DEAD_REASON, "invalid");
        assert!(get_flag(Some(&t), REPUBLISHED));
        assert_eq!(get_str(Some(&t), DEAD_REASON).as_deref(), Some("invalid"));
    }

    #[test]
    fn only_a_whole_number_short_enough_is_restored_as_expiration() {
        let t = |v: AMQPValue| table(ORIGINAL_EXPIRATION, v);
        let got = |v: AMQPValue| original_expiration(Some(&t(v))).map(|s| s.to_string());
        assert_eq!(
            got(AMQPValue::LongString("60000".into())).as_deref(),
            Some("60000")
        );
        assert_eq!(
            got(AMQPValue::ShortString("0".into())).as_deref(),
            Some("0")
        );
        // Forged by a producer: the broker would refuse these, or the AMQP
        // library would panic building the property (over 255 bytes, though
        // a u64: leading zeros).
        let zeros = format!("{}5", "0".repeat(300));
        for bad in ["soon", "-1", "1.5", "", "99999999999999999999999", &zeros] {
            assert_eq!(got(AMQPValue::LongString(bad.into())), None, "{bad:?}");
        }
        assert_eq!(got(AMQPValue::LongLongInt(5)), None);
        assert_eq!(original_expiration(None), None);
    }

    /// The size the wire encoder writes, to check `shape` against.
    fn wire_len(t: &FieldTable) -> usize {
        let buf = cookie_factory::gen_simple(
            amq_protocol_types::generation::gen_field_table(t),
            Vec::new(),
        )
        .expect("encodes");
        buf.len()
    }

    #[test]
    fn shape_measures_what_the_wire_encoder_writes_for_every_value_type() {
        let mut inner = FieldTable::default();
        inner.insert("deep".into(), AMQPValue::LongString("v".into()));
        let values = vec![
            AMQPValue::Void,
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-1),
            AMQPValue::ShortShortUInt(1),
            AMQPValue::ShortInt(-2),
            AMQPValue::ShortUInt(2),
            AMQPValue::LongInt(-3),
            AMQPValue::LongUInt(3),
            AMQPValue::LongLongInt(-4),
            AMQPValue::Float(1.5),
            AMQPValue::Double(2.5),
            AMQPValue::DecimalValue(amq_protocol_types::DecimalValue { scale: 2, value: 7 }),
            AMQPValue::ShortString(ShortString::from("short")),
            AMQPValue::LongString(LongString::from("long string")),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::FieldTable(inner.clone()),
            ])),
            AMQPValue::Timestamp(9),
            AMQPValue::FieldTable(inner),
            AMQPValue::ByteArray(vec![1u8, 2, 3].into()),
        ];
        let mut all = FieldTable::default();
        for (i, v) in values.into_iter().enumerate() {
            let one = table("k", v.clone());
            assert_eq!(shape(&one).bytes, wire_len(&one), "{v:?}");
            all.insert(format!("key-{i}").into(), v);
        }
        assert_eq!(shape(&all).bytes, wire_len(&all));
        // The array holding a table is three levels deep.
        assert_eq!(shape(&all).depth, 3);
        assert_eq!(
            shape(&FieldTable::default()),
            HeaderShape { bytes: 4, depth: 1 }
        );
    }

    #[test]
    fn unfit_headers_are_measured_without_recursion() {
        let mut t = FieldTable::default();
        for _ in 0..100_000 {
            let mut outer = FieldTable::default();
            outer.insert("n".into(), AMQPValue::FieldTable(t));
            t = outer;
        }
        // 100,000 levels of 4 (length) + 2 (key) + 1 (tag) bytes, plus the innermost table.
        let deep = HeaderShape {
            bytes: 100_000 * 7 + 4,
            depth: 100_001,
        };
        assert_eq!(shape(&t), deep);
        assert_eq!(unfit(Some(&t)), Some(deep));
        // Dropping a table this deep recurses: leak it, as the worker never builds one.
        std::mem::forget(t);
        let small = table("x-custom", AMQPValue::LongString("kept".into()));
        assert_eq!(unfit(Some(&small)), None);
        assert_eq!(unfit(None), None);
        let mut nested = small.clone();
        for _ in 0..MAX_HEADER_DEPTH {
            let mut outer = FieldTable::default();
            outer.insert("n".into(), AMQPValue::FieldTable(nested));
            nested = outer;
        }
        assert_eq!(shape(&nested).depth, MAX_HEADER_DEPTH + 1);
        assert!(unfit(Some(&nested)).is_some(), "too deep though small");
    }
}
