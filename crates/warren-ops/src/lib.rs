//! Operations support shared by Warren's long-running processes: metrics
//! written in the Prometheus text format, and a small HTTP server answering
//! `/metrics`, `/healthz` (alive) and `/readyz` (able to do its work).

mod expo;
mod link;
mod server;

pub use expo::{escape, Exposition, Histogram, DURATION_BUCKETS, LATENESS_BUCKETS};
pub use link::BrokerLink;
pub use server::{serve, OpsError, Probe};
