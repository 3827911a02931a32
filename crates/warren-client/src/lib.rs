//! The producer side of Warren.
//!
//! A [`Client`] publishes tasks to `P.tasks` with publisher confirms over a
//! pool of broker connections (deadpool; over TLS for `amqps://`), keeps many confirms in flight
//! for batches, calls a task and waits for its final event through
//! `reply_to` (direct reply-to), and follows status events on `P.events`
//! with an [`EventWatch`]. Everything it does is also possible from any AMQP
//! client following the wire contract; this crate is a convenience.

mod cancels;
mod client;
mod connect;
pub mod dead;
mod error;
mod outbox;
mod reconnect;
mod request;
mod tls;
mod watch;
pub mod workflow;

pub use cancels::cancel_command;
pub use client::Client;
pub use error::ClientError;
pub use outbox::ORIGINAL_EXPIRATION;
pub use request::TaskRequest;
pub use warren_core::workflow::{After, Step};
pub use watch::{EventWatch, ReceivedEvent};
pub use workflow::{Chain, Chord, Group, WorkflowSpec};

/// What Warren's own long-running processes (worker, scheduler, tracker)
/// build on: named connections, confirm channels, the outbox of events and
/// task copies, the cancel set and the reconnect loop. A producer needs none
/// of it.
pub mod runtime {
    pub use crate::cancels::{now_ms, CancelSet, RunningGuard};
    pub use crate::connect::{
        connect, connection_gone, connection_name, process_identity, publish_timeout,
        ConfirmChannel,
    };
    pub use crate::outbox::{confirm_all, copy_properties, short, Outbox};
    pub use crate::reconnect::Reconnect;
}

pub use lapin;
