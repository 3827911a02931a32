//! The scheduler side of Warren.
//!
//! It reconciles the broker's topology with the configuration
//! ([`reconcile::apply`]): the plan is computed purely in `warren-core`, and
//! applied here idempotently, failing with a message that names the object,
//! the difference and the fix when an existing object disagrees. The
//! [`Scheduler`] process then classifies tasks the work queues dead-lettered
//! (expired, rejected) and parks them in `P.dead` with a `dead` event.

pub mod chords;
pub mod cron;
mod delays;
pub mod intake;
mod metrics;
pub mod migrate;
mod pauses;
pub mod reconcile;
mod scheduler;
mod tiers;

pub use migrate::{migrate, MigrateReport};
pub use reconcile::{
    apply, apply_or_verify, prune_stale_bindings, reconcile, verify, ApplyReport, TopologyCheck,
    TopologyError,
};
pub use scheduler::{Scheduler, SchedulerError};
