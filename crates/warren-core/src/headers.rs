//! Header names and the reading of integer headers, whatever a producer sent.

use amq_protocol_types::{AMQPValue, FieldTable};

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

/// Whether a header is the broker's dead-lettering record (`x-death`,
/// `x-first-death-*`, `x-last-death-*`), which grows on every delay hop.
pub fn is_death_record(key: &str) -> bool {
    key == "x-death" || key.starts_with("x-first-death-") || key.starts_with("x-last-death-")
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
}
