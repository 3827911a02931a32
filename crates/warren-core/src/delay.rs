//! Delays: reading a due time from headers and choosing delay tiers.
//!
//! A delayed task waits in durable tier queues `P.wait.<n>s` whose per-queue
//! TTL dead-letters it back to the scheduler; each hop takes the largest
//! tier that leaves at least a second, and tiers are never longer than the
//! remaining time, so a task is never released early. There is a tier for
//! every second up to 15 s, then powers of two from 16 s, so a year takes a
//! few dozen hops. Under 16 s before the due time the scheduler waits the
//! fraction of a second in process and puts the task in release tier
//! `P.release.<n>s`, whose TTL dead-letters it straight into `P.tasks` at
//! its due time: a short delay (most retries and countdowns) costs the
//! broker one tier and no trip back through the scheduler.

use amq_protocol_types::{AMQPValue, FieldTable};
use chrono::DateTime;

use crate::headers::{self, int_value};
use crate::task::InvalidTask;

/// The remaining time, in ms, that the scheduler waits in process rather than in a tier.
pub const FINAL_HOLD_MS: i64 = 1000;

/// Header carrying the absolute due time (Unix ms) while a task hops between tiers.
pub const DUE_AT: &str = "x-warren-due-at";

/// Header carrying when (Unix ms) a task's time in its wait tier is up. On
/// the replicated topology the tiers have no TTL: the scheduler takes a
/// task out of its tier once this time has passed.
pub const TIER_EXIT: &str = "x-warren-tier-exit";

/// Tiers of every whole second below this many seconds.
const FINE_TIERS_BELOW: u64 = 16;

/// Tier lengths in seconds: 1, 2, 3, … 15, then 16, 32, 64, … up to the
/// largest not above `max_delay_ms` (at least one tier).
pub fn tiers(max_delay_ms: u64) -> Vec<u64> {
    let max_s = (max_delay_ms / 1000).max(1);
    let mut out: Vec<u64> = (1..FINE_TIERS_BELOW).take_while(|t| *t <= max_s).collect();
    let mut t = FINE_TIERS_BELOW;
    while t <= max_s {
        out.push(t);
        t *= 2;
    }
    out
}

/// Release tier lengths in seconds: 1, 2, … 15 (none above the maximum delay).
/// A task enters release tier `n` exactly `n` s before it is due and the
/// broker dead-letters it into `P.tasks` when the tier's TTL runs out.
pub fn release_tiers(max_delay_ms: u64) -> Vec<u64> {
    let max_s = (max_delay_ms / 1000).max(1);
    (1..FINE_TIERS_BELOW).take_while(|t| *t <= max_s).collect()
}

/// What the scheduler does next with a task that has `remaining_ms` to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Wait the rest in process (under a second), then publish to `P.tasks`.
    Release,
    /// Wait in process until `n` s before the due time (under a second), then
    /// publish to release tier `n`, which hands the task to its work queue
    /// when due.
    ReleaseTier(u64),
    /// Publish to wait tier `n` now; it comes back to the scheduler after `n` s.
    Wait(u64),
}

/// The next hop of a task with `remaining_ms` to wait. Without
/// `release_tiers` (tasks that must get their `expiration` back on release,
/// which dead-lettering would drop) the last second is waited in process.
pub fn next_hop(remaining_ms: i64, tiers: &[u64], release_tiers: &[u64]) -> Hop {
    if release_tiers.is_empty() {
        return tier_for(remaining_ms, tiers).map_or(Hop::Release, Hop::Wait);
    }
    if remaining_ms < 1000 {
        return Hop::Release;
    }
    let whole = (remaining_ms / 1000) as u64;
    if release_tiers.contains(&whole) {
        return Hop::ReleaseTier(whole);
    }
    // Come back with at least a second left, for the release tier.
    tier_for(remaining_ms - FINAL_HOLD_MS, tiers)
        .or_else(|| tier_for(remaining_ms, tiers))
        .map_or(Hop::Release, Hop::Wait)
}

/// The tier for the next hop of a task with `remaining_ms` to wait, or `None`
/// when the rest is short enough to wait in process.
pub fn tier_for(remaining_ms: i64, tiers: &[u64]) -> Option<u64> {
    if remaining_ms <= FINAL_HOLD_MS {
        return None;
    }
    tiers
        .iter()
        .rev()
        .copied()
        .find(|t| (*t as i64).saturating_mul(1000) <= remaining_ms)
}

/// The absolute due time (Unix ms) of a task published to `P.delay`:
/// `x-warren-eta` (RFC 3339 or Unix ms) wins over `x-delay` (ms from `now_ms`).
/// Past or negative due times mean now. Neither header, an unparseable value,
/// or a due time more than `max_delay_ms` ahead make the task invalid.
pub fn due_at_ms(
    headers: Option<&FieldTable>,
    now_ms: i64,
    max_delay_ms: u64,
) -> Result<i64, InvalidTask> {
    let get = |k: &str| headers.and_then(|h| h.inner().get(k));
    let due = if let Some(eta) = get(headers::ETA) {
        parse_eta(eta)?
    } else if let Some(delay) = get(headers::DELAY) {
        let ms = int_value(delay)
            .map_err(|p| InvalidTask::new("bad_header", format!("header x-delay: {p}")))?;
        now_ms.saturating_add(ms)
    } else {
        return Err(InvalidTask::new(
            "no_delay",
            "a task on the delay exchange needs header x-delay (ms) or x-warren-eta \
             (RFC 3339 or Unix ms)",
        ));
    };
    let ahead = due.saturating_sub(now_ms);
    if ahead > max_delay_ms.min(i64::MAX as u64) as i64 {
        return Err(InvalidTask::new(
            "delay_too_long",
            format!(
                "due in {ahead} ms, beyond the maximum of {max_delay_ms} ms \
                 (scheduler.max_delay_ms)"
            ),
        ));
    }
    Ok(due.max(now_ms))
}

fn parse_eta(v: &AMQPValue) -> Result<i64, InvalidTask> {
    let text = match v {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    };
    if let Some(t) = text {
        if let Ok(dt) = DateTime::parse_from_rfc3339(t.trim()) {
            return Ok(dt.timestamp_millis());
        }
    }
    int_value(v).map_err(|_| {
        InvalidTask::new(
            "bad_header",
            "header x-warren-eta: expected an RFC 3339 time or Unix milliseconds",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::LongString;

    fn h(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    const NOW: i64 = 1_800_000_000_000;
    const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;

    #[test]
    fn tiers_are_every_second_to_15_then_powers_of_two_up_to_the_maximum() {
        assert_eq!(tiers(4_000), vec![1, 2, 3, 4]);
        assert_eq!(tiers(0), vec![1]);
        assert_eq!(tiers(40_000)[13..], [14, 15, 16, 32]);
        let t = tiers(10 * YEAR_MS);
        assert_eq!(*t.last().unwrap(), 1 << 28);
        assert_eq!(t.len(), 15 + 25);
    }

    #[test]
    fn a_delay_under_16_seconds_takes_one_hop() {
        let t = tiers(10 * YEAR_MS);
        for r in (1001i64..16_000).step_by(7) {
            let tier = tier_for(r, &t).unwrap();
            assert!(r - (tier as i64) * 1000 <= FINAL_HOLD_MS, "{r}");
        }
    }

    #[test]
    fn the_largest_fitting_tier_is_chosen_and_never_exceeds_the_rest() {
        let t = tiers(10 * YEAR_MS);
        assert_eq!(tier_for(1000, &t), None);
        assert_eq!(tier_for(-5, &t), None);
        assert_eq!(tier_for(1001, &t), Some(1));
        assert_eq!(tier_for(2000, &t), Some(2));
        assert_eq!(tier_for(3999, &t), Some(3));
        assert_eq!(tier_for(20_000, &t), Some(16));
        assert_eq!(tier_for(YEAR_MS as i64, &t), Some(1 << 24));
        for r in [1001i64, 1500, 7777, 123_456, 99_999_999] {
            let tier = tier_for(r, &t).unwrap();
            assert!((tier as i64) * 1000 <= r, "{r}");
            assert!(
                (tier as i64) * 2000 > r || tier == *t.last().unwrap(),
                "{r}"
            );
        }
    }

    #[test]
    fn under_16_seconds_a_task_waits_under_a_second_then_takes_its_release_tier() {
        let (t, r) = (tiers(10 * YEAR_MS), release_tiers(10 * YEAR_MS));
        assert_eq!(r, (1..=15).collect::<Vec<u64>>());
        assert_eq!(next_hop(-5, &t, &r), Hop::Release);
        assert_eq!(next_hop(999, &t, &r), Hop::Release);
        assert_eq!(next_hop(1000, &t, &r), Hop::ReleaseTier(1));
        assert_eq!(next_hop(15_999, &t, &r), Hop::ReleaseTier(15));
        for rem in (1000i64..16_000).step_by(7) {
            let Hop::ReleaseTier(n) = next_hop(rem, &t, &r) else {
                panic!("{rem}");
            };
            // Entered no earlier than n s before due: never early, and the
            // in-process wait before it is under a second.
            let wait = rem - n as i64 * 1000;
            assert!((0..1000).contains(&wait), "{rem}");
        }
    }

    #[test]
    fn longer_waits_hop_through_wait_tiers_and_come_back_with_a_second_to_spare() {
        let (t, r) = (tiers(10 * YEAR_MS), release_tiers(10 * YEAR_MS));
        assert_eq!(next_hop(16_000, &t, &r), Hop::Wait(15));
        assert_eq!(next_hop(17_000, &t, &r), Hop::Wait(16));
        assert_eq!(next_hop(40_000, &t, &r), Hop::Wait(32));
        for rem in [16_000i64, 16_999, 20_000, 123_456, YEAR_MS as i64] {
            let Hop::Wait(n) = next_hop(rem, &t, &r) else {
                panic!("{rem}");
            };
            assert!(rem - n as i64 * 1000 >= 1000, "{rem}");
        }
        // A short maximum has short release tiers too.
        let (t, r) = (tiers(4_000), release_tiers(4_000));
        assert_eq!(r, vec![1, 2, 3, 4]);
        assert_eq!(next_hop(4_500, &t, &r), Hop::ReleaseTier(4));
        assert_eq!(next_hop(5_500, &t, &r), Hop::Wait(4));
    }

    #[test]
    fn without_release_tiers_the_last_second_is_waited_in_process() {
        let t = tiers(10 * YEAR_MS);
        assert_eq!(next_hop(1000, &t, &[]), Hop::Release);
        assert_eq!(next_hop(2500, &t, &[]), Hop::Wait(2));
        assert_eq!(next_hop(20_000, &t, &[]), Hop::Wait(16));
    }

    #[test]
    fn x_delay_counts_from_now_and_eta_wins() {
        let d = h(&[("x-delay", AMQPValue::LongInt(5000))]);
        assert_eq!(due_at_ms(Some(&d), NOW, YEAR_MS).unwrap(), NOW + 5000);
        let d = h(&[("x-delay", AMQPValue::LongString(LongString::from("250")))]);
        assert_eq!(due_at_ms(Some(&d), NOW, YEAR_MS).unwrap(), NOW + 250);
        let both = h(&[
            ("x-delay", AMQPValue::LongInt(5000)),
            ("x-warren-eta", AMQPValue::LongLongInt(NOW + 9000)),
        ]);
        assert_eq!(due_at_ms(Some(&both), NOW, YEAR_MS).unwrap(), NOW + 9000);
    }

    #[test]
    fn eta_accepts_rfc3339_and_unix_ms() {
        let rfc = h(&[(
            "x-warren-eta",
            AMQPValue::LongString("2027-01-15T10:00:00.250Z".into()),
        )]);
        let expect = DateTime::parse_from_rfc3339("2027-01-15T10:00:00.250Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(due_at_ms(Some(&rfc), NOW, 10 * YEAR_MS).unwrap(), expect);
        let digits = h(&[(
            "x-warren-eta",
            AMQPValue::LongString(format!("{}", NOW + 42).into()),
        )]);
        assert_eq!(due_at_ms(Some(&digits), NOW, YEAR_MS).unwrap(), NOW + 42);
    }

    #[test]
    fn past_zero_and_negative_mean_now() {
        for v in [
            ("x-delay", AMQPValue::LongInt(0)),
            ("x-delay", AMQPValue::LongInt(-5000)),
            ("x-warren-eta", AMQPValue::LongLongInt(NOW - 1)),
            (
                "x-warren-eta",
                AMQPValue::LongString("2001-01-01T00:00:00Z".into()),
            ),
        ] {
            assert_eq!(
                due_at_ms(Some(&h(std::slice::from_ref(&v))), NOW, YEAR_MS).unwrap(),
                NOW,
                "{v:?}"
            );
        }
    }

    #[test]
    fn missing_unparseable_or_too_far_is_invalid() {
        assert_eq!(due_at_ms(None, NOW, YEAR_MS).unwrap_err().code, "no_delay");
        let bad = h(&[("x-delay", AMQPValue::LongString("soon".into()))]);
        assert_eq!(
            due_at_ms(Some(&bad), NOW, YEAR_MS).unwrap_err().code,
            "bad_header"
        );
        let bad = h(&[("x-warren-eta", AMQPValue::LongString("tomorrow".into()))]);
        assert_eq!(
            due_at_ms(Some(&bad), NOW, YEAR_MS).unwrap_err().code,
            "bad_header"
        );
        let bad = h(&[("x-delay", AMQPValue::Double(1.5))]);
        assert!(due_at_ms(Some(&bad), NOW, YEAR_MS).is_err());
        let far = h(&[("x-delay", AMQPValue::LongLongInt(2 * YEAR_MS as i64))]);
        assert_eq!(
            due_at_ms(Some(&far), NOW, YEAR_MS).unwrap_err().code,
            "delay_too_long"
        );
        let max = h(&[("x-delay", AMQPValue::LongLongInt(i64::MAX))]);
        assert!(due_at_ms(Some(&max), NOW, YEAR_MS).is_err(), "no overflow");
    }
}
