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
    /// Wraps a lapin error with what was being done: `.map_err(ClientError::amqp("set prefetch"))`.
    pub fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> ClientError {
        let what = what.into();
        move |source| ClientError::Amqp { what, source }
    }
}
