//! Fleet-wide flow control kept in the broker (contract section 9): the
//! names of the permit queues of global concurrency limits, and the unique
//! keys of tasks with the names of their lock queues.

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
    format!("{}.permits.{task_type}.{k}", names.prefix())
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
    fn permit_names() {
        let names = Names::new("warren");
        assert_eq!(
            permit_queue(&names, "http.request", 2),
            "warren.permits.http.request.2"
        );
    }
}
