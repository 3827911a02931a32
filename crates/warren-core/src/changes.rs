//! Changes to waiting tasks (contract section 5): a new priority, a new due
//! time, or both, for a task that has not started.
//!
//! A change is a record on `P.control`, `{"change": "<task id>", "at": <unix
//! ms>, "priority": N, "due": <unix ms>}` (`priority` or `due` or both).
//! Every worker and scheduler reads the records from the cancels stream and
//! keeps, per task and per field, the value of the record with the latest
//! `at`, so a task changed twice follows the last change whatever order the
//! records arrive in. A copy of the task carries, in `x-warren-changed`, the
//! `at` of the latest change applied to it: a copy older than the latest
//! change is superseded, and whoever sees it next applies the change (a new
//! copy, confirmed, then the old one acknowledged).

use std::collections::HashMap;

use crate::control::ControlMessage;

/// The latest change of one task, field by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskChange {
    /// The `at` of the latest record: a copy carrying it (or a later one)
    /// has every change applied.
    pub at_ms: i64,
    /// The latest priority asked, with the `at` of its record.
    pub priority: Option<(u8, i64)>,
    /// The latest due time asked (Unix ms), with the `at` of its record.
    pub due_ms: Option<(i64, i64)>,
}

impl TaskChange {
    /// The priority to give a copy now.
    pub fn priority(&self) -> Option<u8> {
        self.priority.map(|(p, _)| p)
    }

    /// The due time to give a copy now.
    pub fn due_ms(&self) -> Option<i64> {
        self.due_ms.map(|(d, _)| d)
    }
}

/// What a process knows of changes: the latest of every changed task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeBook {
    tasks: HashMap<String, TaskChange>,
}

impl ChangeBook {
    /// Takes in a change record (other messages change nothing); returns
    /// whether it changed what is known of its task.
    pub fn record(&mut self, m: &ControlMessage) -> bool {
        let ControlMessage::Change {
            task_id,
            at_ms,
            priority,
            due_ms,
        } = m
        else {
            return false;
        };
        let c = self.tasks.entry(task_id.clone()).or_default();
        let before = *c;
        c.at_ms = c.at_ms.max(*at_ms);
        // Of two records with the same `at`, the greater value wins, so
        // that every process decides alike whatever the arrival order.
        if let Some(p) = priority {
            if c.priority.is_none_or(|(v, at)| (*at_ms, *p) > (at, v)) {
                c.priority = Some((*p, *at_ms));
            }
        }
        if let Some(d) = due_ms {
            if c.due_ms.is_none_or(|(v, at)| (*at_ms, *d) > (at, v)) {
                c.due_ms = Some((*d, *at_ms));
            }
        }
        *c != before
    }

    /// The change a copy of `task_id` that carries `applied_ms` (its
    /// `x-warren-changed`, 0 if absent) has not had yet, if any.
    pub fn pending(&self, task_id: &str, applied_ms: i64) -> Option<TaskChange> {
        self.tasks
            .get(task_id)
            .filter(|c| c.at_ms > applied_ms)
            .copied()
    }

    /// The latest change of `task_id`, applied or not.
    pub fn get(&self, task_id: &str) -> Option<TaskChange> {
        self.tasks.get(task_id).copied()
    }

    /// The latest record of every changed task, as the scheduler
    /// re-publishes them to keep them in the stream.
    pub fn records(&self) -> Vec<ControlMessage> {
        let mut out = Vec::new();
        for (id, c) in &self.tasks {
            // One record per field keeps each field's own time.
            if let Some((p, at)) = c.priority {
                out.push(ControlMessage::Change {
                    task_id: id.clone(),
                    at_ms: at,
                    priority: Some(p),
                    due_ms: None,
                });
            }
            if let Some((d, at)) = c.due_ms {
                out.push(ControlMessage::Change {
                    task_id: id.clone(),
                    at_ms: at,
                    priority: None,
                    due_ms: Some(d),
                });
            }
        }
        out
    }

    /// Forgets the changes of tasks whose latest record is older than
    /// `before_ms` (the stream no longer holds them either).
    pub fn prune(&mut self, before_ms: i64) {
        self.tasks.retain(|_, c| c.at_ms >= before_ms);
    }

    /// How many tasks have a change.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task has a change.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(at_ms: i64, priority: Option<u8>, due_ms: Option<i64>) -> ControlMessage {
        ControlMessage::Change {
            task_id: "t".into(),
            at_ms,
            priority,
            due_ms,
        }
    }

    #[test]
    fn each_field_follows_its_latest_record_in_any_order() {
        let records = [
            change(10, Some(3), Some(1_000)),
            change(20, None, Some(2_000)),
            change(30, Some(9), None),
        ];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut book = ChangeBook::default();
            for i in order {
                book.record(&records[i]);
            }
            let c = book.get("t").unwrap();
            assert_eq!(c.priority(), Some(9), "{order:?}");
            assert_eq!(c.due_ms(), Some(2_000), "{order:?}");
            assert_eq!(c.at_ms, 30);
        }
    }

    #[test]
    fn a_tie_is_decided_by_value_not_arrival() {
        let (a, b) = (change(5, Some(2), Some(10)), change(5, Some(7), Some(3)));
        let mut one = ChangeBook::default();
        one.record(&a);
        one.record(&b);
        let mut two = ChangeBook::default();
        two.record(&b);
        two.record(&a);
        assert_eq!(one, two);
        assert_eq!(one.get("t").unwrap().priority(), Some(7));
        assert_eq!(one.get("t").unwrap().due_ms(), Some(10));
    }

    #[test]
    fn a_copy_is_superseded_by_a_later_change_only() {
        let mut book = ChangeBook::default();
        assert!(book.pending("t", 0).is_none());
        assert!(book.record(&change(10, Some(3), None)));
        assert!(!book.record(&change(10, Some(3), None)), "same again");
        assert_eq!(book.pending("t", 0).unwrap().priority(), Some(3));
        assert!(book.pending("t", 10).is_none(), "applied");
        book.record(&change(20, None, Some(5)));
        assert_eq!(book.pending("t", 10).unwrap().due_ms(), Some(5));
        assert!(!book.record(&ControlMessage::Cancel("t".into())));
    }

    #[test]
    fn records_and_pruning_keep_the_latest() {
        let mut book = ChangeBook::default();
        book.record(&change(10, Some(3), Some(7)));
        book.record(&change(20, Some(4), None));
        let mut again = ChangeBook::default();
        for r in book.records() {
            again.record(&r);
        }
        assert_eq!(again.get("t"), book.get("t"));
        book.prune(21);
        assert!(book.is_empty());
    }
}
