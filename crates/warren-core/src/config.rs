//! The configuration schema, how it is layered, and its validation.
//!
//! Layers, lowest first: the built-in `config/default.toml` (compiled in),
//! an optional file, then `WARREN__SECTION__KEY` environment variables. Single
//! values and tables merge key by key; an array in a higher layer (such as
//! `[[queues]]`) replaces the lower one as a whole. Unknown keys are errors.
//! [`Config::validate`] then checks the whole result at once and reports
//! every problem, each naming its key, its value and the fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::names::Names;
use crate::routes;

/// The built-in configuration, the lowest layer of every load.
const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// Prefix of environment variables that set configuration keys.
const ENV_PREFIX: &str = "WARREN__";

/// Configuration keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &["worker.queues", "http.allow", "http.deny"];

/// Origin the config crate reports for values set from the environment.
const ENV_ORIGIN: &str = "the environment";

/// Longest prefix accepted, so derived names stay readable and within AMQP's
/// 255-byte limit.
const MAX_PREFIX_CHARS: usize = 64;

/// RabbitMQ refuses messages larger than 512 MiB.
const MAX_BODY_LIMIT: usize = 512 * 1024 * 1024;

/// AMQP limits queue and exchange names to 255 bytes.
const MAX_NAME_BYTES: usize = 255;

/// Longest cron schedule name: it appears in task ids and internal queue
/// names, which must stay readable.
const MAX_CRON_NAME_CHARS: usize = 64;

/// Highest AMQP priority a task may carry (contract: 0..9).
const MAX_TASK_PRIORITY: u8 = 9;

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
    /// Cron schedules, one per `[[cron]]` entry; empty by default.
    #[serde(default)]
    pub cron: Vec<CronConfig>,
    /// Outbound HTTP of the built-in `http.*` and `file.*` task types.
    #[serde(default)]
    pub http: HttpConfig,
    /// The task tracker: its database, retention and HTTP address.
    #[serde(default)]
    pub tracker: TrackerConfig,
}

fn default_prefix() -> String {
    "warren".into()
}

/// How to reach RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URI of the broker; its password is redacted when printed.
    pub url: BrokerUrl,
    /// Base URL of the RabbitMQ management HTTP API.
    pub management_url: String,
    /// AMQP connections each process keeps open (1..=64).
    pub pool_size: usize,
    /// Give up connecting after this many milliseconds.
    pub connect_timeout_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: BrokerUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            management_url: "http://127.0.0.1:15672".into(),
            pool_size: 4,
            connect_timeout_ms: 5000,
        }
    }
}

/// An AMQP URI (`amqp://user:pass@host:port/vhost`). `Debug` and `Display`
/// show it with the password replaced by `***`, so it can be logged;
/// [`BrokerUrl::expose`] gives the real URI to the connection code.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    /// Wraps a URI as given; nothing is checked here ([`Config::validate`] does).
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The real URI, password included: only for opening connections.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URI with the password, if any, replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_userinfo(&self.0)
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BrokerUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of `scheme://user:pass@host...` with `***`. The
/// credentials are taken to end at the last `@`, so a password holding an
/// unencoded `/` or `@` is still hidden; when in doubt, more is hidden.
fn redact_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_string();
    };
    format!("{}***{}", &url[..start + colon + 1], &rest[at..])
}

/// One work queue, declared as `P.q.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Short name (`io`): lowercase letters, digits, `_` and `-`; unique.
    #[serde(default)]
    pub name: String,
    /// Highest priority the queue honours (`x-max-priority`), 1..=255.
    /// Quorum queues ignore it on RabbitMQ before 4.0 and know only two
    /// levels from 4.0 on; Warren declares no priority for them.
    #[serde(
        default = "default_max_priority",
        deserialize_with = "deserialize_priority"
    )]
    pub max_priority: u8,
    /// Classic (the default) or quorum (replicated) queue.
    #[serde(rename = "type", default)]
    pub kind: QueueKind,
    /// Whether task types that no route matches go to this queue.
    #[serde(default)]
    pub default: bool,
}

fn default_max_priority() -> u8 {
    10
}

/// Reads a priority as any integer so an out-of-range value gets a message
/// that says the range, not only "expected u8".
fn deserialize_priority<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let value = i64::deserialize(d)?;
    u8::try_from(value).map_err(|_| {
        serde::de::Error::custom(format!(
            "{value} is out of range: must be 1..=255 (RabbitMQ limit)"
        ))
    })
}

/// The RabbitMQ queue type of a work queue, written `"classic"` or `"quorum"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// A classic queue, with message priorities.
    #[default]
    Classic,
    /// A quorum queue: replicated across the cluster; no priorities before
    /// RabbitMQ 4.0.
    Quorum,
}

impl<'de> Deserialize<'de> for QueueKind {
    /// Read by hand so an unknown type gets a message that lists the choices.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        match word.as_str() {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            _ => Err(serde::de::Error::custom(format!(
                "{word:?} is not a queue type: use \"classic\" or \"quorum\""
            ))),
        }
    }
}

impl QueueKind {
    /// The value as written in the configuration (`classic`, `quorum`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// A topic binding from task types to one queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Topic pattern matched against the task type (`*` one word, `#` any).
    #[serde(default)]
    pub pattern: String,
    /// Short name of the `[[queues]]` entry the matching tasks go to.
    #[serde(default)]
    pub queue: String,
}

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
    /// On shutdown, how long running tasks may finish before being aborted.
    pub grace_period_ms: u64,
    /// Default task timeout, overridden by `x-warren-timeout-ms`.
    pub task_timeout_ms: u64,
    /// Directory for files that tasks produce.
    pub data_dir: PathBuf,
    /// Upper bound of the reconnect backoff.
    pub reconnect_max_ms: u64,
    /// Per task type caps on tasks run at once within this worker
    /// (`{ "file.download" = 2 }`), below `concurrency`.
    pub type_concurrency: BTreeMap<String, usize>,
    /// Address of this worker's `/metrics`, `/healthz` and `/readyz`
    /// (`host:port`); empty turns them off.
    pub listen: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            concurrency: 8,
            prefetch: 16,
            grace_period_ms: 30_000,
            task_timeout_ms: 300_000,
            data_dir: PathBuf::from("data"),
            reconnect_max_ms: 10_000,
            type_concurrency: BTreeMap::new(),
            listen: "127.0.0.1:8090".into(),
        }
    }
}

/// Size limits on task bodies and results.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest task body accepted (larger: dead `invalid`); at most 512 MiB.
    pub max_body_bytes: usize,
    /// Largest result carried in an event (larger: truncated with a preview).
    pub max_result_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_result_bytes: 64 * 1024,
        }
    }
}

/// Retry policies: one default and overrides per exact task type.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(from = "RawRetryConfig")]
pub struct RetryConfig {
    /// Policy of task types without an entry in `types`.
    pub default: RetryPolicy,
    /// Policies keyed by exact task type (`[retry.types."http.request"]`).
    /// Keys an entry leaves out were filled in from `default` at load time.
    pub types: BTreeMap<String, RetryPolicy>,
}

/// The retry section as written: type entries may leave keys out.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawRetryConfig {
    default: RetryPolicy,
    types: BTreeMap<String, PartialRetryPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialRetryPolicy {
    max_retries: Option<u32>,
    base_ms: Option<u64>,
    cap_ms: Option<u64>,
}

impl From<RawRetryConfig> for RetryConfig {
    fn from(raw: RawRetryConfig) -> Self {
        let default = raw.default;
        let types = raw
            .types
            .into_iter()
            .map(|(task_type, p)| {
                let policy = RetryPolicy {
                    max_retries: p.max_retries.unwrap_or(default.max_retries),
                    base_ms: p.base_ms.unwrap_or(default.base_ms),
                    cap_ms: p.cap_ms.unwrap_or(default.cap_ms),
                };
                (task_type, policy)
            })
            .collect();
        Self { default, types }
    }
}

/// How often and how patiently one task type is retried.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt (N allows N + 1 attempts).
    pub max_retries: u32,
    /// Backoff ceiling of the first retry, in milliseconds.
    pub base_ms: u64,
    /// Largest backoff ceiling, in milliseconds; at least `base_ms`.
    pub cap_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_ms: 1000,
            cap_ms: 300_000,
        }
    }
}

/// Checks a `host:port` listen address (`""` turns it off when `optional`).
fn check_listen(issues: &mut Issues, key: &str, value: &str, port: &str, optional: bool) {
    if optional && value.is_empty() {
        return;
    }
    if value.parse::<std::net::SocketAddr>().is_err() {
        let off = if optional {
            ", or \"\" to turn it off"
        } else {
            ""
        };
        issues.add(
            key,
            format!(
                "{value:?} is not an address and port: use one such as \"127.0.0.1:{port}\" \
                 (\"0.0.0.0:{port}\" listens on every interface){off}"
            ),
        );
    }
}

/// Settings of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Longest delay a delayed task may ask for (further: dead `invalid`).
    pub max_delay_ms: u64,
    /// Redeliveries without an outcome tolerated before a task is poison.
    pub poison_redeliveries: u32,
    /// How long a cancel request is remembered.
    pub cancel_ttl_ms: u64,
    /// Address of the scheduler's `/metrics`, `/healthz` and `/readyz`
    /// (`host:port`); empty turns them off.
    pub listen: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_delay_ms: 315_576_000_000,
            poison_redeliveries: 5,
            cancel_ttl_ms: 86_400_000,
            listen: "127.0.0.1:8091".into(),
        }
    }
}

/// One cron schedule: a task published at each fire time by the one
/// scheduler replica that holds the cron lock.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronConfig {
    /// Short name (`nightly-report`): lowercase letters, digits, `_` and
    /// `-`; unique. Part of every fired task's id, `cron:<name>:<time>`.
    #[serde(default)]
    pub name: String,
    /// Cron expression with seconds, six fields:
    /// `sec min hour day-of-month month day-of-week` (`"0 */5 * * * *"`).
    #[serde(default)]
    pub schedule: String,
    /// IANA time zone the schedule is read in (`"Europe/Paris"`); `"UTC"` by
    /// default. The scheduler resolves it against its time zone database.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Task type published at each fire time; a route or the default queue
    /// must take it.
    #[serde(default)]
    pub task_type: String,
    /// The task's arguments (any TOML value, sent as JSON); `{}` by default.
    #[serde(default = "default_cron_args")]
    pub args: serde_json::Value,
    /// AMQP priority of the published tasks, 0..=9; none by default.
    #[serde(default, deserialize_with = "deserialize_task_priority")]
    pub priority: Option<u8>,
    /// What to do with fire times missed while no scheduler ran.
    #[serde(default)]
    pub missed: MissedFires,
}

fn default_timezone() -> String {
    "UTC".into()
}

fn default_cron_args() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// Reads an optional task priority as any integer so an out-of-range value
/// gets a message that says the range; [`Config::validate`] checks 0..=9.
fn deserialize_task_priority<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let Some(value) = Option::<i64>::deserialize(d)? else {
        return Ok(None);
    };
    u8::try_from(value).map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{value} is out of range: must be 0..=9 (task priorities)"
        ))
    })
}

/// What a schedule does with fire times that passed while no scheduler ran,
/// written `"skip"` or `"run_once"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissedFires {
    /// Publish nothing for them; the next fire time is the next one to come.
    #[default]
    Skip,
    /// Publish one task, for the latest missed fire time.
    RunOnce,
}

impl<'de> Deserialize<'de> for MissedFires {
    /// Read by hand so an unknown word gets a message that lists the choices.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        match word.as_str() {
            "skip" => Ok(Self::Skip),
            "run_once" => Ok(Self::RunOnce),
            _ => Err(serde::de::Error::custom(format!(
                "{word:?} is not a missed-fire policy: use \"skip\" or \"run_once\""
            ))),
        }
    }
}

impl MissedFires {
    /// The value as written in the configuration (`skip`, `run_once`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunOnce => "run_once",
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type or an
    /// unknown key; the text names the key when known.
    #[error("{0}")]
    Parse(String),
    /// The configuration parsed but breaks rules; every problem is listed.
    #[error("{}", join_issues(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn join_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One broken rule: the key and a problem text that states the value, what
/// is wrong with it and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The key, as written in TOML paths (`queues[1].max_priority`).
    pub key: String,
    /// The value, what is wrong and the fix.
    pub problem: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key {}: {}", self.key, self.problem)
    }
}

impl Config {
    /// Loads the built-in defaults (`config/default.toml`, compiled in),
    /// then the file if given, then `WARREN__SECTION__KEY` variables from the
    /// process environment (`WARREN__WORKER__QUEUES` is a comma list), and
    /// validates the result. Every `WARREN__` variable must name a key.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| is_warren_var(k))
            .collect();
        Self::load_from(path, &env)
    }

    /// Like [`Config::load`] but with an explicit environment instead of the
    /// process's; variables without the `WARREN__` prefix are ignored.
    pub fn load_from(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(UserFile {
                    text,
                    label: format!("config file {}", path.display()),
                })
            }
            None => None,
        };
        Self::layered(file, env)
    }

    /// Lays a complete TOML document over the built-in defaults and
    /// validates the result; no environment is read.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        let file = UserFile {
            text: toml.to_string(),
            label: "config TOML".into(),
        };
        Self::layered(Some(file), &[])
    }

    fn layered(file: Option<UserFile>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        use config::{File, FileFormat};

        let file_label = file.as_ref().map(|f| f.label.clone());
        let convert = |e| parse_error(e, file_label.as_deref(), env);

        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(file) = &file {
            builder = builder.add_source(File::from_str(&file.text, FileFormat::Toml));
        }
        let origin = ENV_ORIGIN.to_string();
        for (var, value) in env {
            let Some(key) = env_key(var) else { continue };
            let kind = if ENV_LIST_KEYS.contains(&key.as_str()) {
                let items = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| config::Value::new(Some(&origin), s))
                    .collect::<Vec<_>>();
                config::ValueKind::Array(items)
            } else {
                config::ValueKind::String(value.clone())
            };
            builder = builder
                .set_override(key.as_str(), config::Value::new(Some(&origin), kind))
                .map_err(|_| {
                    ConfigError::Parse(format!(
                        "environment variable {var}: does not name a config key; \
                         use WARREN__SECTION__KEY, for example WARREN__WORKER__CONCURRENCY"
                    ))
                })?;
        }
        let config: Config = builder
            .build()
            .map_err(convert)?
            .try_deserialize()
            .map_err(convert)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule and returns all broken ones at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        self.check_prefix(&mut issues);
        self.check_broker(&mut issues);
        self.check_queues(&mut issues);
        self.check_routes(&mut issues);
        self.check_worker(&mut issues);
        self.check_limits(&mut issues);
        self.check_retry(&mut issues);
        self.check_scheduler(&mut issues);
        self.check_cron(&mut issues);
        self.check_http(&mut issues);
        self.check_tracker(&mut issues);
        if issues.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(issues.0))
        }
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

    fn queue_names_hint(&self) -> String {
        if self.queues.is_empty() {
            return "no queues are configured".into();
        }
        let names: Vec<String> = self
            .queues
            .iter()
            .map(|q| format!("{:?}", q.name))
            .collect();
        format!("configured queues are {}", names.join(", "))
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

    fn check_broker(&self, issues: &mut Issues) {
        let b = &self.broker;
        let url = b.url.expose().to_ascii_lowercase();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            issues.add(
                "broker.url",
                format!(
                    "\"{}\" is not an AMQP URI: use amqp://user:pass@host:5672/vhost \
                     (%2f for the \"/\" vhost, amqps:// for TLS)",
                    b.url.redacted()
                ),
            );
        }
        let mgmt = b.management_url.to_ascii_lowercase();
        if !(mgmt.starts_with("http://") || mgmt.starts_with("https://")) {
            issues.add(
                "broker.management_url",
                format!(
                    "\"{}\" is not an HTTP URL: use http://host:15672 (or https://)",
                    redact_userinfo(&b.management_url)
                ),
            );
        }
        if !(1..=64).contains(&b.pool_size) {
            issues.add(
                "broker.pool_size",
                format!("{} is out of range: must be 1..=64", b.pool_size),
            );
        }
        if b.connect_timeout_ms == 0 {
            issues.add(
                "broker.connect_timeout_ms",
                "0 would give up at once: set it above 0, for example 5000",
            );
        }
    }

    fn check_queues(&self, issues: &mut Issues) {
        if self.queues.is_empty() {
            issues.add(
                "queues",
                "no queues are configured: add at least one [[queues]] entry",
            );
        }
        let names = self.names();
        let mut first_with_name: BTreeMap<&str, usize> = BTreeMap::new();
        let mut first_default: Option<usize> = None;
        for (i, q) in self.queues.iter().enumerate() {
            let key = format!("queues[{i}].name");
            if q.name.is_empty() {
                issues.add(
                    &key,
                    "is missing or empty: name the queue with lowercase letters, digits, '_' or '-'",
                );
            } else if !q
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                issues.add(
                    &key,
                    format!(
                        "{:?} is not a valid queue name: use lowercase letters, digits, '_' and '-' only",
                        q.name
                    ),
                );
            } else if names.work_queue(&q.name).len() > MAX_NAME_BYTES {
                issues.add(
                    &key,
                    format!(
                        "{:?} makes the queue name {} bytes long: AMQP allows {MAX_NAME_BYTES}; shorten it",
                        q.name,
                        names.work_queue(&q.name).len()
                    ),
                );
            } else if let Some(&first) = first_with_name.get(q.name.as_str()) {
                issues.add(
                    &key,
                    format!(
                        "{:?} is also the name of queues[{first}]: queue names must be unique; \
                         rename or remove one",
                        q.name
                    ),
                );
            } else {
                first_with_name.insert(&q.name, i);
            }
            if q.max_priority == 0 {
                issues.add(
                    format!("queues[{i}].max_priority"),
                    "0 is out of range: must be 1..=255 (RabbitMQ limit)",
                );
            }
            if q.default {
                match first_default {
                    Some(first) => issues.add(
                        format!("queues[{i}].default"),
                        format!(
                            "true, but queues[{first}] ({:?}) is already the default: \
                             mark at most one queue default = true",
                            self.queues[first].name
                        ),
                    ),
                    None => first_default = Some(i),
                }
            }
        }
    }

    fn check_routes(&self, issues: &mut Issues) {
        let mut valid: Vec<usize> = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            match routes::is_valid_pattern(&r.pattern) {
                Ok(()) => valid.push(i),
                Err(why) => issues.add(
                    format!("routes[{i}].pattern"),
                    format!("{:?} is not a valid topic pattern: {why}", r.pattern),
                ),
            }
            if self.queue(&r.queue).is_none() {
                issues.add(
                    format!("routes[{i}].queue"),
                    format!(
                        "{:?} is not a configured queue: {}; use one of them or add a \
                         [[queues]] entry with that name",
                        r.queue,
                        self.queue_names_hint()
                    ),
                );
            }
        }
        for (n, &j) in valid.iter().enumerate() {
            for &i in &valid[..n] {
                let (a, b) = (&self.routes[i], &self.routes[j]);
                if let Some(example) = routes::overlap_example(&a.pattern, &b.pattern) {
                    let consequence = if a.queue == b.queue {
                        "every task type must have exactly one route: merge them or make the \
                         patterns disjoint"
                    } else {
                        "a task would run twice: make the patterns disjoint"
                    };
                    issues.add(
                        format!("routes[{j}].pattern"),
                        format!(
                            "{:?} overlaps routes[{i}].pattern = {:?} (both match task type \
                             {example:?}); {consequence}",
                            b.pattern, a.pattern
                        ),
                    );
                }
            }
        }
    }

    fn check_worker(&self, issues: &mut Issues) {
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
        if w.concurrency == 0 {
            issues.add(
                "worker.concurrency",
                "0 would run no task: set it to at least 1",
            );
        }
        if w.prefetch == 0 {
            issues.add(
                "worker.prefetch",
                "0 means unlimited deliveries in AMQP: set it to at least worker.concurrency",
            );
        } else if usize::from(w.prefetch) < w.concurrency {
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
        if w.task_timeout_ms == 0 {
            issues.add(
                "worker.task_timeout_ms",
                "0 would time out every task: set it above 0, for example 300000 (5 minutes)",
            );
        }
        if w.reconnect_max_ms == 0 {
            issues.add(
                "worker.reconnect_max_ms",
                "0 would reconnect in a tight loop: set it above 0, for example 10000",
            );
        }
        if w.data_dir.as_os_str().is_empty() {
            issues.add(
                "worker.data_dir",
                "is empty: set a directory, for example \"data\"",
            );
        }
    }

    fn check_limits(&self, issues: &mut Issues) {
        let l = &self.limits;
        if l.max_body_bytes == 0 {
            issues.add(
                "limits.max_body_bytes",
                "0 would reject every task: set it above 0, for example 10485760 (10 MiB)",
            );
        } else if l.max_body_bytes > MAX_BODY_LIMIT {
            issues.add(
                "limits.max_body_bytes",
                format!(
                    "{} exceeds {MAX_BODY_LIMIT} (512 MiB), the largest message RabbitMQ \
                     accepts: lower it",
                    l.max_body_bytes
                ),
            );
        }
        if l.max_result_bytes == 0 {
            issues.add(
                "limits.max_result_bytes",
                "0 would truncate every result: set it above 0, for example 65536 (64 KiB)",
            );
        }
    }

    fn check_retry(&self, issues: &mut Issues) {
        check_policy(&self.retry.default, "retry.default", issues);
        for (task_type, policy) in &self.retry.types {
            let key = format!("retry.types.{task_type:?}");
            if !routes::is_valid_task_type(task_type) {
                issues.add(
                    &key,
                    "is not a task type: retry policies are keyed by an exact task type, \
                     words of letters, digits, '_' or '-' joined by '.', without '*' or '#'",
                );
            }
            check_policy(policy, &key, issues);
        }
    }

    fn check_scheduler(&self, issues: &mut Issues) {
        check_listen(
            issues,
            "scheduler.listen",
            &self.scheduler.listen,
            "8091",
            true,
        );
        let s = &self.scheduler;
        if s.max_delay_ms == 0 {
            issues.add(
                "scheduler.max_delay_ms",
                "0 would reject every delayed task: set it above 0, for example 315576000000 \
                 (10 years)",
            );
        }
        if s.poison_redeliveries == 0 {
            issues.add(
                "scheduler.poison_redeliveries",
                "0 would park a task after a single worker crash: set it to at least 1, \
                 for example 5",
            );
        }
        if s.cancel_ttl_ms == 0 {
            issues.add(
                "scheduler.cancel_ttl_ms",
                "0 would forget cancel requests at once: set it above 0, for example \
                 86400000 (24 hours)",
            );
        }
    }

    fn check_cron(&self, issues: &mut Issues) {
        let mut first_with_name: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, c) in self.cron.iter().enumerate() {
            let key = |field: &str| format!("cron[{i}].{field}");
            if c.name.is_empty() {
                issues.add(
                    key("name"),
                    "is missing or empty: name the schedule with lowercase letters, digits, \
                     '_' or '-'",
                );
            } else if !is_short_name(&c.name) {
                issues.add(
                    key("name"),
                    format!(
                        "{:?} is not a valid schedule name: use lowercase letters, digits, '_' \
                         and '-' only",
                        c.name
                    ),
                );
            } else if c.name.len() > MAX_CRON_NAME_CHARS {
                issues.add(
                    key("name"),
                    format!(
                        "{:?} is {} characters long: use at most {MAX_CRON_NAME_CHARS}",
                        c.name,
                        c.name.len()
                    ),
                );
            } else if let Some(&first) = first_with_name.get(c.name.as_str()) {
                issues.add(
                    key("name"),
                    format!(
                        "{:?} is also the name of cron[{first}]: schedule names must be \
                         unique; rename or remove one",
                        c.name
                    ),
                );
            } else {
                first_with_name.insert(&c.name, i);
            }

            if c.schedule.trim().is_empty() {
                issues.add(
                    key("schedule"),
                    "is missing or empty: set a cron expression with seconds, such as \
                     \"0 */5 * * * *\" (every 5 minutes)",
                );
            } else if let Err(why) = check_cron_expression(&c.schedule) {
                issues.add(key("schedule"), format!("{:?} {why}", c.schedule));
            }

            if !is_time_zone_name(&c.timezone) {
                issues.add(
                    key("timezone"),
                    format!(
                        "{:?} is not an IANA time zone name: use one such as \"UTC\" (the \
                         default), \"Europe/Paris\" or \"America/New_York\"",
                        c.timezone
                    ),
                );
            }

            if c.task_type.is_empty() {
                issues.add(
                    key("task_type"),
                    "is missing or empty: set the task type each fire publishes, such as \
                     \"diag.echo\"",
                );
            } else if !routes::is_valid_task_type(&c.task_type) {
                issues.add(
                    key("task_type"),
                    format!(
                        "{:?} is not a task type: use words of letters, digits, '_' or '-' \
                         joined by '.', without '*' or '#'",
                        c.task_type
                    ),
                );
            } else if self.default_queue().is_none()
                && !self
                    .routes
                    .iter()
                    .any(|r| routes::matches(&r.pattern, &c.task_type))
            {
                issues.add(
                    key("task_type"),
                    format!(
                        "{:?} matches no [[routes]] pattern and no queue is default = true, so \
                         every fired task would be parked in {}: add a [[routes]] entry for it \
                         or mark a queue default = true",
                        c.task_type,
                        self.names().unroutable()
                    ),
                );
            }

            if let Some(p) = c.priority.filter(|&p| p > MAX_TASK_PRIORITY) {
                issues.add(
                    key("priority"),
                    format!(
                        "{p} is out of range: must be 0..={MAX_TASK_PRIORITY} (task \
                         priorities); lower it or leave it out"
                    ),
                );
            }
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

/// Whether `tz` is shaped like an IANA time zone name (`UTC`, `Europe/Paris`,
/// `Etc/GMT+3`). Whether the database knows it is checked by the scheduler,
/// which carries the database.
fn is_time_zone_name(tz: &str) -> bool {
    tz.len() <= MAX_PREFIX_CHARS
        && tz.starts_with(|c: char| c.is_ascii_alphabetic())
        && tz.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
        })
}

/// One field of a cron expression: its name, its range and the names its
/// values may be written with (the first name stands for `first_named`).
struct CronField {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    first_named: u32,
}

const MONTH_NAMES: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAY_NAMES: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
const DAY_OF_MONTH: usize = 3;
const DAY_OF_WEEK: usize = 5;

/// The six fields of Warren's cron expressions, seconds first. Day of week
/// 0 and 7 are both Sunday.
const CRON_FIELDS: [CronField; 6] = [
    CronField {
        name: "second",
        min: 0,
        max: 59,
        names: &[],
        first_named: 0,
    },
    CronField {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        first_named: 0,
    },
    CronField {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        first_named: 0,
    },
    CronField {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
        first_named: 0,
    },
    CronField {
        name: "month",
        min: 1,
        max: 12,
        names: MONTH_NAMES,
        first_named: 1,
    },
    CronField {
        name: "day-of-week",
        min: 0,
        max: 7,
        names: WEEKDAY_NAMES,
        first_named: 0,
    },
];

/// Checks a six-field cron expression; the error continues a sentence that
/// starts with the quoted expression. Accepted per field: `*`, values (or
/// names for months and weekdays), ranges `a-b`, steps `*/n` and `a-b/n`,
/// lists joined by `,`; `?` for either day field; `L` and `nW` in the day of
/// month; `nL` and `n#k` in the day of week.
fn check_cron_expression(expr: &str) -> Result<(), String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() == 5 {
        return Err(format!(
            "has 5 fields, but schedules start with a seconds field: use 6, for example \
             \"0 {}\" to fire at second 0",
            fields.join(" ")
        ));
    }
    if fields.len() != CRON_FIELDS.len() {
        return Err(format!(
            "has {} fields: use 6, \"second minute hour day-of-month month day-of-week\", \
             for example \"0 */5 * * * *\" (every 5 minutes)",
            fields.len()
        ));
    }
    for (index, (field, text)) in CRON_FIELDS.iter().zip(&fields).enumerate() {
        for item in text.split(',') {
            check_cron_item(field, index, item).map_err(|why| {
                format!(
                    "is not a valid cron expression: {} field {text:?}: {why}",
                    field.name
                )
            })?;
        }
    }
    Ok(())
}

fn check_cron_item(field: &CronField, index: usize, item: &str) -> Result<(), String> {
    if item.is_empty() {
        return Err("an empty list item (a comma too many)".into());
    }
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(step)),
        None => (item, None),
    };
    if let Some(step) = step {
        if !step.parse::<u16>().is_ok_and(|n| n >= 1) {
            return Err(format!(
                "the step {step:?} of {item:?} must be a whole number of at least 1"
            ));
        }
        if range != "*" && range != "?" && !range.contains('-') {
            return Err(format!(
                "{item:?} steps from a single value: write \"*/{step}\", or a range such as \
                 \"{range}-{}/{step}\"",
                field.max
            ));
        }
    }
    if range == "*" {
        return Ok(());
    }
    if range == "?" {
        return if index == DAY_OF_MONTH || index == DAY_OF_WEEK {
            Ok(())
        } else {
            Err("\"?\" is allowed only in the day-of-month and day-of-week fields".into())
        };
    }
    if step.is_none() && index == DAY_OF_MONTH {
        if range.eq_ignore_ascii_case("L") {
            return Ok(());
        }
        if let Some(day) = range.strip_suffix(['W', 'w']) {
            return cron_value(field, day).map(drop);
        }
    }
    if step.is_none() && index == DAY_OF_WEEK {
        if let Some((day, nth)) = range.split_once('#') {
            cron_value(field, day)?;
            return if nth.eq_ignore_ascii_case("L") || matches!(nth, "1" | "2" | "3" | "4" | "5") {
                Ok(())
            } else {
                Err(format!(
                    "the occurrence {nth:?} of {item:?} must be 1..=5 or L (the last)"
                ))
            };
        }
        if let Some(day) = range.strip_suffix(['L', 'l']) {
            return cron_value(field, day).map(drop);
        }
    }
    let (low, high) = match range.split_once('-') {
        Some((a, b)) => {
            let high = match cron_value(field, b)? {
                // `FRI-SUN` ends on the Sunday written 7.
                0 if index == DAY_OF_WEEK && !b.starts_with(|c: char| c.is_ascii_digit()) => 7,
                n => n,
            };
            (cron_value(field, a)?, high)
        }
        None => {
            let v = cron_value(field, range)?;
            (v, v)
        }
    };
    if low > high {
        return Err(format!(
            "the range {range:?} runs backwards: write it from low to high"
        ));
    }
    Ok(())
}

/// One value of a cron field, as a number in range or a name.
fn cron_value(field: &CronField, text: &str) -> Result<u32, String> {
    if let Ok(n) = text.parse::<u32>() {
        return if (field.min..=field.max).contains(&n) {
            Ok(n)
        } else {
            Err(format!(
                "{n} is out of range: a {} is {}..={}",
                field.name, field.min, field.max
            ))
        };
    }
    if let Some(i) = field
        .names
        .iter()
        .position(|n| n.eq_ignore_ascii_case(text))
    {
        return Ok(field.first_named + i as u32);
    }
    let names = if field.names.is_empty() {
        String::new()
    } else {
        format!(
            " or a name {}-{}",
            field.names[0],
            field.names[field.names.len() - 1]
        )
    };
    Err(format!(
        "{text:?} is not a value: use a number {}..={}{names}",
        field.min, field.max
    ))
}

impl Config {
    fn check_http(&self, issues: &mut Issues) {
        let h = &self.http;
        for (list, entries) in [("allow", &h.allow), ("deny", &h.deny)] {
            for (i, entry) in entries.iter().enumerate() {
                if let Err(why) = HostRule::parse(entry) {
                    issues.add(format!("http.{list}[{i}]"), format!("{entry:?} {why}"));
                }
            }
        }
        if h.max_redirects > MAX_HTTP_REDIRECTS {
            issues.add(
                "http.max_redirects",
                format!(
                    "{} is above {MAX_HTTP_REDIRECTS}: a longer chain is a loop or an abuse; \
                     lower it (0 follows none)",
                    h.max_redirects
                ),
            );
        }
        if h.timeout_ms == 0 {
            issues.add(
                "http.timeout_ms",
                "0 would time out every request: set it above 0, for example 30000",
            );
        }
        if h.connect_timeout_ms == 0 {
            issues.add(
                "http.connect_timeout_ms",
                "0 would time out every connection: set it above 0, for example 10000",
            );
        }
        if h.max_response_bytes == 0 {
            issues.add(
                "http.max_response_bytes",
                "0 would cut every response body: set it above 0, for example 32768",
            );
        } else if self.limits.max_result_bytes > 0
            && h.max_response_bytes > self.limits.max_result_bytes
        {
            issues.add(
                "http.max_response_bytes",
                format!(
                    "{} is above limits.max_result_bytes = {}: such a body would not fit in \
                     the result, which would be cut to a preview; lower it or raise \
                     limits.max_result_bytes",
                    h.max_response_bytes, self.limits.max_result_bytes
                ),
            );
        }
        if h.max_file_bytes == 0 {
            issues.add(
                "http.max_file_bytes",
                "0 would refuse every transfer: set it above 0, for example 10737418240 (10 GiB)",
            );
        }
        for (task_type, &cap) in &self.worker.type_concurrency {
            let key = format!("worker.type_concurrency.{task_type:?}");
            if !routes::is_valid_task_type(task_type) {
                issues.add(
                    &key,
                    "is not a task type: caps are keyed by an exact task type, words of \
                     letters, digits, '_' or '-' joined by '.', without '*' or '#'",
                );
            }
            if cap == 0 {
                issues.add(
                    &key,
                    "0 would never run this type: set it to at least 1, or remove the entry",
                );
            }
        }
    }
}

/// Most redirects `http.max_redirects` may allow.
const MAX_HTTP_REDIRECTS: usize = 20;

/// Most events `tracker.batch_max_events` may put in one transaction.
const MAX_TRACKER_BATCH: usize = 10_000;

/// The task tracker (`warren tracker`, also inside `warren up`): where it
/// keeps task states, how long, and where it serves its HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerConfig {
    /// `sqlite://PATH` (one file, created if missing) or
    /// `postgres://user:pass@host:5432/db`; its password is redacted when printed.
    pub database_url: DatabaseUrl,
    /// How long a task is kept after its last event, in milliseconds.
    pub retention_ms: u64,
    /// Address of the dashboard, the JSON API, `/metrics` and health (`host:port`).
    pub listen: String,
    /// Most events written in one transaction.
    pub batch_max_events: usize,
    /// Longest an event waits for its batch to fill before it is written.
    pub batch_max_ms: u64,
    /// Largest result stored per task; a larger one is kept as a truncated preview.
    pub max_result_bytes: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            database_url: DatabaseUrl::new("sqlite://warren-tracker/tracker.db"),
            retention_ms: 7 * 24 * 3600 * 1000,
            listen: "127.0.0.1:8089".into(),
            batch_max_events: 2000,
            batch_max_ms: 50,
            max_result_bytes: 16 * 1024,
        }
    }
}

/// A database URL (`sqlite://PATH` or `postgres://...`). `Debug` and
/// `Display` hide its password, so it can be logged; [`DatabaseUrl::expose`]
/// gives the real URL to the connection code.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a URL as given; [`Config::validate`] checks it.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The real URL, password included: only for opening connections.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password, if any, replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_userinfo(&self.0)
    }

    /// Whether this is a PostgreSQL URL (`postgres://` or `postgresql://`).
    pub fn is_postgres(&self) -> bool {
        let lower = self.0.to_ascii_lowercase();
        lower.starts_with("postgres://") || lower.starts_with("postgresql://")
    }

    /// The file of a `sqlite://PATH` or `sqlite:PATH` URL (query removed);
    /// `None` for other URLs.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let rest = self
            .0
            .strip_prefix("sqlite://")
            .or_else(|| self.0.strip_prefix("sqlite:"))?;
        let path = rest.split('?').next().unwrap_or_default();
        Some(PathBuf::from(path))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password in any `scheme://user:pass@host...` URL with `***`
/// (for URLs that are not the broker's, such as the management API's).
pub fn redact_url(url: &str) -> String {
    redact_userinfo(url)
}

impl Config {
    fn check_tracker(&self, issues: &mut Issues) {
        let t = &self.tracker;
        let url = &t.database_url;
        if let Some(path) = url.sqlite_path() {
            let data_dir = &self.worker.data_dir;
            if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" {
                issues.add(
                    "tracker.database_url",
                    format!(
                        "\"{url}\" names no file: use sqlite://PATH, for example \
                         sqlite://warren-tracker/tracker.db (the tracker and `warren status` \
                         must share it)"
                    ),
                );
            } else if !data_dir.as_os_str().is_empty()
                && normalized(&path).starts_with(normalized(data_dir))
            {
                issues.add(
                    "tracker.database_url",
                    format!(
                        "\"{url}\" is inside worker.data_dir = {:?}, where file.download and \
                         file.upload tasks could overwrite or send it: put it elsewhere, for \
                         example sqlite://warren-tracker/tracker.db",
                        data_dir.display().to_string()
                    ),
                );
            }
        } else if !url.is_postgres() {
            issues.add(
                "tracker.database_url",
                format!(
                    "\"{url}\" is not a database URL: use sqlite://PATH (one file, created \
                     if missing) or postgres://user:pass@host:5432/database"
                ),
            );
        }
        if t.retention_ms == 0 {
            issues.add(
                "tracker.retention_ms",
                "0 would delete every task at once: set it above 0, for example 604800000 \
                 (7 days)",
            );
        }
        check_listen(issues, "tracker.listen", &t.listen, "8089", false);
        if !(1..=MAX_TRACKER_BATCH).contains(&t.batch_max_events) {
            issues.add(
                "tracker.batch_max_events",
                format!(
                    "{} is out of range: must be 1..={MAX_TRACKER_BATCH}, for example 2000",
                    t.batch_max_events
                ),
            );
        }
        if t.batch_max_ms == 0 {
            issues.add(
                "tracker.batch_max_ms",
                "0 would write every event alone: set it above 0, for example 50",
            );
        }
        if t.max_result_bytes == 0 {
            issues.add(
                "tracker.max_result_bytes",
                "0 would keep no result: set it above 0, for example 16384 (16 KiB)",
            );
        }
    }
}

/// A path without `.` components, for comparing where files live.
fn normalized(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// Outbound HTTP of the built-in task types (`http.request`, `file.download`,
/// `file.upload`): where requests may go and how much they may move.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Hosts and networks requests may reach ([`HostRule`] syntax); empty
    /// means any not denied.
    pub allow: Vec<String>,
    /// Hosts and networks requests never reach; wins over `allow`.
    pub deny: Vec<String>,
    /// Whether loopback addresses (127.0.0.0/8, ::1) may be reached.
    pub allow_loopback: bool,
    /// Redirects followed per request (0 follows none), at most 20.
    pub max_redirects: usize,
    /// Default time limit of an `http.request` (its `timeout_ms` overrides
    /// it), and the longest a transfer may stall without receiving data.
    pub timeout_ms: u64,
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout_ms: u64,
    /// Largest response body an `http.request` result carries; longer bodies
    /// are cut and marked truncated. At most `limits.max_result_bytes`.
    pub max_response_bytes: usize,
    /// Largest file `file.download` writes or `file.upload` sends; a task's
    /// `max_bytes` may only lower it.
    pub max_file_bytes: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            allow_loopback: false,
            max_redirects: 5,
            timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            max_response_bytes: 32 * 1024,
            max_file_bytes: 10 * 1024 * 1024 * 1024,
        }
    }
}

/// One entry of `http.allow` or `http.deny`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    /// An address or a network in CIDR notation (`192.0.2.7`, `10.0.0.0/8`,
    /// `fd00::/8`): matches the addresses a host name resolves to.
    Network(IpAddr, u8),
    /// Exactly this host name (`api.example.com`), compared without case.
    Host(String),
    /// Every host name below a domain, written `*.example.com` (not
    /// `example.com` itself).
    Subdomains(String),
}

impl HostRule {
    /// Reads one entry; the error continues a sentence that starts with the
    /// quoted entry.
    pub fn parse(entry: &str) -> Result<HostRule, String> {
        let usage = "use a host name (api.example.com), *.domain for its subdomains, an \
                     address (192.0.2.7) or a network (10.0.0.0/8, fd00::/8)";
        if let Ok(ip) = entry.parse::<IpAddr>() {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(HostRule::Network(ip, bits));
        }
        if let Some((addr, bits)) = entry.split_once('/') {
            let (Ok(ip), Ok(bits)) = (addr.parse::<IpAddr>(), bits.parse::<u8>()) else {
                return Err(format!("is not a host name, address or network: {usage}"));
            };
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if bits > max {
                return Err(format!("has a prefix longer than {max} bits: {usage}"));
            }
            let base = network_base(ip, bits);
            if base != ip {
                return Err(format!(
                    "has bits set past its /{bits} prefix: write {base}/{bits}"
                ));
            }
            return Ok(HostRule::Network(ip, bits));
        }
        let (name, rule): (&str, fn(String) -> HostRule) = match entry.strip_prefix("*.") {
            Some(domain) => (domain, HostRule::Subdomains),
            None => (entry, HostRule::Host),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if valid {
            Ok(rule(name))
        } else {
            Err(format!("is not a host name, address or network: {usage}"))
        }
    }
}

/// `ip` with every bit past the first `bits` cleared.
fn network_base(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

fn check_policy(policy: &RetryPolicy, key: &str, issues: &mut Issues) {
    if policy.cap_ms < policy.base_ms {
        issues.add(
            format!("{key}.cap_ms"),
            format!(
                "{} is below {key}.base_ms = {}: raise cap_ms to at least {} or lower base_ms",
                policy.cap_ms, policy.base_ms, policy.base_ms
            ),
        );
    }
}

/// A word of a prefix: `[A-Za-z0-9_-]+`.
fn is_name_word(w: &str) -> bool {
    !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Default)]
struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn add(&mut self, key: impl AsRef<str>, problem: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.as_ref().to_string(),
            problem: problem.into(),
        });
    }
}

/// A configuration document above the defaults, and how to name it in errors.
struct UserFile {
    text: String,
    label: String,
}

fn is_warren_var(var: &str) -> bool {
    var.len() > ENV_PREFIX.len()
        && var.is_char_boundary(ENV_PREFIX.len())
        && var[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
}

/// `WARREN__WORKER__CONCURRENCY` -> `worker.concurrency`.
fn env_key(var: &str) -> Option<String> {
    is_warren_var(var).then(|| var[ENV_PREFIX.len()..].to_lowercase().replace("__", "."))
}

/// Turns a config-crate error into a one-line message naming the key and,
/// when known, where the value came from.
fn parse_error(
    e: config::ConfigError,
    file: Option<&str>,
    env: &[(String, String)],
) -> ConfigError {
    use config::ConfigError as E;

    let (key, mut problem, origin) = match e {
        E::Type {
            origin,
            unexpected,
            expected,
            key,
        } => (
            key,
            format!("invalid type: {unexpected}, expected {expected}"),
            origin,
        ),
        E::At { error, origin, key } => (key, error.to_string(), origin),
        E::Message(m) => (None, m, None),
        E::FileParse { cause, .. } => {
            let what = file.unwrap_or("built-in config/default.toml");
            return ConfigError::Parse(format!("cannot parse {what}: {cause}"));
        }
        other => (None, other.to_string(), None),
    };

    // The config crate writes `queues[0]name`; TOML paths say `queues[0].name`.
    let mut key = key.map(|k| {
        k.replace("]", "].")
            .replace("].[", "][")
            .trim_end_matches('.')
            .to_string()
    });
    // serde reports an unknown key at its parent; name the key itself.
    if let Some(rest) = problem.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            key = Some(match key {
                Some(parent) => format!("{parent}.{field}"),
                None => field.to_string(),
            });
            let expected = expected.trim_start_matches(", ");
            problem = format!("unknown key (check the spelling); {expected}");
        }
    }

    // The environment is the top layer: if it sets the key, the value came from there.
    let from_env = key.as_deref().and_then(|k| {
        env.iter()
            .find(|(var, _)| env_key(var).as_deref() == Some(k))
            .map(|(var, _)| format!(" (set by {var})"))
    });
    let source = from_env
        .or_else(|| match origin.as_deref() {
            Some(ENV_ORIGIN) => None,
            Some(other) => Some(format!(" (in {other})")),
            None => file.map(|f| format!(" (in {f})")),
        })
        .unwrap_or_default();

    ConfigError::Parse(match key {
        Some(key) => format!("config key {key}: {problem}{source}"),
        None => format!("{problem}{source}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(toml: &str) -> Vec<String> {
        match Config::from_toml(toml) {
            Err(ConfigError::Invalid(issues)) => issues.iter().map(ToString::to_string).collect(),
            other => panic!("expected validation issues, got {other:?}"),
        }
    }

    /// Asserts that validation reports exactly one issue, with this text.
    fn one_issue(toml: &str, expected: &str) {
        assert_eq!(issues(toml), vec![expected.to_string()]);
    }

    fn parse_error(toml: &str) -> String {
        match Config::from_toml(toml) {
            Err(ConfigError::Parse(msg)) => msg,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn built_in_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.prefix, "warren");
        assert_eq!(c.broker, BrokerConfig::default());
        assert_eq!(c.worker, WorkerConfig::default());
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.scheduler, SchedulerConfig::default());
        assert_eq!(c.retry.default, RetryPolicy::default());
        let names: Vec<&str> = c.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["io", "cpu", "diag"]);
        assert!(c.queues.iter().all(|q| q.kind == QueueKind::Classic));
        assert!(c.queues.iter().all(|q| q.max_priority == 10));
        assert!(c.default_queue().is_none());
        assert_eq!(c.worker_queues().len(), 3);
        assert_eq!(c.names().tasks(), "warren.tasks");
    }

    #[test]
    fn every_built_in_type_is_routed_once() {
        let c = Config::from_toml("").unwrap();
        for t in [
            "diag.echo",
            "diag.sleep",
            "diag.fail",
            "http.request",
            "file.download",
            "file.upload",
        ] {
            let hits: Vec<&str> = c
                .routes
                .iter()
                .filter(|r| routes::matches(&r.pattern, t))
                .map(|r| r.queue.as_str())
                .collect();
            assert_eq!(hits.len(), 1, "{t}: {hits:?}");
        }
    }

    #[test]
    fn retry_types_inherit_missing_keys_from_default() {
        let c = Config::from_toml("").unwrap();
        let http = c.retry_policy("http.request");
        assert_eq!(http.max_retries, 5);
        assert_eq!(http.base_ms, 1000);
        assert_eq!(c.retry_policy("diag.echo"), &c.retry.default);

        let c = Config::from_toml(
            "[retry.default]\nbase_ms = 50\ncap_ms = 500\n\
             [retry.types.\"diag.fail\"]\nmax_retries = 0\n",
        )
        .unwrap();
        assert_eq!(
            c.retry_policy("diag.fail"),
            &RetryPolicy {
                max_retries: 0,
                base_ms: 50,
                cap_ms: 500
            }
        );
        // Built-in entries stay, and inherit the file's default.
        assert_eq!(c.retry_policy("http.request").base_ms, 50);
        assert_eq!(c.retry_policy("http.request").max_retries, 5);
    }

    #[test]
    fn arrays_replace_scalars_layer() {
        let c = Config::from_toml(
            "prefix = \"acme\"\n[worker]\nconcurrency = 2\n\
             [[queues]]\nname = \"only\"\n\
             [[routes]]\npattern = \"#\"\nqueue = \"only\"\n",
        )
        .unwrap();
        assert_eq!(c.prefix, "acme");
        assert_eq!(c.worker.concurrency, 2);
        assert_eq!(c.worker.prefetch, 16);
        assert_eq!(c.queues.len(), 1);
        assert_eq!(c.queues[0].max_priority, 10);
        assert_eq!(c.queues[0].kind, QueueKind::Classic);
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn environment_layers_over_file() {
        let dir = std::env::temp_dir().join(format!("warren-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.toml");
        std::fs::write(&path, "prefix = \"file\"\n[worker]\nconcurrency = 3\n").unwrap();
        let c = Config::load_from(
            Some(&path),
            &env(&[
                ("WARREN__PREFIX", "envp"),
                ("WARREN__BROKER__URL", "amqps://u:secret@h:5671/v"),
                ("WARREN__WORKER__PREFETCH", "32"),
                ("WARREN__WORKER__QUEUES", "io, diag"),
                ("WARREN_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.prefix, "envp");
        assert_eq!(c.worker.concurrency, 3);
        assert_eq!(c.worker.prefetch, 32);
        assert_eq!(c.broker.url.expose(), "amqps://u:secret@h:5671/v");
        let qs: Vec<&str> = c.worker_queues().iter().map(|q| q.name.as_str()).collect();
        assert_eq!(qs, ["io", "diag"]);

        let c = Config::load_from(None, &env(&[("WARREN__WORKER__QUEUES", "")])).unwrap();
        assert!(c.worker.queues.is_empty());
    }

    #[test]
    fn environment_type_error_names_key_and_variable() {
        let err = Config::load_from(None, &env(&[("WARREN__WORKER__CONCURRENCY", "abc")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config key worker.concurrency: invalid type: string \"abc\", expected an integer \
             (set by WARREN__WORKER__CONCURRENCY)"
        );
    }

    #[test]
    fn unknown_environment_key_is_an_error() {
        let err = Config::load_from(None, &env(&[("WARREN__WORKER__CONCURENCY", "4")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config key worker.concurency: unknown key (check the spelling)"),
            "{err}"
        );
        assert!(
            err.ends_with(" (set by WARREN__WORKER__CONCURENCY)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let err = parse_error("[worker]\nconcurency = 4\n");
        assert!(
            err.starts_with(
                "config key worker.concurency: unknown key (check the spelling); expected one of"
            ),
            "{err}"
        );
        assert!(err.contains("`concurrency`"), "{err}");
        let err = parse_error("prefx = \"a\"\n");
        assert!(err.starts_with("config key prefx: unknown key"), "{err}");
        let err = parse_error("[[queues]]\nname = \"a\"\nmax_prio = 3\n");
        assert!(
            err.starts_with("config key queues[0].max_prio: unknown key"),
            "{err}"
        );
        let err = parse_error("[retry.types.\"a.b\"]\nretries = 3\n");
        assert!(
            err.starts_with("config key retry.types.a.b.retries: unknown key"),
            "{err}"
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        let err = parse_error("[worker]\nconcurrency = \"abc\"\n");
        assert_eq!(
            err,
            "config key worker.concurrency: invalid type: string \"abc\", expected an integer \
             (in config TOML)"
        );
        let err = parse_error("[[queues]]\nname = \"a\"\ntype = \"quorom\"\n");
        assert_eq!(
            err,
            "config key queues[0].type: \"quorom\" is not a queue type: use \"classic\" or \
             \"quorum\" (in config TOML)"
        );
        let err = parse_error("[[queues]]\nname = \"a\"\nmax_priority = 300\n");
        assert!(
            err.starts_with(
                "config key queues[0].max_priority: 300 is out of range: must be 1..=255"
            ),
            "{err}"
        );
    }

    #[test]
    fn toml_syntax_error_and_missing_file() {
        let err = parse_error("[worker\n");
        assert!(err.starts_with("cannot parse config TOML: "), "{err}");
        let err = Config::load_from(Some(Path::new("/nonexistent/warren.toml")), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err
            .to_string()
            .starts_with("cannot read config file /nonexistent/warren.toml: "));
    }

    #[test]
    fn broker_url_is_redacted() {
        let url = BrokerUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(url.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(
            format!("{url:?}"),
            "BrokerUrl(\"amqp://guest:***@127.0.0.1:5672/%2f\")"
        );
        assert_eq!(url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            BrokerUrl::new("amqps://u:p/a@ss@h/v").redacted(),
            "amqps://u:***@h/v"
        );
        assert_eq!(
            BrokerUrl::new("amqp://h:5672/v").redacted(),
            "amqp://h:5672/v"
        );
        assert_eq!(
            BrokerUrl::new("amqp://user@h/v").redacted(),
            "amqp://user@h/v"
        );
        let c = Config::from_toml("").unwrap();
        assert!(!format!("{c:?}").contains("guest:guest"));
    }

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

    #[test]
    fn broker_rules() {
        one_issue(
            "[broker]\nurl = \"http://u:pw@h\"",
            "config key broker.url: \"http://u:***@h\" is not an AMQP URI: use \
             amqp://user:pass@host:5672/vhost (%2f for the \"/\" vhost, amqps:// for TLS)",
        );
        one_issue(
            "[broker]\nmanagement_url = \"h:15672\"",
            "config key broker.management_url: \"h:15672\" is not an HTTP URL: use \
             http://host:15672 (or https://)",
        );
        one_issue(
            "[broker]\npool_size = 0",
            "config key broker.pool_size: 0 is out of range: must be 1..=64",
        );
        one_issue(
            "[broker]\npool_size = 65",
            "config key broker.pool_size: 65 is out of range: must be 1..=64",
        );
        one_issue(
            "[broker]\nconnect_timeout_ms = 0",
            "config key broker.connect_timeout_ms: 0 would give up at once: set it above 0, \
             for example 5000",
        );
    }

    const ONE_QUEUE_ROUTE: &str = "[[routes]]\npattern = \"#\"\nqueue = \"a\"\n";

    #[test]
    fn queue_name_rules() {
        one_issue(
            &format!("[[queues]]\nname = \"a\"\n[[queues]]\nname = \"\"\n{ONE_QUEUE_ROUTE}"),
            "config key queues[1].name: is missing or empty: name the queue with lowercase \
             letters, digits, '_' or '-'",
        );
        one_issue(
            &format!("[[queues]]\nname = \"a\"\n[[queues]]\nname = \"IO\"\n{ONE_QUEUE_ROUTE}"),
            "config key queues[1].name: \"IO\" is not a valid queue name: use lowercase \
             letters, digits, '_' and '-' only",
        );
        one_issue(
            &format!("[[queues]]\nname = \"a\"\n[[queues]]\nname = \"a\"\n{ONE_QUEUE_ROUTE}"),
            "config key queues[1].name: \"a\" is also the name of queues[0]: queue names must \
             be unique; rename or remove one",
        );
        let long = "a".repeat(250);
        one_issue(
            &format!("[[queues]]\nname = \"a\"\n[[queues]]\nname = \"{long}\"\n{ONE_QUEUE_ROUTE}"),
            &format!(
                "config key queues[1].name: \"{long}\" makes the queue name 259 bytes long: \
                 AMQP allows 255; shorten it"
            ),
        );
        one_issue(
            "queues = []\nroutes = []",
            "config key queues: no queues are configured: add at least one [[queues]] entry",
        );
    }

    #[test]
    fn queue_priority_and_default_rules() {
        one_issue(
            &format!("[[queues]]\nname = \"a\"\nmax_priority = 0\n{ONE_QUEUE_ROUTE}"),
            "config key queues[0].max_priority: 0 is out of range: must be 1..=255 (RabbitMQ \
             limit)",
        );
        one_issue(
            &format!(
                "[[queues]]\nname = \"a\"\ndefault = true\n\
                 [[queues]]\nname = \"b\"\ndefault = true\n{ONE_QUEUE_ROUTE}"
            ),
            "config key queues[1].default: true, but queues[0] (\"a\") is already the \
             default: mark at most one queue default = true",
        );
        // A quorum queue with a priority other than the default is accepted.
        let c = Config::from_toml(&format!(
            "[[queues]]\nname = \"a\"\ntype = \"quorum\"\nmax_priority = 3\n{ONE_QUEUE_ROUTE}"
        ))
        .unwrap();
        assert_eq!(c.queues[0].kind, QueueKind::Quorum);
        assert_eq!(c.queues[0].max_priority, 3);
    }

    #[test]
    fn route_rules() {
        one_issue(
            "[[routes]]\npattern = \"diag..x\"\nqueue = \"diag\"",
            "config key routes[0].pattern: \"diag..x\" is not a valid topic pattern: word 2 is \
             empty: words are separated by single dots, with none at either end",
        );
        one_issue(
            "[[routes]]\npattern = \"diag.*\"\nqueue = \"nope\"",
            "config key routes[0].queue: \"nope\" is not a configured queue: configured queues \
             are \"io\", \"cpu\", \"diag\"; use one of them or add a [[queues]] entry with that \
             name",
        );
    }

    #[test]
    fn overlapping_routes_are_rejected_with_an_example() {
        one_issue(
            "[[routes]]\npattern = \"diag.echo\"\nqueue = \"diag\"\n\
             [[routes]]\npattern = \"http.*\"\nqueue = \"io\"\n\
             [[routes]]\npattern = \"diag.#\"\nqueue = \"cpu\"\n",
            "config key routes[2].pattern: \"diag.#\" overlaps routes[0].pattern = \
             \"diag.echo\" (both match task type \"diag.echo\"); a task would run twice: make \
             the patterns disjoint",
        );
        one_issue(
            "[[routes]]\npattern = \"a.*\"\nqueue = \"io\"\n\
             [[routes]]\npattern = \"*.b\"\nqueue = \"io\"\n",
            "config key routes[1].pattern: \"*.b\" overlaps routes[0].pattern = \"a.*\" (both \
             match task type \"a.b\"); every task type must have exactly one route: merge them \
             or make the patterns disjoint",
        );
    }

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
    fn limit_rules() {
        one_issue(
            "[limits]\nmax_body_bytes = 0",
            "config key limits.max_body_bytes: 0 would reject every task: set it above 0, for \
             example 10485760 (10 MiB)",
        );
        one_issue(
            "[limits]\nmax_body_bytes = 536870913",
            "config key limits.max_body_bytes: 536870913 exceeds 536870912 (512 MiB), the \
             largest message RabbitMQ accepts: lower it",
        );
        assert!(Config::from_toml("[limits]\nmax_body_bytes = 536870912").is_ok());
        one_issue(
            "[limits]\nmax_result_bytes = 0",
            "config key limits.max_result_bytes: 0 would truncate every result: set it above \
             0, for example 65536 (64 KiB)",
        );
    }

    #[test]
    fn retry_rules() {
        // The built-in http.request entry inherits both values, so it is reported too.
        assert_eq!(
            issues("[retry.default]\nbase_ms = 5000\ncap_ms = 1000"),
            [
                "config key retry.default.cap_ms: 1000 is below retry.default.base_ms = 5000: \
                 raise cap_ms to at least 5000 or lower base_ms",
                "config key retry.types.\"http.request\".cap_ms: 1000 is below \
                 retry.types.\"http.request\".base_ms = 5000: raise cap_ms to at least 5000 or \
                 lower base_ms",
            ]
        );
        one_issue(
            "[retry.types.\"http.request\"]\ncap_ms = 10",
            "config key retry.types.\"http.request\".cap_ms: 10 is below \
             retry.types.\"http.request\".base_ms = 1000: raise cap_ms to at least 1000 or \
             lower base_ms",
        );
        one_issue(
            "[retry.types.\"http.*\"]\nmax_retries = 1",
            "config key retry.types.\"http.*\": is not a task type: retry policies are keyed \
             by an exact task type, words of letters, digits, '_' or '-' joined by '.', \
             without '*' or '#'",
        );
    }

    #[test]
    fn scheduler_rules() {
        one_issue(
            "[scheduler]\nmax_delay_ms = 0",
            "config key scheduler.max_delay_ms: 0 would reject every delayed task: set it \
             above 0, for example 315576000000 (10 years)",
        );
        one_issue(
            "[scheduler]\npoison_redeliveries = 0",
            "config key scheduler.poison_redeliveries: 0 would park a task after a single \
             worker crash: set it to at least 1, for example 5",
        );
        one_issue(
            "[scheduler]\ncancel_ttl_ms = 0",
            "config key scheduler.cancel_ttl_ms: 0 would forget cancel requests at once: set \
             it above 0, for example 86400000 (24 hours)",
        );
    }

    /// A `[[cron]]` entry with valid values except those `overrides` replace
    /// (`key = value` lines; a key given as `key` alone is left out).
    fn cron_entry(overrides: &[&str]) -> String {
        let mut lines = vec![
            "name = \"tick\"".to_string(),
            "schedule = \"*/5 * * * * *\"".to_string(),
            "task_type = \"diag.echo\"".to_string(),
        ];
        for o in overrides {
            let key = o.split('=').next().unwrap().trim();
            lines.retain(|l| !l.starts_with(&format!("{key} ")));
            if o.contains('=') {
                lines.push(o.to_string());
            }
        }
        format!("[[cron]]\n{}\n", lines.join("\n"))
    }

    #[test]
    fn cron_entries_default_to_none_and_fill_defaults() {
        assert!(Config::from_toml("").unwrap().cron.is_empty());
        let c = Config::from_toml(&cron_entry(&[])).unwrap();
        assert_eq!(
            c.cron,
            [CronConfig {
                name: "tick".into(),
                schedule: "*/5 * * * * *".into(),
                timezone: "UTC".into(),
                task_type: "diag.echo".into(),
                args: serde_json::json!({}),
                priority: None,
                missed: MissedFires::Skip,
            }]
        );
    }

    #[test]
    fn cron_args_keep_any_toml_value_as_json() {
        let c = Config::from_toml(&format!(
            "{}{}",
            cron_entry(&[
                "timezone = \"Europe/Paris\"",
                "priority = 7",
                "missed = \"run_once\"",
                "args = { url = \"https://example.com\", Headers = { X-Token = \"t\" }, \
                 n = 3, ok = true, list = [1, \"two\"] }",
            ]),
            cron_entry(&["name = \"other\"", "args = [1, 2]"]),
        ))
        .unwrap();
        let tick = &c.cron[0];
        assert_eq!(tick.timezone, "Europe/Paris");
        assert_eq!(tick.priority, Some(7));
        assert_eq!(tick.missed, MissedFires::RunOnce);
        assert_eq!(tick.missed.as_str(), "run_once");
        assert_eq!(
            tick.args,
            serde_json::json!({
                "url": "https://example.com",
                "Headers": {"X-Token": "t"},
                "n": 3,
                "ok": true,
                "list": [1, "two"],
            })
        );
        assert_eq!(c.cron[1].args, serde_json::json!([1, 2]));
    }

    #[test]
    fn cron_name_rules() {
        one_issue(
            &cron_entry(&["name"]),
            "config key cron[0].name: is missing or empty: name the schedule with lowercase \
             letters, digits, '_' or '-'",
        );
        one_issue(
            &cron_entry(&["name = \"Nightly Report\""]),
            "config key cron[0].name: \"Nightly Report\" is not a valid schedule name: use \
             lowercase letters, digits, '_' and '-' only",
        );
        let long = "a".repeat(65);
        one_issue(
            &cron_entry(&[&format!("name = \"{long}\"")]),
            &format!("config key cron[0].name: \"{long}\" is 65 characters long: use at most 64"),
        );
        one_issue(
            &format!("{}{}", cron_entry(&[]), cron_entry(&[])),
            "config key cron[1].name: \"tick\" is also the name of cron[0]: schedule names \
             must be unique; rename or remove one",
        );
    }

    #[test]
    fn cron_schedule_rules() {
        let schedule_issue = |schedule: &str, problem: &str| {
            one_issue(
                &cron_entry(&[&format!("schedule = \"{schedule}\"")]),
                &format!("config key cron[0].schedule: {problem}"),
            )
        };
        one_issue(
            &cron_entry(&["schedule"]),
            "config key cron[0].schedule: is missing or empty: set a cron expression with \
             seconds, such as \"0 */5 * * * *\" (every 5 minutes)",
        );
        schedule_issue(
            "*/5 * * * *",
            "\"*/5 * * * *\" has 5 fields, but schedules start with a seconds field: use 6, \
             for example \"0 */5 * * * *\" to fire at second 0",
        );
        schedule_issue(
            "0 0 0 * * * 2030",
            "\"0 0 0 * * * 2030\" has 7 fields: use 6, \"second minute hour day-of-month \
             month day-of-week\", for example \"0 */5 * * * *\" (every 5 minutes)",
        );
        schedule_issue(
            "0 60 * * * *",
            "\"0 60 * * * *\" is not a valid cron expression: minute field \"60\": 60 is out \
             of range: a minute is 0..=59",
        );
        schedule_issue(
            "0 0 9 * JAN-XYZ MON",
            "\"0 0 9 * JAN-XYZ MON\" is not a valid cron expression: month field \"JAN-XYZ\": \
             \"XYZ\" is not a value: use a number 1..=12 or a name JAN-DEC",
        );
        schedule_issue(
            "0 0 0 0 * *",
            "\"0 0 0 0 * *\" is not a valid cron expression: day-of-month field \"0\": 0 is \
             out of range: a day-of-month is 1..=31",
        );
        schedule_issue(
            "*/0 * * * * *",
            "\"*/0 * * * * *\" is not a valid cron expression: second field \"*/0\": the step \
             \"0\" of \"*/0\" must be a whole number of at least 1",
        );
        schedule_issue(
            "5/10 * * * * *",
            "\"5/10 * * * * *\" is not a valid cron expression: second field \"5/10\": \
             \"5/10\" steps from a single value: write \"*/10\", or a range such as \
             \"5-59/10\"",
        );
        schedule_issue(
            "0 0 18-9 * * *",
            "\"0 0 18-9 * * *\" is not a valid cron expression: hour field \"18-9\": the range \
             \"18-9\" runs backwards: write it from low to high",
        );
        schedule_issue(
            "0 1,,2 * * * *",
            "\"0 1,,2 * * * *\" is not a valid cron expression: minute field \"1,,2\": an \
             empty list item (a comma too many)",
        );
        schedule_issue(
            "? * * * * *",
            "\"? * * * * *\" is not a valid cron expression: second field \"?\": \"?\" is \
             allowed only in the day-of-month and day-of-week fields",
        );
        schedule_issue(
            "0 0 0 * * MON#6",
            "\"0 0 0 * * MON#6\" is not a valid cron expression: day-of-week field \"MON#6\": \
             the occurrence \"6\" of \"MON#6\" must be 1..=5 or L (the last)",
        );
        for ok in [
            "*/1 * * * * *",
            "0 30 9 * * MON-FRI",
            "0 0 0 1,15 * ?",
            "0 0 12 L * *",
            "0 0 12 15W * *",
            "0 0 12 ? * FRI#L",
            "0 0 12 * * 5L",
            "0 0 12 * * FRI-SUN",
            "0 0 12 * * 0,7",
            "0 0 12 * jan-mar/2 *",
            "0 0-30/10 8-18 * * 1-5",
        ] {
            assert!(
                Config::from_toml(&cron_entry(&[&format!("schedule = \"{ok}\"")])).is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn cron_timezone_rules() {
        one_issue(
            &cron_entry(&["timezone = \"Europe/ Paris\""]),
            "config key cron[0].timezone: \"Europe/ Paris\" is not an IANA time zone name: use \
             one such as \"UTC\" (the default), \"Europe/Paris\" or \"America/New_York\"",
        );
        assert_eq!(issues(&cron_entry(&["timezone = \"\""])).len(), 1);
        assert_eq!(issues(&cron_entry(&["timezone = \"/UTC\""])).len(), 1);
        for ok in [
            "UTC",
            "Europe/Paris",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+3",
            "EST5EDT",
        ] {
            assert!(
                Config::from_toml(&cron_entry(&[&format!("timezone = \"{ok}\"")])).is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn cron_task_type_rules() {
        one_issue(
            &cron_entry(&["task_type"]),
            "config key cron[0].task_type: is missing or empty: set the task type each fire \
             publishes, such as \"diag.echo\"",
        );
        one_issue(
            &cron_entry(&["task_type = \"diag.*\""]),
            "config key cron[0].task_type: \"diag.*\" is not a task type: use words of \
             letters, digits, '_' or '-' joined by '.', without '*' or '#'",
        );
        one_issue(
            &cron_entry(&["task_type = \"report.build\""]),
            "config key cron[0].task_type: \"report.build\" matches no [[routes]] pattern and \
             no queue is default = true, so every fired task would be parked in \
             warren.unroutable: add a [[routes]] entry for it or mark a queue default = true",
        );
        // A default queue takes any type.
        let with_default = "[[queues]]\nname = \"default\"\ndefault = true\n\
                            [[routes]]\npattern = \"diag.*\"\nqueue = \"default\"\n";
        assert!(Config::from_toml(&format!(
            "{with_default}{}",
            cron_entry(&["task_type = \"report.build\""])
        ))
        .is_ok());
    }

    #[test]
    fn cron_priority_and_missed_rules() {
        one_issue(
            &cron_entry(&["priority = 10"]),
            "config key cron[0].priority: 10 is out of range: must be 0..=9 (task \
             priorities); lower it or leave it out",
        );
        let err = parse_error(&cron_entry(&["priority = -1"]));
        assert_eq!(
            err,
            "config key cron[0].priority: -1 is out of range: must be 0..=9 (task priorities) \
             (in config TOML)"
        );
        assert!(Config::from_toml(&cron_entry(&["priority = 0"])).is_ok());
        let err = parse_error(&cron_entry(&["missed = \"catch_up\""]));
        assert_eq!(
            err,
            "config key cron[0].missed: \"catch_up\" is not a missed-fire policy: use \"skip\" \
             or \"run_once\" (in config TOML)"
        );
        let err = parse_error(&cron_entry(&["every = \"5s\""]));
        assert!(
            err.starts_with("config key cron[0].every: unknown key (check the spelling)"),
            "{err}"
        );
    }

    #[test]
    fn documented_cron_example_is_valid_and_no_schedule_is_enabled() {
        let example: String = DEFAULT_TOML
            .split("# Example: every weekday")
            .nth(1)
            .expect("config/default.toml documents a [[cron]] example")
            .lines()
            .skip(1)
            .map_while(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::from_toml(&example).unwrap();
        assert_eq!(c.cron[0].name, "morning-ping");
        assert_eq!(c.cron[0].timezone, "Europe/Paris");
        assert_eq!(c.cron[0].priority, Some(5));
        assert_eq!(c.cron[0].missed, MissedFires::RunOnce);
        assert_eq!(c.cron[0].args["method"], "GET");
        assert!(Config::from_toml("").unwrap().cron.is_empty());
    }

    #[test]
    fn every_cron_problem_is_reported_at_once() {
        let list = issues(&cron_entry(&[
            "name = \"A\"",
            "schedule = \"* * *\"",
            "timezone = \"\"",
            "task_type = \"nowhere\"",
            "priority = 12",
        ]));
        let keys: Vec<&str> = list.iter().map(|i| i.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "config key cron[0].name",
                "config key cron[0].schedule",
                "config key cron[0].timezone",
                "config key cron[0].task_type",
                "config key cron[0].priority",
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err =
            Config::from_toml("prefix = \"\"\n[worker]\nconcurrency = 0\ntask_timeout_ms = 0")
                .unwrap_err();
        let ConfigError::Invalid(list) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(list.len(), 3);
        let text = err.to_string();
        assert_eq!(text.matches("; config key ").count(), 2, "{text}");
    }

    #[test]
    fn shipped_config_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let mut loaded = 0;
        for dir in [root.clone(), root.join("examples")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    Config::load_from(Some(&path), &[])
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    loaded += 1;
                }
            }
        }
        assert!(loaded >= 3, "only {loaded} files found");

        let with_default =
            Config::load_from(Some(&root.join("examples/with-default-queue.toml")), &[]).unwrap();
        assert_eq!(with_default.default_queue().unwrap().name, "default");
        let quorum = Config::load_from(Some(&root.join("examples/quorum.toml")), &[]).unwrap();
        assert_eq!(quorum.queue("io").unwrap().kind, QueueKind::Quorum);
    }
    #[test]
    fn tracker_defaults_and_environment() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.tracker, TrackerConfig::default());
        assert_eq!(
            c.tracker.database_url.sqlite_path(),
            Some(PathBuf::from("warren-tracker/tracker.db"))
        );
        let c = Config::load_from(
            None,
            &env(&[
                (
                    "WARREN__TRACKER__DATABASE_URL",
                    "postgres://warren:s3cret@db:5432/warren",
                ),
                ("WARREN__TRACKER__LISTEN", "0.0.0.0:9000"),
            ]),
        )
        .unwrap();
        assert!(c.tracker.database_url.is_postgres());
        assert_eq!(c.tracker.database_url.sqlite_path(), None);
        assert_eq!(
            c.tracker.database_url.to_string(),
            "postgres://warren:***@db:5432/warren"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.tracker.listen, "0.0.0.0:9000");
    }

    #[test]
    fn tracker_rules() {
        one_issue(
            "[tracker]\ndatabase_url = \"mysql://root:pw@db/warren\"",
            "config key tracker.database_url: \"mysql://root:***@db/warren\" is not a database \
             URL: use sqlite://PATH (one file, created if missing) or \
             postgres://user:pass@host:5432/database",
        );
        one_issue(
            "[tracker]\ndatabase_url = \"sqlite://./data/tracker.db\"",
            "config key tracker.database_url: \"sqlite://./data/tracker.db\" is inside \
             worker.data_dir = \"data\", where file.download and file.upload tasks could \
             overwrite or send it: put it elsewhere, for example \
             sqlite://warren-tracker/tracker.db",
        );
        assert_eq!(
            issues("[tracker]\ndatabase_url = \"sqlite::memory:\"").len(),
            1
        );
        assert!(Config::from_toml("[tracker]\ndatabase_url = \"sqlite:/var/lib/t.db\"").is_ok());
        one_issue(
            "[tracker]\nlisten = \"localhost\"",
            "config key tracker.listen: \"localhost\" is not an address and port: use one such \
             as \"127.0.0.1:8089\" (\"0.0.0.0:8089\" listens on every interface)",
        );
        one_issue(
            "[worker]\nlisten = \"8090\"",
            "config key worker.listen: \"8090\" is not an address and port: use one such \
             as \"127.0.0.1:8090\" (\"0.0.0.0:8090\" listens on every interface), or \"\" to \
             turn it off",
        );
        one_issue(
            "[scheduler]\nlisten = \"host:x\"",
            "config key scheduler.listen: \"host:x\" is not an address and port: use one such \
             as \"127.0.0.1:8091\" (\"0.0.0.0:8091\" listens on every interface), or \"\" to \
             turn it off",
        );
        assert!(Config::from_toml("[worker]\nlisten = \"\"\n[scheduler]\nlisten = \"\"").is_ok());
        let keys: Vec<String> = issues(
            "[tracker]\nretention_ms = 0\nbatch_max_events = 0\nbatch_max_ms = 0\n\
             max_result_bytes = 0",
        )
        .iter()
        .map(|i| i.split(':').next().unwrap().to_owned())
        .collect();
        assert_eq!(
            keys,
            [
                "config key tracker.retention_ms",
                "config key tracker.batch_max_events",
                "config key tracker.batch_max_ms",
                "config key tracker.max_result_bytes",
            ]
        );
    }

    #[test]
    fn http_defaults_and_environment() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.http, HttpConfig::default());
        assert!(!c.http.allow_loopback);
        assert!(c.worker.type_concurrency.is_empty());
        let c = Config::load_from(
            None,
            &env(&[
                ("WARREN__HTTP__ALLOW_LOOPBACK", "true"),
                ("WARREN__HTTP__DENY", "10.0.0.0/8, *.internal"),
                ("WARREN__HTTP__MAX_REDIRECTS", "0"),
            ]),
        )
        .unwrap();
        assert!(c.http.allow_loopback);
        assert_eq!(c.http.deny, ["10.0.0.0/8", "*.internal"]);
        assert_eq!(c.http.max_redirects, 0);
        let c = Config::from_toml("[worker.type_concurrency]\n\"file.download\" = 2").unwrap();
        assert_eq!(c.worker.type_concurrency["file.download"], 2);
    }

    #[test]
    fn host_rules_parse() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        assert_eq!(
            HostRule::parse("10.0.0.0/8"),
            Ok(HostRule::Network(Ipv4Addr::new(10, 0, 0, 0).into(), 8))
        );
        assert_eq!(
            HostRule::parse("192.0.2.7"),
            Ok(HostRule::Network(Ipv4Addr::new(192, 0, 2, 7).into(), 32))
        );
        assert_eq!(
            HostRule::parse("fd00::/8"),
            Ok(HostRule::Network(
                "fd00::".parse::<Ipv6Addr>().unwrap().into(),
                8
            ))
        );
        assert_eq!(
            HostRule::parse("API.Example.com."),
            Ok(HostRule::Host("api.example.com".into()))
        );
        assert_eq!(
            HostRule::parse("*.example.com"),
            Ok(HostRule::Subdomains("example.com".into()))
        );
        assert!(HostRule::parse("10.0.0.0/33").is_err());
        assert!(HostRule::parse("exa mple.com").is_err());
        assert!(HostRule::parse("").is_err());
        assert!(HostRule::parse("*.").is_err());
        assert_eq!(
            HostRule::parse("10.1.0.0/8").unwrap_err(),
            "has bits set past its /8 prefix: write 10.0.0.0/8"
        );
    }

    #[test]
    fn http_rules() {
        one_issue(
            "[http]\ndeny = [\"10.0.0.0/8\", \"http://x\"]",
            "config key http.deny[1]: \"http://x\" is not a host name, address or network: \
             use a host name (api.example.com), *.domain for its subdomains, an address \
             (192.0.2.7) or a network (10.0.0.0/8, fd00::/8)",
        );
        one_issue(
            "[http]\nmax_redirects = 50",
            "config key http.max_redirects: 50 is above 20: a longer chain is a loop or an \
             abuse; lower it (0 follows none)",
        );
        one_issue(
            "[http]\nmax_response_bytes = 100000",
            "config key http.max_response_bytes: 100000 is above limits.max_result_bytes = \
             65536: such a body would not fit in the result, which would be cut to a preview; \
             lower it or raise limits.max_result_bytes",
        );
        assert_eq!(
            issues("[http]\ntimeout_ms = 0\nconnect_timeout_ms = 0\nmax_file_bytes = 0").len(),
            3
        );
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
