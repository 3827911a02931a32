use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use warren_core::event::{ErrorKind, EventErrorInfo};
use warren_core::Config;

/// What a handler receives for one attempt of a task.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task id.
    pub id: String,
    /// The task type.
    pub task_type: String,
    /// The arguments, any JSON value; the handler validates them.
    pub args: Value,
    /// Which attempt this is (1 on first execution).
    pub attempt: i64,
    /// Cancelled when the attempt is aborted (time limit, shutdown, cancel):
    /// long-running handlers should watch it and stop early.
    pub cancel: CancellationToken,
    /// The worker's data directory (for file handlers).
    pub data_dir: PathBuf,
    /// The worker's configuration (handlers read their settings from it,
    /// such as the built-in types' `http` section).
    pub config: Arc<Config>,
    /// Where a long handler reports how far it got; the runtime turns the
    /// latest report into a `progress` event at most once a second.
    pub progress: Progress,
}

/// A handle for progress reports: cheap to call as often as wanted (only the
/// latest report is kept, nothing blocks or queues up). Reports made through
/// a handle that no runtime watches go nowhere.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    latest: Option<ProgressWatch>,
}

/// The latest `(done, total)` reported, if any.
pub(crate) type ProgressReport = Option<(u64, Option<u64>)>;

/// The runtime's side of a [`Progress`] handle: the latest report, and a
/// wake-up for each report made since the last wait. Made for every attempt,
/// so it is one small allocation (a `watch` channel costs several times
/// as much to make and drop, and most handlers never report).
#[derive(Debug, Clone, Default)]
pub(crate) struct ProgressWatch(Arc<ProgressCell>);

#[derive(Debug, Default)]
struct ProgressCell {
    latest: std::sync::Mutex<ProgressReport>,
    reported: tokio::sync::Notify,
}

impl ProgressWatch {
    /// The latest report.
    pub(crate) fn latest(&self) -> ProgressReport {
        *self.0.latest.lock().expect("not poisoned")
    }

    /// Returns once a report was made since the last call returned (at
    /// once if one was made meanwhile; reports in between are one wake-up).
    pub(crate) async fn changed(&self) {
        self.0.reported.notified().await;
    }
}

impl Progress {
    /// A handle and the watch the runtime keeps.
    pub(crate) fn channel() -> (Progress, ProgressWatch) {
        let watch = ProgressWatch::default();
        (
            Progress {
                latest: Some(watch.clone()),
            },
            watch,
        )
    }

    /// Reports `done` units (bytes for transfers) of `total`, if known.
    pub fn report(&self, done: u64, total: Option<u64>) {
        if let Some(w) = &self.latest {
            *w.0.latest.lock().expect("not poisoned") = Some((done, total));
            // Stores a wake-up when the runtime is not waiting yet.
            w.0.reported.notify_one();
        }
    }
}

impl TaskContext {
    /// Deserializes the arguments; failure is a permanent `invalid_args` error.
    pub fn args_as<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        self.args_object()?;
        serde_json::from_value(self.args.clone())
            .map_err(|e| TaskError::invalid_args(format!("arguments of {}: {e}", self.task_type)))
    }

    /// The arguments as a JSON object, as every built-in handler takes them;
    /// anything else is a permanent `invalid_args` failure.
    pub fn args_object(&self) -> Result<&serde_json::Map<String, Value>, TaskError> {
        self.args.as_object().ok_or_else(|| {
            TaskError::invalid_args(format!(
                "arguments of {} must be a JSON object, got {}",
                self.task_type,
                json_kind(&self.args)
            ))
        })
    }
}

/// "an array", "a string", ...: how a JSON value is named in an error.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A failed attempt: retryable or permanent, with a short code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct TaskError {
    /// Whether another attempt may succeed.
    pub kind: ErrorKind,
    /// Short machine word (`timeout`, `connect`, `http_503`, `invalid_args`, …).
    pub code: String,
    /// Human text.
    pub message: String,
    /// For a retryable failure: the earliest the next attempt may run, in
    /// milliseconds from the failure (an HTTP `Retry-After`). The runtime
    /// waits at least this long before retrying.
    pub retry_after_ms: Option<u64>,
}

impl TaskError {
    /// A failure worth retrying (timeouts, connection errors, HTTP 5xx, 429).
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retryable,
            code: code.into(),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A failure that another attempt would repeat (bad arguments, HTTP 4xx).
    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            code: code.into(),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The arguments failed validation.
    pub fn invalid_args(message: impl Into<String>) -> Self {
        Self::permanent("invalid_args", message)
    }

    /// Asks the runtime to wait at least `ms` milliseconds before retrying.
    pub fn with_retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind == ErrorKind::Retryable
    }

    /// The `error` object of an event.
    pub fn to_info(&self) -> EventErrorInfo {
        EventErrorInfo {
            kind: self.kind,
            code: self.code.clone(),
            message: self.message.clone(),
        }
    }
}

/// Why an `[[exec]]` entry cannot run: found at worker start-up.
#[derive(Debug, thiserror::Error)]
#[error("exec type {task_type:?}: {problem}")]
pub struct ExecSetupError {
    /// The task type of the entry.
    pub task_type: String,
    /// What is wrong, naming the path.
    pub problem: String,
}

/// Runs one task type. Implement it in your own crate and register it.
///
/// Return `Ok(result)` with any JSON value, or a [`TaskError`] saying whether
/// the failure is retryable. A panic or an overrun of the time limit is
/// turned into a failure by the runtime; the worker keeps running.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError>;
}

/// The handlers a worker knows, by exact task type.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in task types: `diag.*`, `http.request`,
    /// `file.download` and `file.upload`.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        crate::diag::register(&mut r);
        crate::builtin::register(&mut r);
        r
    }

    /// This registry with a handler for each `[[exec]]` entry of `config`;
    /// fails, naming the type and path, when a program is missing or not
    /// executable or a working directory does not exist.
    pub fn with_exec(mut self, config: &Config) -> Result<Self, ExecSetupError> {
        #[cfg(target_os = "linux")]
        crate::exec::register(&mut self, config)?;
        #[cfg(not(target_os = "linux"))]
        if let Some(e) = config.exec.first() {
            return Err(ExecSetupError {
                task_type: e.task_type.clone(),
                problem: "exec handlers need Linux".into(),
            });
        }
        Ok(self)
    }

    /// This registry with a handler for each `[[webhook]]` entry of
    /// `config`; fails, naming the key, when a secret cannot be read or an
    /// endpoint is refused by the `[http]` rules.
    pub fn with_webhooks(mut self, config: &Config) -> Result<Self, crate::WebhookSetupError> {
        crate::webhook::register(&mut self, config)?;
        Ok(self)
    }

    /// Registers `handler` for `task_type`, replacing any earlier one.
    pub fn register(&mut self, task_type: &str, handler: impl Handler) -> &mut Self {
        self.handlers
            .insert(task_type.to_owned(), Arc::new(handler));
        self
    }

    /// The handler for a task type.
    pub fn get(&self, task_type: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(task_type).cloned()
    }

    /// The registered task types.
    pub fn task_types(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}
