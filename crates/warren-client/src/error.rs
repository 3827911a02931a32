use std::time::Duration;

/// What can go wrong while talking to the broker as a producer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached or the connection failed.
    #[error("broker at {url}: {source}")]
    Connect {
        /// The broker URL, password redacted.
        url: String,
        /// The underlying error.
        #[source]
        source: lapin::Error,
    },
    /// TLS to the broker failed for a reason one setting can fix: its
    /// files, the CA that verifies the broker, the host name, the client
    /// certificate. Retrying does not help.
    #[error("{setting}{}: {problem}", .value.as_ref().map(|v| format!(" = \"{v}\"")).unwrap_or_default())]
    Tls {
        /// The setting to fix, such as `broker.tls_ca_file`.
        setting: String,
        /// Its value, when it is set and not a secret (a file's path).
        value: Option<String>,
        /// What is wrong, with the TLS library's reason, and the fix.
        problem: String,
    },
    /// No node of a `broker.url` list could be reached: each node's URL
    /// (password redacted) with its failure.
    #[error("no broker node reachable: {0}")]
    NoNode(String),
    /// A broker operation failed.
    #[error("{what}: {source}")]
    Amqp {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: lapin::Error,
    },
    /// A channel or consumer closed under us (connection lost).
    #[error("{0}: the channel closed")]
    Closed(String),
    /// The pool could not hand out a connection.
    #[error("connection pool: {0}")]
    Pool(String),
    /// The broker refused a publication (negative confirm).
    #[error("the broker refused task {task_id} (negative publisher confirm)")]
    Nacked {
        /// The refused task's id.
        task_id: String,
    },
    /// A publication was not confirmed by the broker within
    /// `broker.publish_timeout_ms`, over every attempt: it may or may not
    /// have been queued.
    #[error(
        "{what}: not confirmed by the broker within {timeout:?} ({attempts} attempts; last: \
         {last}); it may or may not have been queued: publish it again with the same id"
    )]
    Unconfirmed {
        /// The message (task id) that was being published.
        what: String,
        /// How many times it was sent.
        attempts: u32,
        /// `broker.publish_timeout_ms`.
        timeout: Duration,
        /// Why the last attempt failed.
        last: String,
    },
    /// No answer in time.
    #[error("no final event for task {task_id} within {timeout:?}")]
    Timeout {
        /// The task waited for.
        task_id: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The request itself is unusable.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// Whether trying again cannot help until a setting changes (a TLS
    /// problem), so a caller should stop retrying and report it.
    pub fn is_setting_problem(&self) -> bool {
        matches!(self, ClientError::Tls { .. })
    }

    /// Whether the broker took a publication on an open channel but did not
    /// store it (a negative confirm, or none within
    /// `broker.publish_timeout_ms`). On a cluster this is what a channel
    /// left attached to a replicated queue's dead leader keeps answering
    /// (RabbitMQ 3.10, seen in the node-kill tests), so the caller closes
    /// its connection: the broker redelivers what that session held, and
    /// the next session starts on fresh channels.
    pub fn needs_fresh_channels(&self) -> bool {
        matches!(
            self,
            ClientError::Unconfirmed { .. } | ClientError::Nacked { .. }
        )
    }

    /// Wraps a lapin error with what was being done: `.map_err(ClientError::amqp("set prefetch"))`.
    pub fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> ClientError {
        let what = what.into();
        move |source| ClientError::Amqp { what, source }
    }
}
