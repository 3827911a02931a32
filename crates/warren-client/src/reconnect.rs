//! The one reconnect loop every long-running role uses: sessions on the
//! broker, retried with capped, jittered exponential backoff that starts over
//! once a session got going.

use std::fmt::Display;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The first wait after a lost session, and the wait after a session that
/// got going.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The state of a reconnect loop; every long-running role drives its
/// sessions with one:
///
/// ```ignore
/// let mut retry = Reconnect::new("worker", max_backoff);
/// while retry.ready(&shutdown).await {
///     match session(&mut retry).await {   // calls retry.up() once working
///         Ok(()) => break,                // ended on purpose
///         Err(e) => retry.lost(&e),
///     }
/// }
/// ```
#[derive(Debug)]
pub struct Reconnect {
    role: &'static str,
    max: Duration,
    delay: Duration,
    /// Whether the first session has started (no wait before it).
    started: bool,
    /// Whether the current session reported itself working.
    up: bool,
}

impl Reconnect {
    /// A loop for `role` (named in its log lines) whose waits grow to `max`.
    pub fn new(role: &'static str, max: Duration) -> Self {
        Reconnect {
            role,
            max,
            delay: FIRST_RETRY,
            started: false,
            up: false,
        }
    }

    /// Waits before the next session: not at all before the first, then a
    /// jittered wait that doubles after each loss, up to the cap, and starts
    /// over after a session that was [`up`](Reconnect::up). False when
    /// `shutdown` is (or becomes) cancelled: stop looping.
    pub async fn ready(&mut self, shutdown: &CancellationToken) -> bool {
        if shutdown.is_cancelled() {
            return false;
        }
        if !self.started {
            self.started = true;
            return true;
        }
        if std::mem::take(&mut self.up) {
            self.delay = FIRST_RETRY;
        }
        let wait = jittered(self.delay, &mut rand::thread_rng());
        self.delay = next_delay(self.delay, self.max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => !shutdown.is_cancelled(),
            _ = shutdown.cancelled() => false,
        }
    }

    /// The session is connected and working: the next loss waits
    /// [`FIRST_RETRY`] again.
    pub fn up(&mut self) {
        self.up = true;
    }

    /// Whether the current session reported itself working.
    pub fn was_up(&self) -> bool {
        self.up
    }

    /// The session was lost: logs `<role> lost the broker; reconnecting`.
    pub fn lost(&self, error: &dyn Display) {
        let retry_in = if self.up { FIRST_RETRY } else { self.delay };
        warn!(error = %error, ?retry_in, "{} lost the broker; reconnecting", self.role);
    }
}

/// The wait after `current`: doubled, at most `max` (and never below
/// [`FIRST_RETRY`], so a cap of 0 cannot make a tight loop).
fn next_delay(current: Duration, max: Duration) -> Duration {
    (current * 2).min(max.max(FIRST_RETRY))
}

/// A wait drawn uniformly from `[delay / 2, delay]`, so a fleet that lost
/// the broker together does not come back in lockstep.
fn jittered(delay: Duration, rng: &mut impl Rng) -> Duration {
    rng.gen_range(delay / 2..=delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn delays_double_up_to_the_cap_and_a_zero_cap_is_not_a_tight_loop() {
        let max = Duration::from_millis(1_000);
        let mut d = FIRST_RETRY;
        let mut seen = vec![d];
        for _ in 0..6 {
            d = next_delay(d, max);
            seen.push(d);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1_000, 1_000, 1_000]);
        assert_eq!(next_delay(FIRST_RETRY, Duration::ZERO), FIRST_RETRY);
    }

    #[test]
    fn jitter_stays_within_half_to_whole() {
        let mut rng = rand::thread_rng();
        let d = Duration::from_millis(800);
        for _ in 0..1_000 {
            let j = jittered(d, &mut rng);
            assert!(j >= d / 2 && j <= d, "{j:?}");
        }
    }

    /// Sessions that fail at once, except that the fourth gets going first:
    /// the waits grow, start over after the fourth, and stop at the cap.
    #[tokio::test(start_paused = true)]
    async fn backoff_grows_resets_after_a_good_session_and_ends_on_ok() {
        let started = Instant::now();
        let shutdown = CancellationToken::new();
        let mut at = Vec::new();
        let mut retry = Reconnect::new("test", Duration::from_millis(400));
        while retry.ready(&shutdown).await {
            at.push(started.elapsed());
            let outcome: Result<(), &str> = match at.len() {
                4 => {
                    retry.up();
                    Err("lost after working")
                }
                9 => Ok(()),
                _ => Err("refused"),
            };
            match outcome {
                Ok(()) => break,
                Err(e) => retry.lost(&e),
            }
        }
        assert_eq!(at.len(), 9, "stopped at the first Ok");
        assert_eq!(at[0], Duration::ZERO, "no wait before the first session");
        let waits: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // Upper bounds of each wait (jitter takes half to all of it).
        let bounds = [100, 200, 400, 100, 200, 400, 400, 400];
        for (w, ms) in waits.iter().zip(bounds) {
            let b = Duration::from_millis(ms);
            assert!(
                *w >= b / 2 && *w <= b,
                "wait {w:?} outside [{:?}, {b:?}]",
                b / 2
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_wait_between_sessions() {
        let shutdown = CancellationToken::new();
        let mut retry = Reconnect::new("test", Duration::from_secs(3600));
        let mut sessions = 0;
        while retry.ready(&shutdown).await {
            sessions += 1;
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                stop.cancel();
            });
            retry.lost(&"refused");
            // Lose many in a row: the waits reach the hour-long cap, and
            // the cancel ends the wait it falls in.
            for _ in 0..20 {
                retry.delay = next_delay(retry.delay, retry.max);
            }
        }
        assert_eq!(sessions, 1);
        assert!(shutdown.is_cancelled());
        assert!(!retry.ready(&shutdown).await, "stays stopped");
    }
}
