//! The configuration schema, how it is layered, and its validation.
//!
//! Layers, lowest first: the built-in `config/default.toml` (compiled in),
//! an optional file, then `WARREN__SECTION__KEY` environment variables. Single
//! values and tables merge key by key; an array in a higher layer (such as
//! `[[queues]]`) replaces the lower one as a whole. Unknown keys are errors.
//! [`Config::validate`] then checks the whole result at once and reports
//! every problem, each naming its key, its value and the fix.
//!
//! One file per section, each with its struct, defaults, checks and tests:
//! `broker`, `queues` (and routes), `worker`, `limits`, `retry`, `scheduler`
//! (and cron), `http` (with the URL and host-rule types), `topology`, `tracker`, `tracker_auth`
//! `exec` and `webhook`;
//! `layering` loads and merges the layers, `issues` collects and formats the
//! problems. Everything public is re-exported here.

mod broker;
mod escrow;
mod exec;
mod flow;
mod http;
mod issues;
mod layering;
mod limits;
mod queues;
mod retry;
mod scheduler;
mod topology;
mod tracker;
mod tracker_auth;
mod webhook;
mod worker;

use serde::Deserialize;

use crate::names::Names;

pub use broker::{BrokerConfig, BrokerUrls};
pub use exec::{ExecConfig, DEFAULT_MAX_OUTPUT_BYTES};
pub use flow::{
    ConcurrencyLimit, FlowConfig, RateLimit, MAX_GLOBAL_CONCURRENCY, MAX_RATE, MAX_RATE_PERIOD_MS,
};
pub use http::{redact_url, BrokerUrl, DatabaseUrl, HostRule, HttpConfig};
pub use issues::{ConfigError, ConfigIssue};
pub use limits::LimitsConfig;
pub use queues::{QueueConfig, QueueKind, RouteConfig};
pub use retry::{RetryConfig, RetryPolicy};
pub use scheduler::{parse_cron, CronConfig, MissedFires, SchedulerConfig, CRON_SAMPLES};
pub use topology::TopologyConfig;
pub use tracker::TrackerConfig;
pub use tracker_auth::{SecretSource, TrackerCredential, TrackerRole};
pub use webhook::{InlineSecret, WebhookConfig, WebhookSecret, DEFAULT_MAX_RESPONSE_BYTES};
pub use worker::WorkerConfig;

use issues::Issues;

/// Longest prefix accepted, so derived names stay readable and within AMQP's
/// 255-byte limit.
const MAX_PREFIX_CHARS: usize = 64;

/// The whole configuration of a Warren process, as loaded and validated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Prefix of every exchange and queue name (`P` in the contract).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How to reach RabbitMQ.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Work queues, one per `[[queues]]` entry.
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    /// Topic routes from task types to queues, one per `[[routes]]` entry.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Settings of worker processes.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Size limits on task bodies and results.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Retry policies, default and per task type.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Settings of the scheduler (delays, poison detection, cancellation).
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// How the durable queues are declared (classic or replicated).
    #[serde(default)]
    pub topology: TopologyConfig,
    /// Cron schedules, one per `[[cron]]` entry; empty by default.
    #[serde(default)]
    pub cron: Vec<CronConfig>,
    /// Outbound HTTP of the built-in `http.*` and `file.*` task types.
    #[serde(default)]
    pub http: HttpConfig,
    /// The task tracker: its database, retention and HTTP address.
    #[serde(default)]
    pub tracker: TrackerConfig,
    /// Task types handled by programs, one per `[[exec]]` entry; empty by
    /// default.
    #[serde(default)]
    pub exec: Vec<ExecConfig>,
    /// Task types handled by HTTP endpoints, one per `[[webhook]]` entry;
    /// empty by default.
    #[serde(default)]
    pub webhook: Vec<WebhookConfig>,
    /// Fleet-wide flow control: global concurrency per task type.
    #[serde(default = "flow::default_flow")]
    pub flow: FlowConfig,
    /// What loading noted beside the values; not a configuration key.
    #[serde(skip)]
    notes: LoadNotes,
}

/// What loading noted beside the values themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct LoadNotes {
    /// Warnings for the caller to show, one line each.
    warnings: Vec<String>,
    /// Whether `broker.reconnect_max_ms` was taken from the deprecated
    /// `worker.reconnect_max_ms`, so that its problems name the key written.
    reconnect_from_worker: bool,
}

fn default_prefix() -> String {
    "warren".into()
}

impl Config {
    /// Checks every rule and returns all broken ones at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        self.check_prefix(&mut issues);
        self.check_broker(&mut issues);
        self.check_queues(&mut issues);
        self.check_routes(&mut issues);
        self.check_topology(&mut issues);
        self.check_worker(&mut issues);
        self.check_escrow(&mut issues);
        self.check_limits(&mut issues);
        self.check_retry(&mut issues);
        self.check_scheduler(&mut issues);
        self.check_cron(&mut issues);
        self.check_http(&mut issues);
        self.check_type_concurrency(&mut issues);
        self.check_tracker(&mut issues);
        self.check_tracker_auth(&mut issues);
        self.check_exec(&mut issues);
        self.check_webhook(&mut issues);
        self.check_flow(&mut issues);
        issues.finish()
    }

    /// What loading warns about without refusing the configuration, such as
    /// a deprecated key it still reads; one line each, for the caller to
    /// show. Empty for a configuration not built by [`Config::load`],
    /// [`Config::load_from`] or [`Config::from_toml`].
    pub fn warnings(&self) -> &[String] {
        &self.notes.warnings
    }

    /// The broker object names for this configuration's prefix.
    pub fn names(&self) -> Names {
        Names::new(self.prefix.clone())
    }

    /// The retry policy of a task type: its `retry.types` entry, else the default.
    pub fn retry_policy(&self, task_type: &str) -> &RetryPolicy {
        self.retry
            .types
            .get(task_type)
            .unwrap_or(&self.retry.default)
    }

    /// The queues a worker consumes: those in `worker.queues`, in that order,
    /// or every configured queue if the list is empty.
    pub fn worker_queues(&self) -> Vec<&QueueConfig> {
        if self.worker.queues.is_empty() {
            self.queues.iter().collect()
        } else {
            self.worker
                .queues
                .iter()
                .filter_map(|name| self.queue(name))
                .collect()
        }
    }

    /// The queue marked `default = true`, which receives unrouted task types.
    pub fn default_queue(&self) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.default)
    }

    /// The `[[queues]]` entry with this short name.
    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }

    fn check_prefix(&self, issues: &mut Issues) {
        let p = &self.prefix;
        if p.is_empty() {
            issues.add("prefix", "is empty: set a prefix such as \"warren\"");
        } else if p.chars().count() > MAX_PREFIX_CHARS {
            issues.add(
                "prefix",
                format!(
                    "{p:?} is {} characters long: use at most {MAX_PREFIX_CHARS}",
                    p.chars().count()
                ),
            );
        } else if !p.split('.').all(is_name_word) {
            issues.add(
                "prefix",
                format!(
                    "{p:?} is not a valid prefix: use words of letters, digits, '_' or '-' \
                     joined by single dots, such as \"warren\" or \"acme.prod\""
                ),
            );
        }
    }
}

/// A short name of a queue or schedule: `[a-z0-9_-]+`.
fn is_short_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A word of a prefix: `[A-Za-z0-9_-]+`.
fn is_name_word(w: &str) -> bool {
    !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Helpers shared by the tests of every section.
#[cfg(test)]
mod test_support {
    use super::*;

    pub(super) fn issues(toml: &str) -> Vec<String> {
        match Config::from_toml(toml) {
            Err(ConfigError::Invalid(issues)) => issues.iter().map(ToString::to_string).collect(),
            other => panic!("expected validation issues, got {other:?}"),
        }
    }

    /// Asserts that validation reports exactly one issue, with this text.
    pub(super) fn one_issue(toml: &str, expected: &str) {
        assert_eq!(issues(toml), vec![expected.to_string()]);
    }

    pub(super) fn parse_error(toml: &str) -> String {
        match Config::from_toml(toml) {
            Err(ConfigError::Parse(msg)) => msg,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    pub(super) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn prefix_rules() {
        one_issue(
            "prefix = \"\"",
            "config key prefix: is empty: set a prefix such as \"warren\"",
        );
        one_issue(
            "prefix = \"a..b\"",
            "config key prefix: \"a..b\" is not a valid prefix: use words of letters, digits, \
             '_' or '-' joined by single dots, such as \"warren\" or \"acme.prod\"",
        );
        assert_eq!(issues("prefix = \"a b\"").len(), 1);
        let long = "a".repeat(65);
        one_issue(
            &format!("prefix = \"{long}\""),
            &format!("config key prefix: \"{long}\" is 65 characters long: use at most 64"),
        );
        assert!(Config::from_toml("prefix = \"Acme-1.prod_2\"").is_ok());
    }
}
