//! Escrow: how a task outlives the broker's consumer timeout and still runs
//! once (contract section 3, "Long tasks").
//!
//! RabbitMQ closes the channel of a consumer that holds a delivery
//! unacknowledged longer than its `consumer_timeout`, and the task would be
//! redelivered while it still runs. So a worker whose task is still running
//! at [`EscrowTimes::after_ms`] puts it in escrow:
//!
//! 1. it publishes an escrow copy of the delivery (same id, body, headers
//!    and priority, marked with [`ESCROW`] = a new escrow id naming this run
//!    of the task) to `P.escrow`, expiring after
//!    the lease length `L`; an expired copy is dead-lettered back to the
//!    work queue it came from;
//! 2. once the copy is confirmed, it publishes a lease record
//!    `{"lease": id, "escrow": escrow id, "until": ms}` to `P.control`;
//! 3. once that is confirmed, it acknowledges the delivery.
//!
//! While the task runs it renews both every `L/2`. When the outcome is
//! recorded it publishes `{"escrow_done": id, "escrow": escrow id}`. A
//! worker that receives a copy carrying the mark asks its [`LeaseBook`] (fed
//! from the cancels stream) what to do: drop it when that run is done or
//! its lease still runs, run the task again as a redelivery when the lease
//! ended (its worker died). Records are matched by escrow id, not task id:
//! a retry of the same task, or its run after its worker died, is another
//! escrow, which the done record of an earlier run does not end.
//!
//! The lease ends `3L/4` after the copy was sent and the copy returns `L`
//! after: a copy returning while its owner lives finds a newer lease that
//! ends `L/4` later at the earliest, and the last copy of a dead owner
//! returns `L/4` after its lease ended at the earliest. `L/4` is the margin
//! for clock differences between workers and for the lag of the cancels
//! stream.

use std::collections::HashMap;

use crate::config::Config;
use crate::control::ControlMessage;

/// Header marking an escrow copy; its value is the escrow id, which the
/// lease and done records of that run name.
pub const ESCROW: &str = "x-warren-escrow";

/// When a worker puts a task in escrow and renews it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscrowTimes {
    /// A task still running this long after it started goes into escrow.
    pub after_ms: u64,
    /// The lease length `L`, and the expiration of every escrow copy.
    pub lease_ms: u64,
}

impl EscrowTimes {
    /// The times a (validated) configuration calls for; `None` when the
    /// broker has no consumer timeout (`broker.consumer_timeout_ms = 0`).
    pub fn from_config(c: &Config) -> Option<Self> {
        let timeout = c.broker.consumer_timeout_ms;
        if timeout == 0 {
            return None;
        }
        let after_ms = match c.worker.escrow_after_ms {
            0 => timeout / 2,
            set => set,
        };
        Some(Self {
            after_ms,
            lease_ms: c.worker.escrow_lease_ms,
        })
    }

    /// How often a task in escrow renews its copy and its lease: `L/2`.
    pub fn renew_every_ms(&self) -> u64 {
        self.lease_ms / 2
    }

    /// The end of the lease recorded for a copy sent at `sent_ms` (read
    /// before the copy is published): `3L/4` later.
    pub fn lease_until(&self, sent_ms: i64) -> i64 {
        sent_ms.saturating_add(i64::try_from(self.lease_ms / 4 * 3).unwrap_or(i64::MAX))
    }

    /// How long a lease record and a done record are kept after the lease
    /// ended: by then every copy of the task has returned (`L/4` after the
    /// lease ended, plus the margin of one more `L`).
    fn keep_ms(&self) -> i64 {
        i64::try_from(self.lease_ms.saturating_mul(2)).unwrap_or(i64::MAX)
    }
}

/// What to do with an escrow copy that came back to its work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// The task's outcome is recorded: acknowledge the copy, nothing else.
    Done,
    /// The lease still runs: its worker lives and holds a newer copy.
    /// Acknowledge the copy, nothing else.
    Held,
    /// The lease ended (or no lease is known): the worker died. Run the
    /// task again, counted as a redelivery.
    Expired,
}

/// What a process knows of the runs in escrow, by escrow id, from the lease
/// and done records on the cancels stream.
#[derive(Debug, Clone, Default)]
pub struct LeaseBook {
    leases: HashMap<String, Lease>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    /// The latest end of a lease seen (Unix ms).
    until_ms: i64,
    /// When the done record was read (Unix ms), if it was.
    done_at: Option<i64>,
}

impl LeaseBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes in a record read at `now_ms`; other messages are ignored.
    pub fn record(&mut self, m: &ControlMessage, now_ms: i64) {
        match m {
            ControlMessage::Lease {
                escrow_id,
                until_ms,
                ..
            } => {
                let l = self.leases.entry(escrow_id.clone()).or_insert(Lease {
                    until_ms: *until_ms,
                    done_at: None,
                });
                l.until_ms = l.until_ms.max(*until_ms);
            }
            ControlMessage::EscrowDone { escrow_id, .. } => {
                let l = self.leases.entry(escrow_id.clone()).or_insert(Lease {
                    until_ms: now_ms,
                    done_at: None,
                });
                l.done_at.get_or_insert(now_ms);
            }
            ControlMessage::Cancel(_)
            | ControlMessage::Marker(_)
            | ControlMessage::Pause { .. }
            | ControlMessage::Change { .. }
            | ControlMessage::Resume { .. } => {}
        }
    }

    /// What to do with an escrow copy of the escrow `escrow_id` received at
    /// `now_ms`.
    pub fn returned(&self, escrow_id: &str, now_ms: i64) -> Returned {
        match self.leases.get(escrow_id) {
            Some(l) if l.done_at.is_some() => Returned::Done,
            Some(l) if l.until_ms > now_ms => Returned::Held,
            _ => Returned::Expired,
        }
    }

    /// Forgets the runs whose lease (or done record) is older than every
    /// copy they can still have out, for `times` at `now_ms`.
    pub fn prune(&mut self, times: &EscrowTimes, now_ms: i64) {
        let keep = times.keep_ms();
        self.leases.retain(|_, l| {
            l.until_ms
                .max(l.done_at.unwrap_or(i64::MIN))
                .saturating_add(keep)
                > now_ms
        });
    }

    /// How many runs the book holds.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether the book holds no task.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: u64 = 60_000;
    const T: EscrowTimes = EscrowTimes {
        after_ms: 900_000,
        lease_ms: L,
    };

    fn lease(escrow_id: &str, until_ms: i64) -> ControlMessage {
        ControlMessage::Lease {
            task_id: "task".into(),
            escrow_id: escrow_id.into(),
            until_ms,
        }
    }

    fn done(escrow_id: &str) -> ControlMessage {
        ControlMessage::EscrowDone {
            task_id: "task".into(),
            escrow_id: escrow_id.into(),
        }
    }

    #[test]
    fn times_follow_the_configuration() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(
            EscrowTimes::from_config(&c),
            Some(EscrowTimes {
                after_ms: 900_000,
                lease_ms: 60_000
            }),
            "half of RabbitMQ's default 30 minutes"
        );
        let c = Config::from_toml(
            "[broker]\nconsumer_timeout_ms = 10000\n[worker]\nescrow_after_ms = 3000\n\
             escrow_lease_ms = 4000",
        )
        .unwrap();
        assert_eq!(
            EscrowTimes::from_config(&c),
            Some(EscrowTimes {
                after_ms: 3000,
                lease_ms: 4000
            })
        );
        let c = Config::from_toml("[broker]\nconsumer_timeout_ms = 0").unwrap();
        assert_eq!(EscrowTimes::from_config(&c), None);
        assert_eq!(T.renew_every_ms(), 30_000);
        assert_eq!(T.lease_until(1_000), 46_000);
    }

    #[test]
    fn a_living_owner_keeps_its_task_and_a_dead_one_releases_it() {
        let l = L as i64;
        // Copies sent at 0, L/2, L (renewals); each returns L after it was sent.
        let mut book = LeaseBook::new();
        book.record(&lease("t", T.lease_until(0)), 0);
        book.record(&lease("t", T.lease_until(l / 2)), l / 2);
        // The copy of 0 returns at L: the renewal's lease ends at 5L/4.
        assert_eq!(book.returned("t", l), Returned::Held);
        // Even read L/4 late, or by a worker whose clock is L/4 - 1 ahead.
        assert_eq!(book.returned("t", l + l / 4 - 1), Returned::Held);
        // The owner died after the renewal at L/2: its last copy returns at
        // 3L/2, after the lease ended at 5L/4.
        assert_eq!(book.returned("t", l + l / 2), Returned::Expired);
        // Even for a worker whose clock is L/4 - 1 behind.
        assert_eq!(book.returned("t", l + l / 4 + 1), Returned::Expired);
    }

    #[test]
    fn done_wins_and_unknown_leases_run_again() {
        let mut book = LeaseBook::new();
        assert_eq!(book.returned("nobody", 0), Returned::Expired);
        book.record(&lease("t", 10_000), 0);
        book.record(&done("t"), 1_000);
        assert_eq!(book.returned("t", 2_000), Returned::Done);
        assert_eq!(book.returned("t", 1_000_000), Returned::Done);
        // A late lease record read after the done record changes nothing.
        book.record(&lease("t", 20_000), 3_000);
        assert_eq!(book.returned("t", 4_000), Returned::Done);
        // An older lease read after a newer one does not shorten it.
        book.record(&lease("u", 50_000), 0);
        book.record(&lease("u", 30_000), 0);
        assert_eq!(book.returned("u", 40_000), Returned::Held);
        // Another run of the same task (a retry, or the run after its worker
        // died) is another escrow: the done record of the first does not
        // end it.
        book.record(&lease("t-again", 10_000), 5_000);
        assert_eq!(book.returned("t-again", 6_000), Returned::Held);
        assert_eq!(book.returned("t-again", 10_000), Returned::Expired);
        // Cancels and markers are not escrow records.
        book.record(&ControlMessage::Cancel("v".into()), 0);
        book.record(&ControlMessage::Marker("v".into()), 0);
        assert_eq!(book.len(), 3);
    }

    #[test]
    fn pruning_keeps_what_a_copy_may_still_ask_about() {
        let l = L as i64;
        let mut book = LeaseBook::new();
        book.record(&lease("old", 0), 0);
        book.record(&lease("new", 10 * l), 0);
        book.record(&done("done"), 0);
        book.prune(&T, 2 * l - 1);
        assert_eq!(book.len(), 3, "kept 2L after the lease ended");
        book.prune(&T, 2 * l + 1);
        assert_eq!(book.len(), 1);
        assert_eq!(book.returned("new", 2 * l), Returned::Held);
        assert!(!book.is_empty());
    }
}
