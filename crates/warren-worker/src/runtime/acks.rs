//! The acks of one consume channel, coalesced with `multiple`.
//!
//! A task's ack is due once its outcome is confirmed. Rather than one
//! `basic.ack` per task, the acks due at the same moment go out as one
//! `basic.ack` with `multiple` set, which acknowledges every delivery of the
//! channel up to its tag: fewer frames for the worker and for the broker.
//! That is only right while every delivery up to that tag is settled, so a
//! `multiple` ack never reaches past the lowest tag still open: a delivery
//! running, waiting, put back with `basic.nack`, dropped unsettled (it
//! returns to its queue with the channel), or not yet seen by the worker at
//! all (delivery tags count the channel's deliveries from 1, so a tag not
//! yet registered is known to be missing). Acks above that line go out one
//! by one, at once: no ack waits for another task.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use tracing::debug;

/// The acks of one consume channel (see the module's documentation).
pub(super) struct Acks {
    channel: Channel,
    state: Mutex<State>,
    /// Held while a flush computes and sends: an ack sent alone must go
    /// out before a later `multiple` ack covers its tag, or the broker
    /// closes the channel (`unknown delivery tag`).
    sending: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Below this tag every delivery has been registered.
    seen_below: u64,
    /// Tags registered above a gap (a delivery of another consumer of the
    /// channel not read yet).
    seen_ahead: BTreeSet<u64>,
    /// Registered and not settled, in ascending order: tags mostly arrive
    /// in order and settle oldest first, so both ends are cheap.
    open: Open,
    /// Acked by their tasks, not sent yet.
    due: Vec<u64>,
    /// A task is about to send what is due.
    flushing: bool,
}

impl State {
    fn new() -> Self {
        State {
            seen_below: 1,
            ..State::default()
        }
    }

    fn delivered(&mut self, tag: u64) {
        self.open.insert(tag);
        if tag == self.seen_below {
            self.seen_below += 1;
            while self.seen_ahead.remove(&self.seen_below) {
                self.seen_below += 1;
            }
        } else if tag > self.seen_below {
            self.seen_ahead.insert(tag);
        }
    }

    /// What is due now: the tag of one `multiple` ack covering every due
    /// tag below the line, and the due tags above it, to ack one by one.
    fn take_due(&mut self) -> (Option<u64>, Vec<u64>) {
        let line = self.line();
        let mut due = std::mem::take(&mut self.due);
        due.sort_unstable();
        let below = due.partition_point(|t| *t < line);
        let upto = below.checked_sub(1).map(|i| due[i]);
        due.drain(..below);
        (upto, due)
    }

    /// The lowest tag a `multiple` ack must not cover.
    fn line(&self) -> u64 {
        self.open.first().unwrap_or(u64::MAX).min(self.seen_below)
    }
}

/// A sorted set of delivery tags kept in a ring buffer.
#[derive(Default)]
struct Open(VecDeque<u64>);

impl Open {
    fn insert(&mut self, tag: u64) {
        match self.0.back() {
            Some(&last) if last >= tag => {
                if let Err(at) = self.0.binary_search(&tag) {
                    self.0.insert(at, tag);
                }
            }
            _ => self.0.push_back(tag),
        }
    }

    fn remove(&mut self, tag: &u64) {
        if let Ok(at) = self.0.binary_search(tag) {
            self.0.remove(at);
        }
    }

    fn first(&self) -> Option<u64> {
        self.0.front().copied()
    }
}

impl Acks {
    pub(super) fn new(channel: Channel) -> Self {
        Acks {
            channel,
            sending: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::new()),
        }
    }

    /// Registers a delivery as it is read from the channel.
    pub(super) fn delivered(&self, tag: u64) {
        self.state.lock().expect("acks lock").delivered(tag);
    }

    /// Acks the delivery `tag`: with the other acks due now, after the
    /// tasks ready to run have had their turn.
    pub(super) async fn ack(&self, tag: u64) {
        let first = {
            let mut s = self.state.lock().expect("acks lock");
            s.open.remove(&tag);
            s.due.push(tag);
            !std::mem::replace(&mut s.flushing, true)
        };
        if first {
            // Let the other tasks whose outcomes are confirmed add theirs.
            tokio::task::yield_now().await;
            self.flush().await;
        }
    }

    /// Acks the delivery `tag` alone, now, for a caller that needs to know
    /// whether it went out.
    pub(super) async fn ack_alone(&self, tag: u64) -> lapin::Result<()> {
        let _turn = self.sending.lock().await;
        self.state.lock().expect("acks lock").open.remove(&tag);
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: false })
            .await
    }

    /// Returns the delivery `tag` to its queue (`basic.nack`, requeue).
    pub(super) async fn requeue(&self, tag: u64) {
        // Under the turn: a flush must not cover it with a `multiple` ack
        // between its leaving `open` and its nack going out.
        let _turn = self.sending.lock().await;
        self.state.lock().expect("acks lock").open.remove(&tag);
        let options = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        if let Err(e) = self.channel.basic_nack(tag, options).await {
            debug!(error = %e, tag, "nack failed; the broker returns the task with the channel");
        }
    }

    /// Sends what is due: one `multiple` ack up to the highest tag below
    /// the line, one ack each above it.
    async fn flush(&self) {
        let _turn = self.sending.lock().await;
        let (upto, single) = {
            let mut s = self.state.lock().expect("acks lock");
            s.flushing = false;
            s.take_due()
        };
        if let Some(tag) = upto {
            self.send(tag, true).await;
        }
        for tag in single {
            self.send(tag, false).await;
        }
    }

    async fn send(&self, tag: u64, multiple: bool) {
        if let Err(e) = self
            .channel
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
        {
            debug!(error = %e, tag, "ack failed; the broker will redeliver");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Open, State};

    #[test]
    fn open_tags_stay_sorted_whatever_the_order() {
        let mut o = Open::default();
        for t in [3, 1, 2, 7, 5, 5, 9] {
            o.insert(t);
        }
        assert_eq!(o.0, [1, 2, 3, 5, 7, 9]);
        o.remove(&1);
        o.remove(&7);
        o.remove(&4);
        assert_eq!(o.0, [2, 3, 5, 9]);
        assert_eq!(o.first(), Some(2));
    }

    fn ack(s: &mut State, tag: u64) {
        s.open.remove(&tag);
        s.due.push(tag);
    }

    #[test]
    fn a_multiple_ack_covers_what_is_settled_below_the_lowest_open_tag() {
        let mut s = State::new();
        for t in 1..=5 {
            s.delivered(t);
        }
        ack(&mut s, 2);
        ack(&mut s, 1);
        ack(&mut s, 4);
        // 3 and 5 run: 1 and 2 go as one multiple ack, 4 alone.
        assert_eq!(s.take_due(), (Some(2), vec![4]));
        ack(&mut s, 3);
        ack(&mut s, 5);
        assert_eq!(s.take_due(), (Some(5), vec![]));
        assert_eq!(s.take_due(), (None, vec![]));
    }

    #[test]
    fn a_tag_not_yet_read_is_never_covered() {
        let mut s = State::new();
        // Tag 2 belongs to a consumer whose deliveries are not read yet.
        s.delivered(1);
        s.delivered(3);
        ack(&mut s, 1);
        ack(&mut s, 3);
        assert_eq!(s.take_due(), (Some(1), vec![3]));
        s.delivered(2);
        s.delivered(4);
        ack(&mut s, 4);
        // 2 is open: 4 still goes alone.
        assert_eq!(s.take_due(), (None, vec![4]));
        ack(&mut s, 2);
        assert_eq!(s.take_due(), (Some(2), vec![]));
        assert_eq!(s.seen_below, 5);
    }

    #[test]
    fn a_delivery_put_back_or_dropped_unsettled_stops_the_line() {
        let mut s = State::new();
        for t in 1..=3 {
            s.delivered(t);
        }
        // 1 is dropped unsettled (it returns with the channel): it stays open.
        ack(&mut s, 2);
        ack(&mut s, 3);
        assert_eq!(s.take_due(), (None, vec![2, 3]));
        // 1 nacked: no longer open.
        s.open.remove(&1);
        s.delivered(4);
        ack(&mut s, 4);
        assert_eq!(s.take_due(), (Some(4), vec![]));
    }
}
