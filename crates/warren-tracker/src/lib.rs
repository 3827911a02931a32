//! The task tracker: what happened to each task, for operators.
//!
//! [`Tracker`] follows every status event of `P.events` through its own
//! durable queue `P.tracker.events` and keeps each task's state, attempts,
//! timings, last error and result in a database ([`store`]): one SQLite file
//! by default, PostgreSQL when `tracker.database_url` says so. Events are
//! merged so that order and duplicates do not matter ([`record`]), written in
//! batches and acknowledged only once committed, so a tracker killed at any
//! moment loses nothing. It serves a JSON API, a dashboard, Prometheus
//! metrics and health checks over HTTP ([`api`]), to holders of a bearer token
//! or a dashboard login with a `read` or `admin` role unless configured open; `warren status` and
//! `warren tasks` read the same database through [`Store`].

pub mod api;
mod auth;
mod gate;
mod ingest;
pub mod limits;
pub mod metrics;
pub mod mgmt;
pub mod published;
pub mod record;
pub mod store;
pub mod timeline;
mod tracker;

pub use record::{IncomingEvent, TaskRow, TaskView};
pub use store::{
    ActionRecord, Backend, HistoryEntry, NewAction, OpenMode, Store, StoreError, TaskFilter,
};
pub use tracker::{tracker_queue, Tracker, TrackerError};
