//! What a worker counts, exposed on `/metrics` and `/readyz`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use warren_client::runtime::CancelSet;
use warren_ops::{BrokerLink, Exposition, Histogram, Probe, DURATION_BUCKETS, LATENESS_BUCKETS};

/// How a task left this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Outcome {
    /// Its handler returned a result.
    Succeeded,
    /// Its handler failed and a retry was scheduled.
    Retried,
    /// Parked in `P.dead` (the reason is counted apart).
    Dead,
    /// Dropped by a cancel command.
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retried => "retried",
            Outcome::Dead => "dead",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A worker's counters and gauges.
#[derive(Debug)]
pub(crate) struct WorkerMetrics {
    inner: Mutex<Inner>,
    concurrency: usize,
    running: AtomicI64,
    /// Consuming, caught up with cancels, reconnects.
    pub(crate) link: BrokerLink,
    redeliveries: AtomicU64,
    returned: AtomicU64,
    handed_back: AtomicU64,
    moved_to_lane: AtomicU64,
    moved_to_tenant: AtomicU64,
    tenant_queues: AtomicU64,
    escrowed: AtomicU64,
    paused: AtomicI64,
    pauses_slots: AtomicU64,
    pauses_bytes: AtomicU64,
    put_back_paused: AtomicU64,
    parked_paused: AtomicU64,
    moved_back: AtomicU64,
    permits_held: AtomicI64,
    limit_waiting: AtomicI64,
    limit_handed_back: AtomicU64,
    duplicates: AtomicU64,
    /// What the fleet has paused, as this worker knows it.
    fleet: CancelSet,
}

#[derive(Debug)]
struct Inner {
    /// By type, then outcome: looked up by the type as borrowed, so
    /// counting a task allocates nothing once its type is known.
    outcomes: BTreeMap<String, BTreeMap<Outcome, u64>>,
    dead: BTreeMap<(String, &'static str), u64>,
    /// By type, then result.
    durations: BTreeMap<String, BTreeMap<&'static str, Histogram>>,
    /// Start of a delayed task's attempt after its due time.
    lateness: Histogram,
    /// Per rate-limited type: tasks waiting for a token now, tokens taken,
    /// and waits begun.
    rates: BTreeMap<String, RateCounts>,
    /// Per type with a global concurrency limit: tasks waiting for a permit.
    permit_waiting: BTreeMap<String, i64>,
}

#[derive(Debug, Default)]
struct RateCounts {
    waiting: i64,
    tokens: u64,
    waits: u64,
}

impl WorkerMetrics {
    pub(crate) fn new(concurrency: usize, fleet: CancelSet) -> Self {
        WorkerMetrics {
            inner: Mutex::new(Inner {
                outcomes: BTreeMap::new(),
                dead: BTreeMap::new(),
                durations: BTreeMap::new(),
                lateness: Histogram::new(LATENESS_BUCKETS),
                rates: BTreeMap::new(),
                permit_waiting: BTreeMap::new(),
            }),
            concurrency,
            running: AtomicI64::new(0),
            link: BrokerLink::default(),
            redeliveries: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            handed_back: AtomicU64::new(0),
            moved_to_lane: AtomicU64::new(0),
            moved_to_tenant: AtomicU64::new(0),
            tenant_queues: AtomicU64::new(0),
            escrowed: AtomicU64::new(0),
            paused: AtomicI64::new(0),
            pauses_slots: AtomicU64::new(0),
            pauses_bytes: AtomicU64::new(0),
            put_back_paused: AtomicU64::new(0),
            parked_paused: AtomicU64::new(0),
            moved_back: AtomicU64::new(0),
            permits_held: AtomicI64::new(0),
            limit_waiting: AtomicI64::new(0),
            limit_handed_back: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            fleet,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A task's outcome is recorded by the broker; `ran` is how long its
    /// handler ran, when it did.
    pub(crate) fn outcome(&self, task_type: &str, outcome: Outcome, ran: Option<Duration>) {
        self.with(|m| {
            *of_type(&mut m.outcomes, task_type)
                .entry(outcome)
                .or_default() += 1;
            if let Some(ran) = ran {
                let label = if outcome == Outcome::Succeeded {
                    "succeeded"
                } else {
                    "failed"
                };
                of_type(&mut m.durations, task_type)
                    .entry(label)
                    .or_insert_with(|| Histogram::new(DURATION_BUCKETS))
                    .observe(ran.as_secs_f64());
            }
        });
    }

    /// A task parked in `P.dead` for `reason`.
    pub(crate) fn dead(&self, task_type: &str, reason: &'static str, ran: Option<Duration>) {
        self.outcome(task_type, Outcome::Dead, ran);
        self.with(|m| *m.dead.entry((task_type.to_owned(), reason)).or_default() += 1);
    }

    /// A delayed task started `late_ms` after its due time.
    pub(crate) fn delay_lateness(&self, late_ms: i64) {
        let late = late_ms.max(0) as f64 / 1000.0;
        self.with(|m| m.lateness.observe(late));
    }

    /// A delivery came back without an outcome (its worker died).
    pub(crate) fn redelivered(&self) {
        self.redeliveries.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery that waited too long for a slot went back to its queue.
    pub(crate) fn handed_back(&self) {
        self.handed_back.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery from the entry of a quorum work queue that could not start
    /// at once was moved to the priority lane of its priority.
    pub(crate) fn moved_to_lane(&self) {
        self.moved_to_lane.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn moved_to_tenant(&self) {
        self.moved_to_tenant.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tenant_queues(&self, known: usize) {
        self.tenant_queues.store(known as u64, Ordering::Relaxed);
    }

    /// A running task went into escrow (it ran past `worker.escrow_after_ms`).
    pub(crate) fn escrowed(&self) {
        self.escrowed.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the worker has stopped taking deliveries (every slot held by
    /// a long task, or `worker.max_held_bytes` reached).
    pub(crate) fn paused(&self, paused: bool) {
        self.paused.store(i64::from(paused), Ordering::Relaxed);
    }

    /// The worker stopped taking deliveries: every slot was busy (`slots`)
    /// or the bodies it held reached `worker.max_held_bytes` (not `slots`).
    pub(crate) fn pause(&self, slots: bool) {
        let c = if slots {
            &self.pauses_slots
        } else {
            &self.pauses_bytes
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery of a paused queue went back to it unstarted.
    pub(crate) fn put_back_paused(&self) {
        self.put_back_paused.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery of a paused type was parked in `P.paused.<type>`.
    pub(crate) fn parked_paused(&self) {
        self.parked_paused.fetch_add(1, Ordering::Relaxed);
    }

    /// A parked task of a resumed type went back to its queue.
    pub(crate) fn moved_back(&self) {
        self.moved_back.fetch_add(1, Ordering::Relaxed);
    }

    /// A task was returned to its queue unacknowledged at shutdown.
    pub(crate) fn returned(&self) {
        self.returned.fetch_add(1, Ordering::Relaxed);
    }

    /// A global concurrency permit is taken (`+1`) or given back (`-1`).
    pub(crate) fn permits_held(&self, delta: i64) {
        self.permits_held.fetch_add(delta, Ordering::Relaxed);
    }

    /// A task starts (`+1`) or stops (`-1`) waiting for a global
    /// concurrency permit.
    pub(crate) fn limit_waiting(&self, delta: i64) {
        self.limit_waiting.fetch_add(delta, Ordering::Relaxed);
    }

    /// A task of `task_type` begins (`+1`) or ends (`-1`) waiting for a
    /// global concurrency permit.
    pub(crate) fn permit_waiting(&self, task_type: &str, delta: i64) {
        self.limit_waiting(delta);
        self.with(|m| *m.permit_waiting.entry(task_type.to_owned()).or_default() += delta);
    }

    /// A task of `task_type` begins (`+1`) or ends (`-1`) waiting for a
    /// rate limit's token; a beginning counts a wait.
    pub(crate) fn rate_waiting(&self, task_type: &str, delta: i64) {
        self.with(|m| {
            let r = m.rates.entry(task_type.to_owned()).or_default();
            r.waiting += delta;
            if delta > 0 {
                r.waits += 1;
            }
        });
    }

    /// A token of `task_type`'s rate limit was taken.
    pub(crate) fn rate_token(&self, task_type: &str) {
        self.with(|m| m.rates.entry(task_type.to_owned()).or_default().tokens += 1);
    }

    /// A task that waited `flow.permit_handback_ms` for a permit went back
    /// to its queue.
    pub(crate) fn limit_handed_back(&self) {
        self.limit_handed_back.fetch_add(1, Ordering::Relaxed);
    }

    /// A task was dropped as a duplicate of another with its unique key.
    pub(crate) fn duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    /// A handler starts (`+1`) or ends (`-1`).
    pub(crate) fn running(&self, delta: i64) {
        self.running.fetch_add(delta, Ordering::Relaxed);
    }
}

impl Probe for WorkerMetrics {
    fn metrics(&self) -> String {
        let mut e = Exposition::new();
        self.with(|m| {
            e.family(
                "warren_worker_tasks_total",
                "counter",
                "Tasks this worker finished, by type and outcome (succeeded, retried, dead, \
                 cancelled).",
            );
            for (t, per) in &m.outcomes {
                for (o, n) in per {
                    e.sample(
                        "warren_worker_tasks_total",
                        &[("type", t), ("outcome", o.as_str())],
                        *n as f64,
                    );
                }
            }
            e.family(
                "warren_worker_dead_total",
                "counter",
                "Tasks this worker parked in P.dead, by type and reason.",
            );
            for ((t, r), n) in &m.dead {
                e.sample(
                    "warren_worker_dead_total",
                    &[("type", t), ("reason", r)],
                    *n as f64,
                );
            }
            e.family(
                "warren_worker_task_duration_seconds",
                "histogram",
                "Handler run time, by type and result (succeeded or failed).",
            );
            for (t, per) in &m.durations {
                for (r, h) in per {
                    e.histogram(
                        "warren_worker_task_duration_seconds",
                        &[("type", t), ("result", r)],
                        h,
                    );
                }
            }
            e.family(
                "warren_worker_delay_lateness_seconds",
                "histogram",
                "How long after its due time a delayed task or retry started (never early).",
            );
            e.histogram("warren_worker_delay_lateness_seconds", &[], &m.lateness);
            let retried: u64 = m
                .outcomes
                .values()
                .filter_map(|per| per.get(&Outcome::Retried))
                .sum();
            e.family(
                "warren_worker_limit_waiting_by_type",
                "gauge",
                "Tasks waiting in this worker for a global concurrency permit, by type.",
            );
            for (t, n) in &m.permit_waiting {
                e.sample(
                    "warren_worker_limit_waiting_by_type",
                    &[("type", t)],
                    *n as f64,
                );
            }
            e.family(
                "warren_worker_rate_waiting",
                "gauge",
                "Tasks waiting in this worker for a rate limit's token (flow.rate), by type \
                 (holding no slot).",
            );
            for (t, r) in &m.rates {
                e.sample(
                    "warren_worker_rate_waiting",
                    &[("type", t)],
                    r.waiting as f64,
                );
            }
            e.family(
                "warren_worker_rate_tokens_total",
                "counter",
                "Rate limit tokens this worker took (tasks let start), by type.",
            );
            for (t, r) in &m.rates {
                e.sample(
                    "warren_worker_rate_tokens_total",
                    &[("type", t)],
                    r.tokens as f64,
                );
            }
            e.family(
                "warren_worker_rate_waits_total",
                "counter",
                "Tasks that found their rate limit's window full and waited for a token, by type.",
            );
            for (t, r) in &m.rates {
                e.sample(
                    "warren_worker_rate_waits_total",
                    &[("type", t)],
                    r.waits as f64,
                );
            }
            e.single(
                "warren_worker_retries_total",
                "counter",
                "Failed attempts this worker sent back for a retry.",
                retried as f64,
            );
        });
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        e.single(
            "warren_worker_tasks_running",
            "gauge",
            "Handlers running now.",
            self.running.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "warren_worker_permits_held",
            "gauge",
            "Global concurrency permits (flow.concurrency) this worker holds now.",
            self.permits_held.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "warren_worker_limit_waiting",
            "gauge",
            "Tasks waiting in this worker for a global concurrency permit (holding no slot).",
            self.limit_waiting.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "warren_worker_limit_handed_back_total",
            "counter",
            "Tasks put back on their queue after waiting flow.permit_handback_ms for a permit or a rate token.",
            load(&self.limit_handed_back),
        );
        e.single(
            "warren_worker_duplicates_total",
            "counter",
            "Tasks dropped as duplicates: another task with their x-warren-unique-key came first.",
            load(&self.duplicates),
        );
        e.single(
            "warren_worker_concurrency",
            "gauge",
            "Handlers this worker may run at once (worker.concurrency).",
            self.concurrency as f64,
        );
        e.single(
            "warren_worker_redeliveries_total",
            "counter",
            "Deliveries that came back without an outcome (a worker died holding them).",
            load(&self.redeliveries),
        );
        e.single(
            "warren_worker_returned_total",
            "counter",
            "Running tasks returned to their queue unacknowledged at shutdown.",
            load(&self.returned),
        );
        e.single(
            "warren_worker_handed_back_total",
            "counter",
            "Deliveries handed back to their queue after waiting worker.handback_ms for a slot.",
            load(&self.handed_back),
        );
        e.single(
            "warren_worker_moved_to_lane_total",
            "counter",
            "Deliveries from the entry of a quorum work queue moved to the priority lane of their priority (no slot free at once).",
            load(&self.moved_to_lane),
        );
        e.single(
            "warren_worker_moved_to_tenant_total",
            "counter",
            "Deliveries with x-warren-tenant moved from a work queue with tenants to their tenant queue (or the overflow).",
            load(&self.moved_to_tenant),
        );
        e.single(
            "warren_worker_tenant_queues",
            "gauge",
            "Tenant queues (the overflow included) this worker has read in the directories and consumes.",
            load(&self.tenant_queues),
        );
        e.single(
            "warren_worker_escrowed_total",
            "counter",
            "Running tasks put in escrow (acknowledged, a copy held under a lease) as they ran past worker.escrow_after_ms.",
            load(&self.escrowed),
        );
        e.single(
            "warren_worker_paused",
            "gauge",
            "1 while the worker takes no deliveries (slots held by long tasks, or worker.max_held_bytes reached).",
            self.paused.load(Ordering::Relaxed) as f64,
        );
        e.family(
            "warren_worker_pauses_total",
            "counter",
            "Times the worker stopped taking deliveries, by reason: slots (long tasks) or bytes (worker.max_held_bytes).",
        );
        e.sample(
            "warren_worker_pauses_total",
            &[("reason", "slots")],
            load(&self.pauses_slots),
        );
        e.sample(
            "warren_worker_pauses_total",
            &[("reason", "bytes")],
            load(&self.pauses_bytes),
        );
        e.family(
            "warren_worker_fleet_paused",
            "gauge",
            "1 for each work queue (kind=queue, short name) or task type (kind=type) paused fleet-wide, as this worker knows it.",
        );
        for (t, _) in self.fleet.pauses().paused() {
            e.sample(
                "warren_worker_fleet_paused",
                &[("kind", t.kind.as_str()), ("name", &t.name)],
                1.0,
            );
        }
        e.single(
            "warren_worker_put_back_paused_total",
            "counter",
            "Deliveries of a paused work queue put back on it unstarted.",
            load(&self.put_back_paused),
        );
        e.single(
            "warren_worker_parked_paused_total",
            "counter",
            "Deliveries of a paused task type parked in P.paused.<type>.",
            load(&self.parked_paused),
        );
        e.single(
            "warren_worker_moved_back_total",
            "counter",
            "Parked tasks of a resumed task type moved back to their queue.",
            load(&self.moved_back),
        );
        self.link.write(
            &mut e,
            "warren_worker",
            "1 while consuming from the broker.",
        );
        e.finish()
    }

    fn checks(&self) -> Vec<(&'static str, bool)> {
        self.link.checks()
    }
}

/// The entry of `t` in a map by task type, made empty when new; a known
/// type is found without allocating.
fn of_type<'m, V: Default>(map: &'m mut BTreeMap<String, V>, t: &str) -> &'m mut V {
    if !map.contains_key(t) {
        map.insert(t.to_owned(), V::default());
    }
    map.get_mut(t).expect("inserted above")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_durations_and_dead_reasons_are_exposed() {
        let m = WorkerMetrics::new(4, CancelSet::new());
        m.outcome(
            "diag.echo",
            Outcome::Succeeded,
            Some(Duration::from_millis(20)),
        );
        m.outcome(
            "diag.echo",
            Outcome::Succeeded,
            Some(Duration::from_millis(30)),
        );
        m.outcome(
            "diag.fail",
            Outcome::Retried,
            Some(Duration::from_millis(1)),
        );
        m.dead(
            "diag.fail",
            "retries_exhausted",
            Some(Duration::from_millis(1)),
        );
        m.dead("_unregistered", "invalid", None);
        m.running(1);
        m.rate_token("http.get");
        m.rate_waiting("http.get", 1);
        m.rate_waiting("http.get", -1);
        m.rate_waiting("http.get", 1);
        m.permit_waiting("http.get", 1);
        m.link.consuming(true);
        let text = m.metrics();
        for line in [
            "warren_worker_tasks_total{type=\"diag.echo\",outcome=\"succeeded\"} 2\n",
            "warren_worker_tasks_total{type=\"diag.fail\",outcome=\"retried\"} 1\n",
            "warren_worker_tasks_total{type=\"diag.fail\",outcome=\"dead\"} 1\n",
            "warren_worker_dead_total{type=\"_unregistered\",reason=\"invalid\"} 1\n",
            "warren_worker_task_duration_seconds_count{type=\"diag.echo\",result=\"succeeded\"} 2\n",
            "warren_worker_task_duration_seconds_bucket{type=\"diag.echo\",result=\"succeeded\",le=\"0.025\"} 1\n",
            "warren_worker_task_duration_seconds_count{type=\"diag.fail\",result=\"failed\"} 2\n",
            "warren_worker_retries_total 1\n",
            "warren_worker_tasks_running 1\n",
            "warren_worker_concurrency 4\n",
            "warren_worker_up 1\n",
            "warren_worker_rate_tokens_total{type=\"http.get\"} 1\n",
            "warren_worker_rate_waiting{type=\"http.get\"} 1\n",
            "warren_worker_rate_waits_total{type=\"http.get\"} 2\n",
            "warren_worker_limit_waiting_by_type{type=\"http.get\"} 1\n",
            "warren_worker_limit_waiting 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(m.checks(), vec![("broker", true), ("cancels", false)]);
    }
}
