//! What a scheduler counts, exposed on `/metrics` and `/readyz`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use warren_ops::{BrokerLink, Exposition, Histogram, Probe, LATENESS_BUCKETS};

/// A scheduler's counters and gauges.
#[derive(Debug)]
pub(crate) struct SchedulerMetrics {
    inner: Mutex<Inner>,
    scheduled: AtomicU64,
    hops: AtomicU64,
    released: AtomicU64,
    release_tier: AtomicU64,
    cancelled: AtomicU64,
    held: AtomicI64,
    /// Consuming, caught up with cancels, reconnects.
    pub(crate) link: BrokerLink,
    cron_leader: AtomicBool,
    pause_records_renewed: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    lateness: Histogram,
    dead: BTreeMap<&'static str, u64>,
    cron_fires: BTreeMap<String, u64>,
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        SchedulerMetrics {
            inner: Mutex::new(Inner {
                lateness: Histogram::new(LATENESS_BUCKETS),
                dead: BTreeMap::new(),
                cron_fires: BTreeMap::new(),
            }),
            scheduled: AtomicU64::new(0),
            hops: AtomicU64::new(0),
            released: AtomicU64::new(0),
            release_tier: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            held: AtomicI64::new(0),
            link: BrokerLink::default(),
            cron_leader: AtomicBool::new(false),
            pause_records_renewed: AtomicU64::new(0),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

impl SchedulerMetrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A delayed task (or a retry) entered the delay path.
    pub(crate) fn scheduled(&self) {
        bump(&self.scheduled);
    }

    /// A task left a wait tier.
    pub(crate) fn hop(&self) {
        bump(&self.hops);
    }

    /// A due task was published to `P.tasks`, `late_ms` after its due time.
    pub(crate) fn released(&self, late_ms: i64) {
        bump(&self.released);
        let late = late_ms.max(0) as f64 / 1000.0;
        self.with(|m| m.lateness.observe(late));
    }

    /// A task entered its release tier, which hands it to `P.tasks` when due.
    pub(crate) fn release_tier(&self) {
        bump(&self.release_tier);
    }

    /// A waiting task was dropped by a cancel command.
    pub(crate) fn cancelled(&self) {
        bump(&self.cancelled);
    }

    /// A task was parked in `P.dead` by the scheduler.
    pub(crate) fn dead(&self, reason: &'static str) {
        self.with(|m| *m.dead.entry(reason).or_default() += 1);
    }

    /// A task starts (`+1`) or ends (`-1`) its wait in process (under a
    /// second, before its release or its release tier).
    pub(crate) fn held(&self, delta: i64) {
        self.held.fetch_add(delta, Ordering::Relaxed);
    }

    /// This process leads cron (or stopped leading).
    /// Pause and resume records re-published to keep them in the stream.
    pub(crate) fn pause_records_renewed(&self, n: u64) {
        self.pause_records_renewed.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn cron_leader(&self, on: bool) {
        self.cron_leader.store(on, Ordering::Relaxed);
    }

    /// A cron schedule fired.
    pub(crate) fn cron_fired(&self, schedule: &str) {
        self.with(|m| *m.cron_fires.entry(schedule.to_owned()).or_default() += 1);
    }
}

impl Probe for SchedulerMetrics {
    fn metrics(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let flag = |a: &AtomicBool| f64::from(u8::from(a.load(Ordering::Relaxed)));
        let mut e = Exposition::new();
        e.single(
            "warren_scheduler_delayed_total",
            "counter",
            "Delayed tasks and retries taken into the delay path.",
            load(&self.scheduled),
        );
        e.single(
            "warren_scheduler_hops_total",
            "counter",
            "Times a waiting task left a wait tier for its next hop.",
            load(&self.hops),
        );
        e.single(
            "warren_scheduler_released_total",
            "counter",
            "Due tasks the scheduler published to P.tasks itself.",
            load(&self.released),
        );
        e.single(
            "warren_scheduler_release_tier_total",
            "counter",
            "Tasks put in a release tier, which hands them to P.tasks when due.",
            load(&self.release_tier),
        );
        e.single(
            "warren_scheduler_cancelled_total",
            "counter",
            "Waiting tasks dropped by a cancel command.",
            load(&self.cancelled),
        );
        e.single(
            "warren_scheduler_held_tasks",
            "gauge",
            "Tasks waiting in process (under a second) before their release or release tier.",
            self.held.load(Ordering::Relaxed) as f64,
        );
        self.with(|m| {
            e.family(
                "warren_scheduler_release_lateness_seconds",
                "histogram",
                "How long after its due time each delayed task was published (never early).",
            );
            e.histogram(
                "warren_scheduler_release_lateness_seconds",
                &[],
                &m.lateness,
            );
            e.family(
                "warren_scheduler_dead_total",
                "counter",
                "Tasks the scheduler parked in P.dead, by reason.",
            );
            for (reason, n) in &m.dead {
                e.sample(
                    "warren_scheduler_dead_total",
                    &[("reason", reason)],
                    *n as f64,
                );
            }
            e.family(
                "warren_scheduler_cron_fires_total",
                "counter",
                "Cron tasks published by this scheduler, by schedule.",
            );
            for (name, n) in &m.cron_fires {
                e.sample(
                    "warren_scheduler_cron_fires_total",
                    &[("schedule", name)],
                    *n as f64,
                );
            }
        });
        e.single(
            "warren_scheduler_cron_leader",
            "gauge",
            "1 while this scheduler holds the cron leader lock.",
            flag(&self.cron_leader),
        );
        e.single(
            "warren_scheduler_pause_records_renewed_total",
            "counter",
            "Pause and resume records this scheduler re-published to P.control so the cancels stream keeps them.",
            self.pause_records_renewed.load(Ordering::Relaxed) as f64,
        );
        self.link.write(
            &mut e,
            "warren_scheduler",
            "1 while consuming the intake queues.",
        );
        e.finish()
    }

    fn checks(&self) -> Vec<(&'static str, bool)> {
        self.link.checks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_lateness_dead_and_cron_are_exposed() {
        let m = SchedulerMetrics::default();
        m.scheduled();
        m.hop();
        m.released(3);
        m.released(-5);
        m.dead("expired");
        m.cron_fired("nightly");
        m.held(2);
        m.held(-1);
        let text = m.metrics();
        for line in [
            "warren_scheduler_delayed_total 1\n",
            "warren_scheduler_hops_total 1\n",
            "warren_scheduler_released_total 2\n",
            "warren_scheduler_held_tasks 1\n",
            "warren_scheduler_release_lateness_seconds_bucket{le=\"0.001\"} 1\n",
            "warren_scheduler_release_lateness_seconds_bucket{le=\"0.005\"} 2\n",
            "warren_scheduler_release_lateness_seconds_count 2\n",
            "warren_scheduler_dead_total{reason=\"expired\"} 1\n",
            "warren_scheduler_cron_fires_total{schedule=\"nightly\"} 1\n",
            "warren_scheduler_up 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(m.checks(), vec![("broker", false), ("cancels", false)]);
    }
}
