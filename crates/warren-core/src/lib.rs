//! The contract of Warren, as plain data and pure functions.
//!
//! Everything a producer, worker or scheduler must agree on lives here: the
//! names of exchanges and queues ([`names`]), the headers and how hostile
//! values in them are read ([`headers`]), the status events ([`event`]), the
//! cancel, pause and resume commands on `P.control` ([`control`],
//! [`pauses`]), the escrow of long tasks
//! ([`escrow`]), the
//! configuration schema with its validation ([`config`]), route overlap
//! detection ([`routes`]) and the topology plan computed from configuration
//! ([`topology`]). Nothing here touches the network, so all of it is tested
//! without a broker.

pub mod backoff;
pub mod changes;
pub mod chord;
pub mod config;
pub mod control;
pub mod delay;
pub mod escrow;
pub mod event;
pub mod flow;
pub mod headers;
pub mod lanes;
pub mod names;
pub mod pauses;
pub mod permissions;
pub mod routes;
pub mod task;
pub mod tenants;
pub mod topology;
pub mod workflow;

pub use config::{Config, ConfigError};
pub use event::{Event, EventError, TaskState};
pub use names::Names;
pub use task::MessageMeta;
pub use task::{DeadReason, InvalidTask, TaskEnvelope};
