//! What the dashboard's charts draw: per 10-second bucket, the outcomes
//! the tracker stored per task type (succeeded, failed, dead) and the
//! enqueue→start waits of first attempts, for the last half hour, in
//! memory (a restarted tracker starts an empty timeline; the database keeps
//! every event).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::store::BatchReport;

/// Width of a bucket.
pub const BUCKET_MS: i64 = 10_000;

/// Buckets kept: half an hour.
const BUCKETS: usize = 180;

/// Most waits kept per bucket for its percentiles (a uniform sample
/// beyond that would need more state than a dashboard deserves: the first
/// ones are kept).
const MAX_WAITS: usize = 4_000;

#[derive(Debug, Default)]
struct Bucket {
    start_ms: i64,
    /// type -> [succeeded, failed, dead]
    outcomes: BTreeMap<String, [u64; 3]>,
    waits: Vec<i64>,
    waits_seen: u64,
}

/// The last half hour of outcomes and waits.
#[derive(Debug, Default)]
pub struct Timeline {
    buckets: Mutex<VecDeque<Bucket>>,
}

impl Timeline {
    /// Adds what a committed batch stored, at `now_ms`.
    pub fn record(&self, report: &BatchReport, now_ms: i64) {
        let start = now_ms - now_ms.rem_euclid(BUCKET_MS);
        let mut buckets = self.buckets.lock().expect("not poisoned");
        if buckets.back().is_none_or(|b| b.start_ms < start) {
            buckets.push_back(Bucket {
                start_ms: start,
                ..Bucket::default()
            });
        }
        while buckets
            .front()
            .is_some_and(|b| b.start_ms <= start - BUCKETS as i64 * BUCKET_MS)
        {
            buckets.pop_front();
        }
        let b = buckets.back_mut().expect("pushed above");
        for ((state, t), n) in &report.ingested {
            let slot = match state.as_str() {
                "succeeded" => 0,
                "failed" => 1,
                "dead" => 2,
                _ => continue,
            };
            b.outcomes.entry(t.clone()).or_default()[slot] += n;
        }
        for (_, ms) in &report.waits {
            b.waits_seen += 1;
            if b.waits.len() < MAX_WAITS {
                b.waits.push(*ms);
            }
        }
    }

    /// Every bucket of the last half hour up to `now_ms`, empty ones
    /// included, oldest first, as the API shows them.
    pub fn view(&self, now_ms: i64) -> Value {
        let end = now_ms - now_ms.rem_euclid(BUCKET_MS);
        let first = end - (BUCKETS as i64 - 1) * BUCKET_MS;
        let buckets = self.buckets.lock().expect("not poisoned");
        let mut out = Vec::with_capacity(BUCKETS);
        let mut types = std::collections::BTreeSet::new();
        let mut kept = buckets.iter().peekable();
        let mut at = first;
        while at <= end {
            while kept.peek().is_some_and(|b| b.start_ms < at) {
                kept.next();
            }
            let b = kept.peek().filter(|b| b.start_ms == at);
            let outcomes: BTreeMap<&str, Value> = b
                .map(|b| {
                    b.outcomes
                        .iter()
                        .map(|(t, [s, f, d])| {
                            types.insert(t.clone());
                            (t.as_str(), json!({"succeeded": s, "failed": f, "dead": d}))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let wait = b
                .filter(|b| !b.waits.is_empty())
                .map(|b| {
                    let mut w = b.waits.clone();
                    w.sort_unstable();
                    json!({
                        "n": b.waits_seen,
                        "p50": percentile(&w, 50),
                        "p90": percentile(&w, 90),
                        "p99": percentile(&w, 99),
                        "max": w.last(),
                    })
                })
                .unwrap_or(Value::Null);
            out.push(json!({
                "at": crate::record::format_ms(at),
                "types": outcomes,
                "wait_ms": wait,
            }));
            at += BUCKET_MS;
        }
        json!({"bucket_ms": BUCKET_MS, "types": types, "buckets": out})
    }
}

/// The `p`th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[i64], p: usize) -> i64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_waits_land_in_their_bucket() {
        let t = Timeline::default();
        let mut r = BatchReport::default();
        r.ingested.insert(("succeeded".into(), "a.b".into()), 3);
        r.ingested.insert(("dead".into(), "a.b".into()), 1);
        r.ingested.insert(("started".into(), "a.b".into()), 4);
        r.waits = (1..=100).map(|ms| ("a.b".to_owned(), ms)).collect();
        let now = 1_000_000_000;
        t.record(&r, now);
        t.record(&r, now + BUCKET_MS);
        let v = t.view(now + BUCKET_MS + 1);
        let buckets = v["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), BUCKETS);
        let last = &buckets[BUCKETS - 1];
        assert_eq!(last["types"]["a.b"]["succeeded"], 3);
        assert_eq!(last["types"]["a.b"]["dead"], 1);
        assert_eq!(last["wait_ms"]["p50"], 50);
        assert_eq!(last["wait_ms"]["p99"], 99);
        assert_eq!(buckets[BUCKETS - 2]["types"]["a.b"]["failed"], 0);
        assert!(buckets[0]["wait_ms"].is_null());
        assert_eq!(v["types"][0], "a.b");
        // Half an hour later, both have gone.
        let later = now + BUCKETS as i64 * BUCKET_MS * 2;
        t.record(&BatchReport::default(), later);
        assert_eq!(t.buckets.lock().unwrap().len(), 1);
        assert!(t.view(later)["types"].as_array().unwrap().is_empty());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[1, 2, 3, 4], 50), 2);
        assert_eq!(percentile(&[1, 2, 3, 4], 99), 4);
    }
}
