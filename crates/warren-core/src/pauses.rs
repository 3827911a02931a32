//! Paused work queues and task types (contract section 5).
//!
//! A pause or resume is a record on `P.control` naming a target (a work
//! queue by its short name, or a task type) and the time it was sent. Every
//! process reads the records from the cancels stream; for each target, the
//! record with the latest time holds (a resume wins a tie), whatever order
//! the records arrive in. So the scheduler can re-publish the records it
//! knows before the stream ages them out (`scheduler.cancel_ttl_ms`),
//! keeping their times, without ever undoing a newer record.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::control::ControlMessage;

/// What a pause applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseKind {
    /// A work queue, by its short name (`io`): with its priority lanes.
    Queue,
    /// A task type, exactly (`email.send`), whichever queue carries it.
    Type,
}

impl PauseKind {
    /// `queue` or `type`, as records and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseKind::Queue => "queue",
            PauseKind::Type => "type",
        }
    }
}

/// A work queue or a task type that can be paused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PauseTarget {
    /// Queue or type.
    pub kind: PauseKind,
    /// The queue's short name or the task type.
    pub name: String,
}

impl PauseTarget {
    /// The work queue `short` (`io`).
    pub fn queue(short: impl Into<String>) -> Self {
        PauseTarget {
            kind: PauseKind::Queue,
            name: short.into(),
        }
    }

    /// The task type `t`.
    pub fn task_type(t: impl Into<String>) -> Self {
        PauseTarget {
            kind: PauseKind::Type,
            name: t.into(),
        }
    }
}

impl std::fmt::Display for PauseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.name)
    }
}

/// The latest record of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Latest {
    paused: bool,
    at_ms: i64,
}

/// What a process knows of pauses: the latest record of every target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PauseBook {
    latest: BTreeMap<PauseTarget, Latest>,
}

/// How a record changed a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing: an older record, or the same state again.
    None,
    /// The target is paused now.
    Paused,
    /// The target was paused and is not any more.
    Resumed,
}

impl PauseBook {
    /// Takes in a pause or resume record (other messages change nothing).
    pub fn record(&mut self, m: &ControlMessage) -> Change {
        let (target, new) = match m {
            ControlMessage::Pause { target, at_ms } => (
                target,
                Latest {
                    paused: true,
                    at_ms: *at_ms,
                },
            ),
            ControlMessage::Resume { target, at_ms } => (
                target,
                Latest {
                    paused: false,
                    at_ms: *at_ms,
                },
            ),
            _ => return Change::None,
        };
        let old = self.latest.get(target).copied();
        let newer = match old {
            None => true,
            // A resume wins a tie, so every process decides alike.
            Some(o) => new.at_ms > o.at_ms || (new.at_ms == o.at_ms && o.paused && !new.paused),
        };
        if !newer {
            return Change::None;
        }
        self.latest.insert(target.clone(), new);
        match (old.is_some_and(|o| o.paused), new.paused) {
            (false, true) => Change::Paused,
            (true, false) => Change::Resumed,
            _ => Change::None,
        }
    }

    /// Whether `target` is paused now.
    pub fn is_paused(&self, target: &PauseTarget) -> bool {
        self.latest.get(target).is_some_and(|l| l.paused)
    }

    /// Whether the work queue `short` is paused.
    pub fn queue_paused(&self, short: &str) -> bool {
        self.is_paused(&PauseTarget::queue(short))
    }

    /// Whether the task type `t` is paused.
    pub fn type_paused(&self, t: &str) -> bool {
        self.is_paused(&PauseTarget::task_type(t))
    }

    /// Whether any task type is paused (a worker checks types only then).
    pub fn any_type_paused(&self) -> bool {
        self.any_paused(PauseKind::Type)
    }

    /// Whether any work queue is paused.
    pub fn any_queue_paused(&self) -> bool {
        self.any_paused(PauseKind::Queue)
    }

    fn any_paused(&self, kind: PauseKind) -> bool {
        self.latest.iter().any(|(t, l)| t.kind == kind && l.paused)
    }

    /// The paused targets, queues first, each with when it was paused.
    pub fn paused(&self) -> Vec<(PauseTarget, i64)> {
        self.latest
            .iter()
            .filter(|(_, l)| l.paused)
            .map(|(t, l)| (t.clone(), l.at_ms))
            .collect()
    }

    /// The task types known as not paused (resumed at least once).
    pub fn resumed_types(&self) -> Vec<String> {
        self.latest
            .iter()
            .filter(|(t, l)| t.kind == PauseKind::Type && !l.paused)
            .map(|(t, _)| t.name.clone())
            .collect()
    }

    /// The latest record of every target, as re-published to keep it in
    /// the stream: resumes too, so that an older pause still in the stream
    /// never outlives the resume that undid it.
    pub fn records(&self) -> Vec<ControlMessage> {
        self.latest
            .iter()
            .map(|(target, l)| {
                let (target, at_ms) = (target.clone(), l.at_ms);
                if l.paused {
                    ControlMessage::Pause { target, at_ms }
                } else {
                    ControlMessage::Resume { target, at_ms }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(t: PauseTarget, at_ms: i64) -> ControlMessage {
        ControlMessage::Pause { target: t, at_ms }
    }

    fn resume(t: PauseTarget, at_ms: i64) -> ControlMessage {
        ControlMessage::Resume { target: t, at_ms }
    }

    #[test]
    fn the_latest_record_of_a_target_holds_in_any_order() {
        let io = PauseTarget::queue("io");
        let records = [
            pause(io.clone(), 10),
            resume(io.clone(), 20),
            pause(io.clone(), 30),
        ];
        // Every order of the three records ends paused at 30.
        for order in [
            [0, 1, 2],
            [2, 1, 0],
            [1, 0, 2],
            [1, 2, 0],
            [0, 2, 1],
            [2, 0, 1],
        ] {
            let mut book = PauseBook::default();
            for i in order {
                book.record(&records[i]);
            }
            assert!(book.is_paused(&io), "{order:?}");
            assert_eq!(book.paused(), vec![(io.clone(), 30)]);
        }
        let mut book = PauseBook::default();
        book.record(&pause(io.clone(), 10));
        // A re-published old pause does not undo a newer resume.
        assert_eq!(book.record(&resume(io.clone(), 20)), Change::Resumed);
        assert_eq!(book.record(&pause(io.clone(), 10)), Change::None);
        assert!(!book.is_paused(&io));
        assert_eq!(book.records(), vec![resume(io.clone(), 20)]);
    }

    #[test]
    fn changes_are_reported_once_and_a_resume_wins_a_tie() {
        let t = PauseTarget::task_type("email.send");
        let mut book = PauseBook::default();
        assert_eq!(book.record(&resume(t.clone(), 5)), Change::None);
        assert!(!book.any_type_paused());
        assert_eq!(book.resumed_types(), vec!["email.send".to_owned()]);
        assert_eq!(book.record(&pause(t.clone(), 6)), Change::Paused);
        assert_eq!(book.record(&pause(t.clone(), 6)), Change::None);
        assert_eq!(book.record(&pause(t.clone(), 7)), Change::None);
        assert!(book.type_paused("email.send") && book.any_type_paused());
        assert!(!book.queue_paused("email.send"));
        assert_eq!(book.record(&resume(t.clone(), 7)), Change::Resumed);
        assert_eq!(book.record(&pause(t.clone(), 7)), Change::None);
        assert!(!book.type_paused("email.send"));
        assert_eq!(
            book.record(&ControlMessage::Cancel("x".into())),
            Change::None
        );
    }

    #[test]
    fn queues_and_types_of_one_name_are_distinct_targets() {
        let mut book = PauseBook::default();
        book.record(&pause(PauseTarget::task_type("io"), 1));
        book.record(&pause(PauseTarget::queue("io"), 2));
        book.record(&resume(PauseTarget::task_type("io"), 3));
        assert!(book.queue_paused("io"));
        assert!(!book.type_paused("io"));
        assert_eq!(book.paused(), vec![(PauseTarget::queue("io"), 2)]);
        assert_eq!(book.records().len(), 2);
    }
}
