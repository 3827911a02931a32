//! Retry delays: exponential backoff with full jitter.
//!
//! The delay before retry number `n` (1-based) is drawn uniformly from
//! `0..=min(cap_ms, base_ms * 2^(n-1))`. Full jitter spreads retries of tasks
//! that failed together (a dependency went down) so they do not return as one
//! wave. Everything saturates instead of overflowing, so any retry number is
//! safe.

use rand::Rng;

use crate::config::RetryPolicy;

/// The largest delay retry number `retry` (1-based) may get:
/// `min(cap_ms, base_ms * 2^(retry-1))`, saturating. Retry 0 is treated as 1.
pub fn backoff_ceiling_ms(policy: &RetryPolicy, retry: u32) -> u64 {
    let doublings = retry.saturating_sub(1);
    // checked_shl fails from 2^64 on; a saturated factor then exceeds any cap
    // unless the base is zero.
    let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
    policy.base_ms.saturating_mul(factor).min(policy.cap_ms)
}

/// A delay for retry number `retry` (1-based) drawn uniformly from
/// `0..=backoff_ceiling_ms(policy, retry)`.
pub fn full_jitter_ms(policy: &RetryPolicy, retry: u32, rng: &mut impl Rng) -> u64 {
    rng.gen_range(0..=backoff_ceiling_ms(policy, retry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn policy(base_ms: u64, cap_ms: u64) -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            base_ms,
            cap_ms,
        }
    }

    #[test]
    fn ceiling_doubles_from_base() {
        let p = policy(1000, 1_000_000);
        assert_eq!(backoff_ceiling_ms(&p, 1), 1000);
        assert_eq!(backoff_ceiling_ms(&p, 2), 2000);
        assert_eq!(backoff_ceiling_ms(&p, 3), 4000);
        assert_eq!(backoff_ceiling_ms(&p, 4), 8000);
        assert_eq!(backoff_ceiling_ms(&p, 0), 1000);
    }

    #[test]
    fn ceiling_stops_at_cap() {
        let p = policy(1000, 5000);
        assert_eq!(backoff_ceiling_ms(&p, 3), 4000);
        assert_eq!(backoff_ceiling_ms(&p, 4), 5000);
        assert_eq!(backoff_ceiling_ms(&p, 10), 5000);
    }

    #[test]
    fn no_overflow_for_large_retry_numbers() {
        let p = policy(1000, 300_000);
        for retry in [30, 63, 64, 65, 200, u32::MAX] {
            assert_eq!(backoff_ceiling_ms(&p, retry), 300_000, "retry {retry}");
        }
        let huge = policy(u64::MAX / 2, u64::MAX);
        assert_eq!(backoff_ceiling_ms(&huge, 200), u64::MAX);
        assert_eq!(backoff_ceiling_ms(&policy(0, 10), 200), 0);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        let p = policy(100, 1000);
        for retry in 1..=20 {
            let ceiling = backoff_ceiling_ms(&p, retry);
            for _ in 0..200 {
                assert!(full_jitter_ms(&p, retry, &mut rng) <= ceiling);
            }
        }
        assert_eq!(full_jitter_ms(&policy(0, 0), 5, &mut rng), 0);
        // Over many draws, values spread across the range rather than sticking to one end.
        let draws: Vec<u64> = (0..1000)
            .map(|_| full_jitter_ms(&p, 10, &mut rng))
            .collect();
        assert!(draws.iter().any(|&d| d < 250));
        assert!(draws.iter().any(|&d| d > 750));
    }
}
