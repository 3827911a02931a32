//! The worker side of Warren.
//!
//! Users implement [`Handler`] for their own task types (the built-in
//! diagnostic types use the same trait) and register them in a [`Registry`].
//! A [`Worker`] consumes the configured work queues with `basic.qos`
//! prefetch, runs handlers concurrently under a semaphore with per-task time
//! limits, publishes every status event with publisher confirms before it
//! acknowledges the task, answers `reply_to`, parks invalid and terminally
//! failed tasks in `P.dead`, reconnects with backoff when the broker goes
//! away, and drains on shutdown within the grace period. Task types of the
//! configuration's `[[exec]]` entries run a program of the user's ([`exec`]);
//! those of its `[[webhook]]` entries are signed POSTs to an HTTP endpoint
//! of the user's ([`webhook`]).

pub mod builtin;
pub mod diag;
#[cfg(target_os = "linux")]
pub mod exec;
mod handler;
mod metrics;
mod runtime;
pub mod webhook;

pub use handler::{ExecSetupError, Handler, Progress, Registry, TaskContext, TaskError};
pub use runtime::{Worker, WorkerError};
pub use webhook::WebhookSetupError;

pub use async_trait::async_trait;
pub use tokio_util::sync::CancellationToken;
