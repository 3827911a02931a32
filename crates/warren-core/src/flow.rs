//! Fleet-wide flow control kept in the broker (contract section 9): the
//! names of the permit queues of global concurrency limits, the windows of
//! rate limits and their arithmetic, the keys of limits per key, and the
//! unique keys of tasks with the names of their lock queues.

use amq_protocol_types::FieldTable;
use sha2::{Digest, Sha256};

use crate::headers;
use crate::names::Names;

/// Header: a producer's unique key; while a task with this key is known (for
/// the window), another with the same key does not run.
pub const UNIQUE_KEY: &str = "x-warren-unique-key";
/// Header: the unique key's window in ms (default [`DEFAULT_UNIQUE_MS`]).
pub const UNIQUE_MS: &str = "x-warren-unique-ms";

/// Longest unique key accepted, in bytes; a longer one makes the task
/// invalid. The key is hashed into the lock queue's name, so its length never
/// shows there.
pub const MAX_UNIQUE_KEY_BYTES: usize = 256;
/// The window when `x-warren-unique-ms` is absent: 1 hour.
pub const DEFAULT_UNIQUE_MS: i64 = 3_600_000;
/// The shortest window: shorter ones are raised to it.
pub const MIN_UNIQUE_MS: i64 = 1_000;
/// The longest window: longer ones are lowered to it (24 h), so no lock
/// queue outlives a day unused.
pub const MAX_UNIQUE_MS: i64 = 86_400_000;

/// A task's unique key, as read from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKey {
    /// The first 32 hex digits of the SHA-256 of the key.
    pub hash: String,
    /// The window, in ms, within `MIN_UNIQUE_MS..=MAX_UNIQUE_MS`.
    pub window_ms: i64,
}

/// Why a unique key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UniqueError {
    /// The key header is not a string, is empty or too long.
    #[error(
        "x-warren-unique-key must be a non-empty string of at most {MAX_UNIQUE_KEY_BYTES} bytes"
    )]
    BadKey,
    /// The window header is not an integer.
    #[error("x-warren-unique-ms must be an integer number of milliseconds")]
    BadWindow,
}

impl UniqueKey {
    /// Reads the unique key and window of a task; `Ok(None)` when it has no
    /// key. A window out of bounds is clamped into them.
    pub fn from_headers(h: Option<&FieldTable>) -> Result<Option<UniqueKey>, UniqueError> {
        let Some(t) = h else { return Ok(None) };
        if !t.inner().contains_key(UNIQUE_KEY) {
            return Ok(None);
        }
        let key = headers::get_str(h, UNIQUE_KEY).ok_or(UniqueError::BadKey)?;
        if key.is_empty() || key.len() > MAX_UNIQUE_KEY_BYTES {
            return Err(UniqueError::BadKey);
        }
        let window_ms = headers::get_int(h, UNIQUE_MS)
            .map_err(|_| UniqueError::BadWindow)?
            .unwrap_or(DEFAULT_UNIQUE_MS)
            .clamp(MIN_UNIQUE_MS, MAX_UNIQUE_MS);
        Ok(Some(UniqueKey {
            hash: hash_key(&key),
            window_ms,
        }))
    }

    /// `P.unique.<hash>`: the lock queue, holding at most one marker (the
    /// first task's id) for the window.
    pub fn lock_queue(&self, names: &Names) -> String {
        format!("{}.unique.{}", names.prefix(), self.hash)
    }

    /// `P.unique.<hash>.first`: where the first task's id is kept for the
    /// tasks that lost to it to read.
    pub fn first_queue(&self, names: &Names) -> String {
        format!("{}.unique.{}.first", names.prefix(), self.hash)
    }
}

/// The name part of a unique key: 32 hex digits of its SHA-256.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..16])
}

/// `P.permits.<type>.<k>`: the `k`-th permit of a type's global concurrency
/// limit, an exclusive queue that exists while a worker holds it.
pub fn permit_queue(names: &Names, task_type: &str, k: u32) -> String {
    format!("{}.{k}", permit_base(names, task_type, None))
}

/// The name of the permits of a type (`P.permits.<type>`) or of one key of
/// it (`P.permits.<type>.<hash>`), without the permit's number.
pub fn permit_base(names: &Names, task_type: &str, key_hash: Option<&str>) -> String {
    match key_hash {
        Some(h) => format!("{}.permits.{task_type}.{h}", names.prefix()),
        None => format!("{}.permits.{task_type}", names.prefix()),
    }
}

/// Header: the key of a task whose type has a rate limit per key
/// (`flow.rate.<type>.key = "header"`).
pub const RATE_KEY: &str = "x-warren-rate-key";
/// Header: the key of a task whose type has a global concurrency limit per
/// key (`flow.concurrency.<type>.key = "header"`).
pub const CONCURRENCY_KEY: &str = "x-warren-concurrency-key";
/// Longest rate or concurrency key accepted, in bytes.
pub const MAX_FLOW_KEY_BYTES: usize = 256;

/// Where the key of a limit per key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A header ([`RATE_KEY`] or [`CONCURRENCY_KEY`]).
    Header(&'static str),
    /// A top-level string argument of the task (its body is a JSON object).
    Arg(String),
}

/// Why a task's rate or concurrency key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowKeyError {
    /// The header is not a string, is empty or too long.
    #[error("{0} must be a non-empty string of at most {MAX_FLOW_KEY_BYTES} bytes")]
    Header(&'static str),
    /// The argument is not a string, is empty or too long.
    #[error(
        "argument {0:?} is the key of a flow limit: it must be a non-empty string of at most \
         {MAX_FLOW_KEY_BYTES} bytes"
    )]
    Arg(String),
}

impl KeySource {
    /// Reads a key spec of the configuration: `"header"` (the header
    /// `header`) or `"arg:<name>"`; `None` for anything else.
    pub fn parse(spec: &str, header: &'static str) -> Option<KeySource> {
        if spec == "header" {
            return Some(KeySource::Header(header));
        }
        let name = spec.strip_prefix("arg:")?;
        (!name.is_empty() && name.len() <= MAX_FLOW_KEY_BYTES)
            .then(|| KeySource::Arg(name.to_owned()))
    }

    /// The hash of a task's key (see [`hash_key`]); `Ok(None)` when the
    /// task has none (no such header, or no such argument, or a body that is
    /// not a JSON object): it then shares the limit of its type's tasks
    /// without a key.
    pub fn key_of(
        &self,
        headers: Option<&FieldTable>,
        body: &[u8],
    ) -> Result<Option<String>, FlowKeyError> {
        let key = match self {
            KeySource::Header(h) => {
                if !headers.is_some_and(|t| t.inner().contains_key(*h)) {
                    return Ok(None);
                }
                crate::headers::get_str(headers, h).ok_or(FlowKeyError::Header(h))?
            }
            KeySource::Arg(name) => {
                let Ok(serde_json::Value::Object(mut args)) =
                    serde_json::from_slice::<serde_json::Value>(body)
                else {
                    return Ok(None);
                };
                match args.remove(name) {
                    None => return Ok(None),
                    Some(serde_json::Value::String(s)) => s,
                    Some(_) => return Err(FlowKeyError::Arg(name.clone())),
                }
            }
        };
        if key.is_empty() || key.len() > MAX_FLOW_KEY_BYTES {
            return Err(match self {
                KeySource::Header(h) => FlowKeyError::Header(h),
                KeySource::Arg(name) => FlowKeyError::Arg(name.clone()),
            });
        }
        Ok(Some(hash_key(&key)))
    }
}

/// `P.rate.<type>` or `P.rate.<type>.<hash>`: the window of a rate limit,
/// holding one marker per token taken, each expiring [`token_hold_ms`]
/// after it was taken.
pub fn rate_queue(names: &Names, task_type: &str, key_hash: Option<&str>) -> String {
    match key_hash {
        Some(h) => format!("{}.rate.{task_type}.{h}", names.prefix()),
        None => format!("{}.rate.{task_type}", names.prefix()),
    }
}

/// How long a token of a limit of `limit` per `per_ms` with bursts of
/// `burst` stays taken (the marker's `expiration`), in ms, rounded up:
/// `per_ms * burst / limit`. At most `burst` markers are alive at once, so
/// over a long run tokens are taken at `burst` per hold, that is `limit`
/// per `per_ms`, and never more than `burst` within any hold, so never more
/// than `limit + burst` within any `per_ms`. Inputs of 0 count as 1.
pub fn token_hold_ms(limit: u32, per_ms: u64, burst: u32) -> u64 {
    let (limit, burst) = (u128::from(limit.max(1)), u128::from(burst.max(1)));
    let held = (u128::from(per_ms.max(1)) * burst).div_ceil(limit);
    u64::try_from(held).unwrap_or(u64::MAX)
}

/// `x-expires` of a rate window: twice the hold, at least one minute, so
/// the broker deletes the window of an idle key once every marker in it has
/// expired, while a worker taking tokens declares it again well before.
pub fn rate_queue_expires_ms(hold_ms: u64) -> u64 {
    hold_ms.saturating_mul(2).max(60_000)
}

/// How long a waiting task pauses between two tries for a token of a full
/// window, in ms, before jitter: the spacing of tokens at the sustained
/// rate (`hold / burst`), at most 2% of the hold, within 5..=500 ms. A freed
/// token is taken up to a pause late, and each marker then expires that
/// much later: so the sustained rate stays within a few percent of the
/// limit, for a few tries a second per waiting worker and window.
pub fn rate_poll_ms(hold_ms: u64, burst: u32) -> u64 {
    (hold_ms / u64::from(burst.max(1)))
        .min(hold_ms / 50)
        .clamp(5, 500)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::{AMQPValue, LongString, ShortString};

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    #[test]
    fn unique_keys() {
        assert_eq!(UniqueKey::from_headers(None), Ok(None));
        assert_eq!(UniqueKey::from_headers(Some(&table(&[]))), Ok(None));
        let k = UniqueKey::from_headers(Some(&table(&[(UNIQUE_KEY, s("order-1"))])))
            .unwrap()
            .unwrap();
        assert_eq!(k.window_ms, DEFAULT_UNIQUE_MS);
        assert_eq!(k.hash.len(), 32);
        let names = Names::new("warren");
        assert_eq!(k.lock_queue(&names), format!("warren.unique.{}", k.hash));
        let short = table(&[
            (UNIQUE_KEY, s("order-1")),
            (UNIQUE_MS, AMQPValue::LongLongInt(5)),
        ]);
        assert_eq!(
            UniqueKey::from_headers(Some(&short))
                .unwrap()
                .unwrap()
                .window_ms,
            MIN_UNIQUE_MS
        );
        let long = "k".repeat(MAX_UNIQUE_KEY_BYTES + 1);
        assert_eq!(
            UniqueKey::from_headers(Some(&table(&[(UNIQUE_KEY, s(&long))]))),
            Err(UniqueError::BadKey)
        );
        assert_eq!(
            UniqueKey::from_headers(Some(&table(&[(UNIQUE_KEY, AMQPValue::LongLongInt(1))]))),
            Err(UniqueError::BadKey)
        );
        let bad_window = table(&[(UNIQUE_KEY, s("a")), (UNIQUE_MS, s("soon"))]);
        assert_eq!(
            UniqueKey::from_headers(Some(&bad_window)),
            Err(UniqueError::BadWindow)
        );
    }

    #[test]
    fn token_arithmetic() {
        // 20 per second, burst 20: a token stays taken a second.
        assert_eq!(token_hold_ms(20, 1000, 20), 1000);
        // Burst 40: two seconds, still 20 per second over a long run.
        assert_eq!(token_hold_ms(20, 1000, 40), 2000);
        // 3 per second, burst 1: rounded up, never a faster rate.
        assert_eq!(token_hold_ms(3, 1000, 1), 334);
        assert_eq!(token_hold_ms(100_000, 1, 1), 1);
        assert_eq!(token_hold_ms(1, 86_400_000, 100_000), 8_640_000_000_000);
        assert_eq!(token_hold_ms(0, 0, 0), 1);
        assert_eq!(rate_queue_expires_ms(1000), 60_000);
        assert_eq!(rate_queue_expires_ms(600_000), 1_200_000);
        assert_eq!(rate_poll_ms(1000, 20), 20);
        assert_eq!(rate_poll_ms(1000, 100), 10);
        assert_eq!(rate_poll_ms(1000, 1000), 5);
        assert_eq!(rate_poll_ms(60_000, 1), 500);
        assert_eq!(rate_poll_ms(10_000, 5), 200);
    }

    #[test]
    fn flow_keys() {
        let names = Names::new("warren");
        assert_eq!(rate_queue(&names, "http.get", None), "warren.rate.http.get");
        assert_eq!(
            rate_queue(&names, "http.get", Some("ab")),
            "warren.rate.http.get.ab"
        );
        assert_eq!(
            permit_base(&names, "http.get", Some("ab")),
            "warren.permits.http.get.ab"
        );
        assert_eq!(
            KeySource::parse("header", RATE_KEY),
            Some(KeySource::Header(RATE_KEY))
        );
        assert_eq!(
            KeySource::parse("arg:host", RATE_KEY),
            Some(KeySource::Arg("host".into()))
        );
        for bad in ["", "arg:", "Header", "args:host", "x-warren-rate-key"] {
            assert_eq!(KeySource::parse(bad, RATE_KEY), None, "{bad}");
        }
        let header = KeySource::Header(RATE_KEY);
        let with = |v: AMQPValue| table(&[(RATE_KEY, v)]);
        assert_eq!(header.key_of(None, b"{}"), Ok(None));
        assert_eq!(
            header.key_of(Some(&with(s("api.example.com"))), b"{}"),
            Ok(Some(hash_key("api.example.com")))
        );
        for bad in [s(""), s(&"k".repeat(257)), AMQPValue::LongLongInt(7)] {
            assert_eq!(
                header.key_of(Some(&with(bad)), b"{}"),
                Err(FlowKeyError::Header(RATE_KEY))
            );
        }
        let arg = KeySource::Arg("host".into());
        assert_eq!(
            arg.key_of(None, br#"{"host":"a.example"}"#),
            Ok(Some(hash_key("a.example")))
        );
        assert_eq!(arg.key_of(None, br#"{"other":1}"#), Ok(None));
        assert_eq!(arg.key_of(None, b"[1]"), Ok(None));
        assert_eq!(arg.key_of(None, b"not json"), Ok(None));
        assert_eq!(
            arg.key_of(None, br#"{"host":3}"#),
            Err(FlowKeyError::Arg("host".into()))
        );
        assert_eq!(
            arg.key_of(None, br#"{"host":""}"#),
            Err(FlowKeyError::Arg("host".into()))
        );
    }

    #[test]
    fn permit_names() {
        let names = Names::new("warren");
        assert_eq!(
            permit_queue(&names, "http.request", 2),
            "warren.permits.http.request.2"
        );
    }
}
