//! `[worker]`: settings of worker processes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

use super::broker::RECONNECT_ZERO;
use super::issues::check_listen;
use super::{Config, Issues};
use crate::routes;

/// Settings of worker processes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Queues to consume (short names); empty means every configured queue.
    pub queues: Vec<String>,
    /// Tasks run at once (at least 1).
    pub concurrency: usize,
    /// Unacknowledged deliveries allowed (`basic.qos`); at least `concurrency`.
    pub prefetch: u16,
    /// A delivery that has waited this many milliseconds for a slot while
    /// every slot is busy goes back to its queue for a worker with a free
    /// slot, and this worker takes no more until a slot frees; 0 never hands
    /// back.
    pub handback_ms: u64,
    /// When the bodies of the deliveries a worker holds (waiting, running or
    /// being recorded) reach this many bytes, it stops consuming until they
    /// are below half of it: with `prefetch`, the bound of its memory for
    /// message bodies, however large the messages published.
    pub max_held_bytes: usize,
    /// On shutdown, how long running tasks may finish before being aborted.
    pub grace_period_ms: u64,
    /// Default task timeout, overridden by `x-warren-timeout-ms`.
    pub task_timeout_ms: u64,
    /// Directory for files that tasks produce.
    pub data_dir: PathBuf,
    /// Deprecated: set `broker.reconnect_max_ms` instead. When a file or the
    /// environment sets only this key, loading takes its value for
    /// `broker.reconnect_max_ms` (with a warning); either way loading leaves
    /// here the value in effect, the same as `broker.reconnect_max_ms`.
    pub reconnect_max_ms: u64,
    /// Per task type caps on tasks run at once within this worker
    /// (`{ "file.download" = 2 }`), below `concurrency`.
    pub type_concurrency: BTreeMap<String, usize>,
    /// Address of this worker's `/metrics`, `/healthz` and `/readyz`
    /// (`host:port`); empty turns them off.
    pub listen: String,
    /// A task still running this many milliseconds after its delivery
    /// reached the worker (as the broker counts) is put in escrow (its delivery acknowledged, a copy held in `P.escrow` under
    /// a lease), so that it outlives `broker.consumer_timeout_ms`; 0: half
    /// of `broker.consumer_timeout_ms`. At most half of it.
    pub escrow_after_ms: u64,
    /// The lease of a task in escrow, in milliseconds, renewed every half
    /// lease while it runs: if its worker dies, the task runs again at most
    /// this long after the last renewal. At least 1000, at most half of
    /// `scheduler.cancel_ttl_ms`.
    pub escrow_lease_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            concurrency: 8,
            prefetch: 256,
            handback_ms: 1000,
            max_held_bytes: 256 * 1024 * 1024,
            grace_period_ms: 30_000,
            task_timeout_ms: 300_000,
            data_dir: PathBuf::from("data"),
            reconnect_max_ms: 10_000,
            type_concurrency: BTreeMap::new(),
            listen: "127.0.0.1:8090".into(),
            escrow_after_ms: 0,
            escrow_lease_ms: 60_000,
        }
    }
}

impl Config {
    pub(super) fn check_worker(&self, issues: &mut Issues) {
        let w = &self.worker;
        check_listen(issues, "worker.listen", &w.listen, "8090", true);
        let mut listed = BTreeSet::new();
        for (i, name) in w.queues.iter().enumerate() {
            if self.queue(name).is_none() {
                issues.add(
                    format!("worker.queues[{i}]"),
                    format!(
                        "{name:?} is not a configured queue: {}; list only those, or leave \
                         worker.queues empty to consume them all",
                        self.queue_names_hint()
                    ),
                );
            } else if !listed.insert(name.as_str()) {
                issues.add(
                    format!("worker.queues[{i}]"),
                    format!("{name:?} is listed twice: list each queue once"),
                );
            }
        }
        issues.above_zero(
            "worker.concurrency",
            w.concurrency,
            "0 would run no task: set it to at least 1",
        );
        if issues.above_zero(
            "worker.prefetch",
            w.prefetch,
            "0 means unlimited deliveries in AMQP: set it to at least worker.concurrency",
        ) && usize::from(w.prefetch) < w.concurrency
        {
            issues.add(
                "worker.prefetch",
                format!(
                    "{} is below worker.concurrency = {}: each running task holds one \
                     unacknowledged delivery, so raise prefetch to at least {} (or lower \
                     concurrency)",
                    w.prefetch, w.concurrency, w.concurrency
                ),
            );
        }
        issues.above_zero(
            "worker.max_held_bytes",
            w.max_held_bytes,
            "0 would hold no message: set it above 0, for example 268435456 (256 MiB)",
        );
        issues.above_zero(
            "worker.task_timeout_ms",
            w.task_timeout_ms,
            "0 would time out every task: set it above 0, for example 300000 (5 minutes)",
        );
        // Checked here only when it gave broker.reconnect_max_ms its value.
        if self.notes.reconnect_from_worker {
            issues.above_zero(
                "worker.reconnect_max_ms",
                w.reconnect_max_ms,
                RECONNECT_ZERO,
            );
        }
        if w.data_dir.as_os_str().is_empty() {
            issues.add(
                "worker.data_dir",
                "is empty: set a directory, for example \"data\"",
            );
        }
    }

    /// Checks `worker.type_concurrency`; its issues come after those of
    /// `[http]`, as they always have.
    pub(super) fn check_type_concurrency(&self, issues: &mut Issues) {
        for (task_type, &cap) in &self.worker.type_concurrency {
            let key = format!("worker.type_concurrency.{task_type:?}");
            if !routes::is_valid_task_type(task_type) {
                issues.add(
                    &key,
                    "is not a task type: caps are keyed by an exact task type, words of \
                     letters, digits, '_' or '-' joined by '.', without '*' or '#'",
                );
            }
            issues.above_zero(
                &key,
                cap,
                "0 would never run this type: set it to at least 1, or remove the entry",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn worker_rules() {
        one_issue(
            "[worker]\nqueues = [\"io\", \"gpu\"]",
            "config key worker.queues[1]: \"gpu\" is not a configured queue: configured queues \
             are \"io\", \"cpu\", \"diag\"; list only those, or leave worker.queues empty to \
             consume them all",
        );
        one_issue(
            "[worker]\nqueues = [\"io\", \"io\"]",
            "config key worker.queues[1]: \"io\" is listed twice: list each queue once",
        );
        one_issue(
            "[worker]\nconcurrency = 0",
            "config key worker.concurrency: 0 would run no task: set it to at least 1",
        );
        one_issue(
            "[worker]\nprefetch = 0",
            "config key worker.prefetch: 0 means unlimited deliveries in AMQP: set it to at \
             least worker.concurrency",
        );
        one_issue(
            "[worker]\nconcurrency = 32\nprefetch = 16",
            "config key worker.prefetch: 16 is below worker.concurrency = 32: each running \
             task holds one unacknowledged delivery, so raise prefetch to at least 32 (or \
             lower concurrency)",
        );
        one_issue(
            "[worker]\ntask_timeout_ms = 0",
            "config key worker.task_timeout_ms: 0 would time out every task: set it above 0, \
             for example 300000 (5 minutes)",
        );
        one_issue(
            "[worker]\nreconnect_max_ms = 0",
            "config key worker.reconnect_max_ms: 0 would reconnect in a tight loop: set it \
             above 0, for example 10000",
        );
        one_issue(
            "[worker]\ndata_dir = \"\"",
            "config key worker.data_dir: is empty: set a directory, for example \"data\"",
        );
    }

    #[test]
    fn type_concurrency_rules() {
        one_issue(
            "[worker.type_concurrency]\n\"file.download\" = 0",
            "config key worker.type_concurrency.\"file.download\": 0 would never run this \
             type: set it to at least 1, or remove the entry",
        );
        one_issue(
            "[worker.type_concurrency]\n\"file.*\" = 2",
            "config key worker.type_concurrency.\"file.*\": is not a task type: caps are keyed \
             by an exact task type, words of letters, digits, '_' or '-' joined by '.', \
             without '*' or '#'",
        );
    }
}
