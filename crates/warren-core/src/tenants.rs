//! Tenant fairness (contract section 9): tasks carrying `x-warren-tenant`
//! are served round-robin across tenants within a work queue.
//!
//! A work queue with `[[queues]] tenants = true` stays the entry: producers
//! publish as before. A worker reading a task with a tenant there moves it
//! (a confirmed copy, then the ack) to the tenant's queue
//! `P.q.<name>.tenant.<hash>`, `hash` the first 32 hex digits of the SHA-256
//! of the tenant's bytes. Every worker consumes every tenant queue with a
//! small prefetch, so the broker hands it tasks from each tenant in turn.
//!
//! Workers learn the tenant queues from the directory `P.q.<name>.tenants`,
//! a stream each worker reads from its first record: a record is the text
//! of a hash, or `overflow`. The first [`Directory::max`] distinct hashes in
//! the stream's order are admitted, the same for every reader; a tenant
//! whose hash comes later shares `P.q.<name>.tenant.overflow`. So a work
//! queue never has more than `tenants_max` tenant queues, plus the overflow,
//! whatever tenants an attacker sends.

use std::collections::HashSet;

use amq_protocol_types::{AMQPValue, FieldTable};
use sha2::{Digest, Sha256};

use crate::names::Names;

/// Header: the tenant a task belongs to, a string of 1..=256 bytes.
pub const TENANT: &str = "x-warren-tenant";

/// Longest tenant accepted, in bytes.
pub const MAX_TENANT_BYTES: usize = 256;

/// Tenant queues a work queue gets when `[[queues]] tenants_max` is not set.
pub const DEFAULT_TENANTS_MAX: u32 = 1000;

/// The most tenant queues a work queue may be configured for.
pub const MAX_TENANTS_MAX: u32 = 100_000;

/// The directory record, and queue suffix, of the shared overflow queue.
pub const OVERFLOW: &str = "overflow";

/// Why a task's tenant cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("x-warren-tenant must be a non-empty string of at most {MAX_TENANT_BYTES} bytes")]
pub struct BadTenant;

/// The hash of a task's tenant: `Ok(None)` when it has none.
pub fn tenant_hash(h: Option<&FieldTable>) -> Result<Option<String>, BadTenant> {
    let Some(v) = h.and_then(|t| t.inner().get(TENANT)) else {
        return Ok(None);
    };
    let bytes: &[u8] = match v {
        AMQPValue::ShortString(s) => s.as_str().as_bytes(),
        AMQPValue::LongString(s) => s.as_bytes(),
        _ => return Err(BadTenant),
    };
    if bytes.is_empty() || bytes.len() > MAX_TENANT_BYTES {
        return Err(BadTenant);
    }
    Ok(Some(hash_tenant(bytes)))
}

/// True if the task carries the tenant header at all (valid or not).
pub fn has_tenant(h: Option<&FieldTable>) -> bool {
    h.is_some_and(|t| t.inner().contains_key(TENANT))
}

/// 32 hex digits of the SHA-256 of a tenant's bytes (as unique keys are
/// hashed): distinct tenants get distinct queues short of a 128-bit
/// collision, which no one can find on purpose.
pub fn hash_tenant(tenant: &[u8]) -> String {
    let digest = Sha256::digest(tenant);
    hex::encode(&digest[..16])
}

/// `P.q.<name>.tenants`: the directory stream of a work queue's tenant
/// queues.
pub fn directory(names: &Names, short: &str) -> String {
    format!("{}.tenants", names.work_queue(short))
}

/// `P.q.<name>.tenant.<slot>`: a tenant queue (`slot` a hash) or the
/// overflow queue (`slot` = [`OVERFLOW`]).
pub fn tenant_queue(names: &Names, short: &str, slot: &str) -> String {
    format!("{}.tenant.{slot}", names.work_queue(short))
}

/// The longest name a work queue with tenants declares (a tenant queue's).
pub fn longest_tenant_queue(names: &Names, short: &str) -> String {
    tenant_queue(names, short, &"0".repeat(32))
}

/// A directory record read: the slot it names, if it is one (32 lowercase
/// hex digits, or `overflow`). Anything else is skipped, so no record can
/// make a worker consume a queue it did not name itself.
pub fn parse_record(body: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(body).ok()?.trim();
    let hash = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (hash || s == OVERFLOW).then(|| s.to_owned())
}

/// What a worker knows of one work queue's directory, in stream order.
#[derive(Debug, Clone)]
pub struct Directory {
    max: usize,
    /// Admitted hashes: the first `max` distinct ones seen. Those seen
    /// later are not kept (they all go to the overflow), so a directory
    /// flooded with records costs no more memory than `max` hashes.
    admitted: HashSet<String>,
    /// Whether the overflow queue is listed.
    overflow: bool,
}

/// Where a tenant's tasks go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Its own queue, admitted.
    Own,
    /// The overflow queue: its hash came past the cap, or the cap is
    /// reached.
    Overflow,
    /// Not read yet and room left: append its record and read it back.
    Unknown,
}

/// What reading one record changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Learned {
    /// Nothing: a duplicate or a record that names no slot.
    Nothing,
    /// A slot to consume from now on: a hash admitted, or the overflow.
    Consume(String),
    /// A hash past the cap (or read again past it): its tenant's tasks go
    /// to the overflow.
    Refused(String),
}

impl Directory {
    /// An empty directory admitting `max` tenant queues (at least 1).
    pub fn new(max: u32) -> Self {
        Directory {
            max: (max as usize).max(1),
            admitted: HashSet::new(),
            overflow: false,
        }
    }

    /// How many tenant queues it admits.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Reads the next record of the stream.
    pub fn learn(&mut self, body: &[u8]) -> Learned {
        let Some(slot) = parse_record(body) else {
            return Learned::Nothing;
        };
        if slot == OVERFLOW {
            if self.overflow {
                return Learned::Nothing;
            }
            self.overflow = true;
            return Learned::Consume(slot);
        }
        if self.admitted.contains(&slot) {
            return Learned::Nothing;
        }
        if self.admitted.len() < self.max {
            self.admitted.insert(slot.clone());
            Learned::Consume(slot)
        } else {
            Learned::Refused(slot)
        }
    }

    /// Where a tenant's tasks go, as far as read.
    pub fn place(&self, hash: &str) -> Place {
        if self.admitted.contains(hash) {
            Place::Own
        } else if self.admitted.len() >= self.max {
            Place::Overflow
        } else {
            Place::Unknown
        }
    }

    /// Whether the overflow queue is listed.
    pub fn has_overflow(&self) -> bool {
        self.overflow
    }

    /// Whether a hash's place is settled: it is admitted, or the cap is
    /// reached (every hash not admitted goes to the overflow).
    pub fn knows(&self, hash: &str) -> bool {
        self.admitted.contains(hash) || self.admitted.len() >= self.max
    }

    /// How many tenant queues are admitted.
    pub fn admitted(&self) -> usize {
        self.admitted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::{LongString, ShortString};

    fn with(v: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(ShortString::from(TENANT), v);
        t
    }

    #[test]
    fn tenants_hash_exactly_and_bad_ones_are_refused() {
        let a = tenant_hash(Some(&with(AMQPValue::LongString(LongString::from("acme")))))
            .unwrap()
            .unwrap();
        assert_eq!(a, hash_tenant(b"acme"));
        assert_eq!(a.len(), 32);
        let short = tenant_hash(Some(&with(AMQPValue::ShortString("acme".into()))));
        assert_eq!(short, Ok(Some(a.clone())), "short and long strings agree");
        let b = hash_tenant(b"acmf");
        assert_ne!(a, b);
        // Bytes, not lossy text: two invalid UTF-8 tenants stay apart.
        assert_ne!(hash_tenant(&[0xff, 0x01]), hash_tenant(&[0xfe, 0x01]));
        assert_eq!(tenant_hash(None), Ok(None));
        assert_eq!(tenant_hash(Some(&FieldTable::default())), Ok(None));
        assert!(!has_tenant(Some(&FieldTable::default())));
        for bad in [
            AMQPValue::LongString(LongString::from("")),
            AMQPValue::LongString(LongString::from("t".repeat(MAX_TENANT_BYTES + 1))),
            AMQPValue::LongLongInt(7),
            AMQPValue::Boolean(true),
        ] {
            let h = with(bad);
            assert!(has_tenant(Some(&h)));
            assert_eq!(tenant_hash(Some(&h)), Err(BadTenant));
        }
        let longest = "t".repeat(MAX_TENANT_BYTES);
        assert!(
            tenant_hash(Some(&with(AMQPValue::LongString(LongString::from(
                longest
            )))))
            .unwrap()
            .is_some()
        );
    }

    #[test]
    fn names() {
        let n = Names::new("acme");
        assert_eq!(directory(&n, "io"), "acme.q.io.tenants");
        assert_eq!(tenant_queue(&n, "io", "ab"), "acme.q.io.tenant.ab");
        assert_eq!(
            tenant_queue(&n, "io", OVERFLOW),
            "acme.q.io.tenant.overflow"
        );
        assert_eq!(
            longest_tenant_queue(&n, "io").len(),
            "acme.q.io.tenant.".len() + 32
        );
        assert_eq!(
            n.short_queue_name(&tenant_queue(&n, "io", "ab")),
            Some("io")
        );
    }

    #[test]
    fn records_name_slots_only() {
        let h = hash_tenant(b"x");
        assert_eq!(parse_record(h.as_bytes()), Some(h.clone()));
        assert_eq!(parse_record(b"overflow"), Some("overflow".into()));
        assert_eq!(parse_record(h.to_uppercase().as_bytes()), None);
        assert_eq!(parse_record(b"../../other"), None);
        assert_eq!(parse_record(&h.as_bytes()[..31]), None);
        assert_eq!(parse_record(&[0xff; 32]), None);
    }

    #[test]
    fn the_first_max_distinct_hashes_are_admitted_the_rest_overflow() {
        let hs: Vec<String> = (0..5)
            .map(|i| hash_tenant(format!("t{i}").as_bytes()))
            .collect();
        let mut d = Directory::new(3);
        assert_eq!(d.place(&hs[0]), Place::Unknown, "room left: append it");
        assert_eq!(d.learn(hs[0].as_bytes()), Learned::Consume(hs[0].clone()));
        assert_eq!(d.learn(hs[0].as_bytes()), Learned::Nothing, "duplicate");
        assert_eq!(d.learn(b"junk"), Learned::Nothing);
        assert_eq!(d.learn(hs[1].as_bytes()), Learned::Consume(hs[1].clone()));
        assert_eq!(d.place(&hs[2]), Place::Unknown);
        // Two workers raced for the last place: stream order decides, the
        // same for every reader.
        assert_eq!(d.learn(hs[2].as_bytes()), Learned::Consume(hs[2].clone()));
        assert_eq!(d.learn(hs[3].as_bytes()), Learned::Refused(hs[3].clone()));
        assert_eq!(d.learn(hs[3].as_bytes()), Learned::Refused(hs[3].clone()));
        assert_eq!(d.admitted(), 3);
        assert_eq!(d.place(&hs[0]), Place::Own);
        assert_eq!(d.place(&hs[2]), Place::Own);
        assert_eq!(d.place(&hs[3]), Place::Overflow);
        assert_eq!(d.place(&hs[4]), Place::Overflow, "full: never appended");
        assert!(
            d.knows(&hs[3]) && d.knows(&hs[4]),
            "full: every place is settled"
        );
        let mut fresh = Directory::new(3);
        fresh.learn(hs[0].as_bytes());
        assert!(fresh.knows(&hs[0]) && !fresh.knows(&hs[1]));
        assert!(!d.has_overflow());
        assert_eq!(d.learn(b"overflow"), Learned::Consume(OVERFLOW.into()));
        assert_eq!(d.learn(b"overflow"), Learned::Nothing);
        assert!(d.has_overflow());
        // Every reader of the same stream agrees, whatever it read before.
        let mut other = Directory::new(3);
        for h in [&hs[0], &hs[1], &hs[0], &hs[2], &hs[3]] {
            other.learn(h.as_bytes());
        }
        for h in &hs {
            assert_eq!(other.place(h), d.place(h));
        }
        assert_eq!(Directory::new(0).max(), 1);
    }
}
