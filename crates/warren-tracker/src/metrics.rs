//! The tracker's own metrics, written in the Prometheus text format
//! (version 0.0.4) by hand: a few counters, gauges and one histogram.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::store::BatchReport;

/// Upper bounds of the batch write duration histogram, in seconds.
const BATCH_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds of the task duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One histogram's buckets, sum and count.
#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; bounds.len()];
        }
        for (i, le) in bounds.iter().enumerate() {
            if value <= *le {
                self.buckets[i] += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in bounds.iter().zip(&self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Counters and gauges of one tracker process.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
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
            m.batch_seconds.observe(&BATCH_BUCKETS, write_seconds);
            for (task_type, outcome, ms) in &report.durations {
                m.task_seconds
                    .entry((task_type.clone(), outcome))
                    .or_default()
                    .observe(&DURATION_BUCKETS, *ms as f64 / 1000.0);
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
        let mut out = String::new();
        self.with(|m| {
            header(&mut out, "warren_tracker_events_ingested_total", "counter",
                "Events stored, by state and task type (each event id once).");
            for ((state, task_type), n) in &m.ingested {
                let _ = writeln!(
                    out,
                    "warren_tracker_events_ingested_total{{state=\"{}\",type=\"{}\"}} {n}",
                    escape(state),
                    escape(task_type)
                );
            }
            simple(&mut out, "warren_tracker_events_duplicate_total", "counter",
                "Events skipped because their event id was already stored.", m.duplicates as f64);
            simple(&mut out, "warren_tracker_messages_invalid_total", "counter",
                "Messages on the tracker queue that were not status events (acknowledged, not stored).",
                m.invalid as f64);
            simple(&mut out, "warren_tracker_write_errors_total", "counter",
                "Batch writes that failed and were retried.", m.write_errors as f64);
            simple(&mut out, "warren_tracker_reconnects_total", "counter",
                "Times the broker connection was lost and re-established.", m.reconnects as f64);
            simple(&mut out, "warren_tracker_tasks_pruned_total", "counter",
                "Tasks deleted by retention.", m.pruned as f64);
            simple(&mut out, "warren_tracker_ingest_lag_seconds", "gauge",
                "Age of the oldest event of the last committed batch, at commit.", m.lag_seconds);
            simple(&mut out, "warren_tracker_last_commit_timestamp_seconds", "gauge",
                "Unix time of the last committed batch (0: none yet).", m.last_commit_unix);
            if let Some(b) = m.backlog {
                simple(&mut out, "warren_tracker_backlog_messages", "gauge",
                    "Messages waiting on the tracker queue, as last seen.", b as f64);
            }
            header(&mut out, "warren_tracker_batch_write_seconds", "histogram",
                "Time to write and commit one batch.");
            let mut batches = m.batch_seconds.clone();
            if batches.buckets.is_empty() {
                batches.buckets = vec![0; BATCH_BUCKETS.len()];
            }
            batches.write(&mut out, "warren_tracker_batch_write_seconds", "", &BATCH_BUCKETS);
            header(&mut out, "warren_task_duration_seconds", "histogram",
                "Attempt durations reported by succeeded and failed events, by type and outcome (whole fleet).");
            for ((task_type, outcome), h) in &m.task_seconds {
                let labels = format!("type=\"{}\",outcome=\"{outcome}\"", escape(task_type));
                h.write(&mut out, "warren_task_duration_seconds", &labels, &DURATION_BUCKETS);
            }
            header(&mut out, "warren_task_retries_total", "counter",
                "Failed attempts that will be retried, by type (whole fleet).");
            for (task_type, n) in &m.retries {
                let _ = writeln!(out, "warren_task_retries_total{{type=\"{}\"}} {n}", escape(task_type));
            }
            header(&mut out, "warren_tasks_dead_total", "counter",
                "Tasks parked in P.dead, by type and reason (whole fleet).");
            for ((task_type, reason), n) in &m.dead {
                let _ = writeln!(out, "warren_tasks_dead_total{{type=\"{}\",reason=\"{}\"}} {n}",
                    escape(task_type), escape(reason));
            }
        });
        if let Some(tasks) = tasks {
            header(
                &mut out,
                "warren_tracker_tasks",
                "gauge",
                "Tasks stored, by current state.",
            );
            for (state, n) in tasks {
                let _ = writeln!(
                    out,
                    "warren_tracker_tasks{{state=\"{}\"}} {n}",
                    escape(state)
                );
            }
        }
        simple(
            &mut out,
            "warren_tracker_ready",
            "gauge",
            "1 when consuming from the broker and the database answers.",
            f64::from(u8::from(ready)),
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn simple(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
