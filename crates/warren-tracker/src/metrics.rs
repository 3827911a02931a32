//! The tracker's own metrics, written in the Prometheus text format
//! (version 0.0.4) by hand: a few counters, gauges and one histogram.

use std::collections::BTreeMap;
use std::sync::Mutex;

use warren_ops::{Exposition, Histogram, DURATION_BUCKETS};

use crate::store::BatchReport;

/// Upper bounds of the batch write duration histogram, in seconds.
const BATCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Counters and gauges of one tracker process.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    ingested: BTreeMap<(String, String), u64>,
    duplicates: u64,
    invalid: u64,
    batches: u64,
    batch_seconds: Histogram,
    task_seconds: BTreeMap<(String, &'static str), Histogram>,
    retries: BTreeMap<String, u64>,
    dead: BTreeMap<(String, String), u64>,
    write_errors: u64,
    reconnects: u64,
    pruned: u64,
    lag_seconds: f64,
    backlog: Option<u64>,
    last_commit_unix: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                ingested: BTreeMap::new(),
                duplicates: 0,
                invalid: 0,
                batches: 0,
                batch_seconds: Histogram::new(BATCH_BUCKETS),
                task_seconds: BTreeMap::new(),
                retries: BTreeMap::new(),
                dead: BTreeMap::new(),
                write_errors: 0,
                reconnects: 0,
                pruned: 0,
                lag_seconds: 0.0,
                backlog: None,
                last_commit_unix: 0.0,
            }),
        }
    }
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A batch was committed: its new events by `(state, type)`, the
    /// duplicates it skipped, how long the write took, and the age of its
    /// oldest event at commit.
    pub fn batch_committed(&self, report: &BatchReport, write_seconds: f64, lag_seconds: f64) {
        self.with(|m| {
            for (k, n) in &report.ingested {
                *m.ingested.entry(k.clone()).or_default() += n;
            }
            m.duplicates += report.duplicates;
            m.batches += 1;
            m.batch_seconds.observe(write_seconds);
            for (task_type, outcome, ms) in &report.durations {
                m.task_seconds
                    .entry((task_type.clone(), outcome))
                    .or_insert_with(|| Histogram::new(DURATION_BUCKETS))
                    .observe(*ms as f64 / 1000.0);
            }
            for (k, n) in &report.retries {
                *m.retries.entry(k.clone()).or_default() += n;
            }
            for (k, n) in &report.dead {
                *m.dead.entry(k.clone()).or_default() += n;
            }
            m.lag_seconds = lag_seconds.max(0.0);
            m.last_commit_unix = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        });
    }

    /// Messages on the tracker queue that were not events.
    pub fn invalid(&self, n: u64) {
        self.with(|m| m.invalid += n);
    }

    /// A batch write failed (it will be retried).
    pub fn write_error(&self) {
        self.with(|m| m.write_errors += 1);
    }

    /// The broker connection was lost and is being re-established.
    pub fn reconnect(&self) {
        self.with(|m| m.reconnects += 1);
    }

    /// Tasks deleted by retention.
    pub fn pruned(&self, n: u64) {
        self.with(|m| m.pruned += n);
    }

    /// Messages waiting on the tracker queue, as last seen.
    pub fn backlog(&self, n: u64) {
        self.with(|m| m.backlog = Some(n));
    }

    /// Events ingested so far, all states and types.
    pub fn ingested_total(&self) -> u64 {
        self.with(|m| m.ingested.values().sum())
    }

    /// The text exposition, with `tasks` (tasks per state, from the
    /// database) when it could be read.
    pub fn render(&self, tasks: Option<&BTreeMap<String, i64>>, ready: bool) -> String {
        let mut e = Exposition::new();
        self.with(|m| {
            e.family(
                "warren_tracker_events_ingested_total",
                "counter",
                "Events stored, by state and task type (each event id once).",
            );
            for ((state, task_type), n) in &m.ingested {
                e.sample(
                    "warren_tracker_events_ingested_total",
                    &[("state", state), ("type", task_type)],
                    *n as f64,
                );
            }
            for (name, kind, help, value) in [
                ("warren_tracker_events_duplicate_total", "counter",
                    "Events skipped because their event id was already stored.", m.duplicates as f64),
                ("warren_tracker_messages_invalid_total", "counter",
                    "Messages on the tracker queue that were not status events (acknowledged, not stored).",
                    m.invalid as f64),
                ("warren_tracker_write_errors_total", "counter",
                    "Batch writes that failed and were retried.", m.write_errors as f64),
                ("warren_tracker_reconnects_total", "counter",
                    "Times the broker connection was lost and re-established.", m.reconnects as f64),
                ("warren_tracker_tasks_pruned_total", "counter",
                    "Tasks deleted by retention.", m.pruned as f64),
                ("warren_tracker_ingest_lag_seconds", "gauge",
                    "Age of the oldest event of the last committed batch, at commit.", m.lag_seconds),
                ("warren_tracker_last_commit_timestamp_seconds", "gauge",
                    "Unix time of the last committed batch (0: none yet).", m.last_commit_unix),
            ] {
                e.single(name, kind, help, value);
            }
            if let Some(b) = m.backlog {
                e.single("warren_tracker_backlog_messages", "gauge",
                    "Messages waiting on the tracker queue, as last seen.", b as f64);
            }
            e.family("warren_tracker_batch_write_seconds", "histogram",
                "Time to write and commit one batch.");
            e.histogram("warren_tracker_batch_write_seconds", &[], &m.batch_seconds);
            e.family("warren_task_duration_seconds", "histogram",
                "Attempt durations reported by succeeded and failed events, by type and outcome (whole fleet).");
            for ((task_type, outcome), h) in &m.task_seconds {
                e.histogram("warren_task_duration_seconds",
                    &[("type", task_type), ("outcome", outcome)], h);
            }
            e.family("warren_task_retries_total", "counter",
                "Failed attempts that will be retried, by type (whole fleet).");
            for (task_type, n) in &m.retries {
                e.sample("warren_task_retries_total", &[("type", task_type)], *n as f64);
            }
            e.family("warren_tasks_dead_total", "counter",
                "Tasks parked in P.dead, by type and reason (whole fleet).");
            for ((task_type, reason), n) in &m.dead {
                e.sample("warren_tasks_dead_total",
                    &[("type", task_type), ("reason", reason)], *n as f64);
            }
        });
        if let Some(tasks) = tasks {
            e.family(
                "warren_tracker_tasks",
                "gauge",
                "Tasks stored, by current state.",
            );
            for (state, n) in tasks {
                e.sample("warren_tracker_tasks", &[("state", state)], *n as f64);
            }
        }
        e.single(
            "warren_tracker_ready",
            "gauge",
            "1 when consuming from the broker and the database answers.",
            f64::from(u8::from(ready)),
        );
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_label_and_the_histogram() {
        let m = Metrics::default();
        let mut batch = BatchReport::default();
        batch
            .ingested
            .insert(("succeeded".to_owned(), "diag.echo".to_owned()), 3);
        batch
            .ingested
            .insert(("started".to_owned(), "a\"b".to_owned()), 1);
        batch.duplicates = 2;
        batch
            .durations
            .push(("diag.echo".to_owned(), "succeeded", 40));
        batch.retries.insert("diag.fail".to_owned(), 1);
        batch
            .dead
            .insert(("diag.fail".to_owned(), "retries_exhausted".to_owned()), 1);
        m.batch_committed(&batch, 0.004, 0.2);
        batch.duplicates = 0;
        m.batch_committed(&batch, 0.3, 0.1);
        let mut tasks = BTreeMap::new();
        tasks.insert("succeeded".to_owned(), 3);
        let text = m.render(Some(&tasks), true);
        assert!(text.contains(
            "warren_tracker_events_ingested_total{state=\"succeeded\",type=\"diag.echo\"} 6\n"
        ));
        assert!(text.contains("type=\"a\\\"b\"} 2\n"));
        assert!(text.contains("warren_tracker_events_duplicate_total 2\n"));
        assert!(text.contains("warren_tracker_batch_write_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("warren_tracker_batch_write_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("warren_tracker_batch_write_seconds_count 2\n"));
        assert!(text.contains("warren_tracker_ingest_lag_seconds 0.1\n"));
        assert!(text.contains("warren_tracker_tasks{state=\"succeeded\"} 3\n"));
        assert!(text.contains("warren_tracker_ready 1\n"));
        assert!(text.contains(
            "warren_task_duration_seconds_bucket{type=\"diag.echo\",outcome=\"succeeded\",le=\"0.05\"} 2\n"
        ));
        assert!(text.contains(
            "warren_task_duration_seconds_bucket{type=\"diag.echo\",outcome=\"succeeded\",le=\"0.025\"} 0\n"
        ));
        assert!(text.contains(
            "warren_task_duration_seconds_count{type=\"diag.echo\",outcome=\"succeeded\"} 2\n"
        ));
        assert!(text.contains("warren_task_retries_total{type=\"diag.fail\"} 2\n"));
        assert!(text.contains(
            "warren_tasks_dead_total{type=\"diag.fail\",reason=\"retries_exhausted\"} 2\n"
        ));
        assert_eq!(m.ingested_total(), 8);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
