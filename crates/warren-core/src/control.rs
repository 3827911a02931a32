//! Messages on `P.control` (contract section 5): cancel commands, the
//! boot marker a process publishes to learn that it has read the cancel
//! stream up to its own start, the lease and done records of tasks
//! held in escrow (tasks running longer than the broker's consumer timeout),
//! and the pause and resume records of work queues and task types
//! ([`crate::pauses`]).

use serde_json::{json, Value};

use crate::pauses::{PauseKind, PauseTarget};

/// One message read from `P.cancels` (the stream bound to `P.control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// `{"cancel": "<task id>"}`: cancel that task.
    Cancel(String),
    /// `{"marker": "<id>"}`: a process's boot marker.
    Marker(String),
    /// `{"lease": "<task id>", "escrow": "<escrow id>", "until": <unix ms>}`:
    /// the worker running that task holds it in the escrow `escrow` until
    /// `until`, and renews the lease before then while the task runs.
    Lease {
        /// The task id (informative: records are matched by escrow id).
        task_id: String,
        /// The escrow: one run of the task put in escrow, named in the
        /// `x-warren-escrow` header of its copies.
        escrow_id: String,
        /// When the lease ends, in milliseconds since the Unix epoch.
        until_ms: i64,
    },
    /// `{"escrow_done": "<task id>", "escrow": "<escrow id>"}`: the run held
    /// in that escrow has its outcome recorded; its copies are dropped when
    /// they return.
    EscrowDone {
        /// The task id (informative).
        task_id: String,
        /// The escrow.
        escrow_id: String,
    },
    /// `{"pause": "queue" | "type", "name": "<name>", "at": <unix ms>}`:
    /// workers stop taking the tasks of that work queue (short name) or
    /// task type, from the record with the latest `at` on.
    Pause {
        /// The work queue or task type paused.
        target: PauseTarget,
        /// When it was paused, in milliseconds since the Unix epoch: of the
        /// records of one target, the one with the latest `at` holds.
        at_ms: i64,
    },
    /// `{"change": "<task id>", "at": <unix ms>, "priority": N, "due":
    /// <unix ms>}` (`priority` 0..=255, `due`, or both): a waiting task gets
    /// that priority or due time ([`crate::changes`]).
    Change {
        /// The task changed.
        task_id: String,
        /// When the change was asked, in milliseconds since the Unix epoch.
        at_ms: i64,
        /// Its new priority.
        priority: Option<u8>,
        /// Its new due time, in milliseconds since the Unix epoch.
        due_ms: Option<i64>,
    },
    /// `{"resume": "queue" | "type", "name": "<name>", "at": <unix ms>}`:
    /// undoes a pause of that target with an earlier `at`.
    Resume {
        /// The work queue or task type resumed.
        target: PauseTarget,
        /// When it was resumed, in milliseconds since the Unix epoch.
        at_ms: i64,
    },
}

impl ControlMessage {
    /// Reads a message body: a JSON object with, in this order of
    /// precedence, a string `cancel`, a string `marker`, a string `lease`
    /// with a string `escrow` and an integer `until`, a string
    /// `escrow_done` with a string `escrow`, or a `pause` or `resume` of
    /// `"queue"` or `"type"` with a string `name` and an integer `at`; other
    /// keys are ignored.
    /// Anything else (not JSON, not an object, no such keys with values of
    /// their types) is `None`, and the processes reading the stream skip it.
    pub fn parse(body: &[u8]) -> Option<ControlMessage> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        if let Some(id) = text("cancel") {
            return Some(ControlMessage::Cancel(id));
        }
        if let Some(m) = text("marker") {
            return Some(ControlMessage::Marker(m));
        }
        if let Some(m) = Self::parse_escrow(&v) {
            return Some(m);
        }
        if let Some(task_id) = text("change") {
            let at_ms = v.get("at")?.as_i64()?;
            let priority = match v.get("priority") {
                None | Some(Value::Null) => None,
                Some(p) => Some(u8::try_from(p.as_u64()?).ok()?),
            };
            let due_ms = match v.get("due") {
                None | Some(Value::Null) => None,
                Some(d) => Some(d.as_i64()?),
            };
            if priority.is_none() && due_ms.is_none() {
                return None;
            }
            return Some(ControlMessage::Change {
                task_id,
                at_ms,
                priority,
                due_ms,
            });
        }
        let pause_record = |key: &str| -> Option<(PauseTarget, i64)> {
            let kind = match v.get(key)?.as_str()? {
                "queue" => PauseKind::Queue,
                "type" => PauseKind::Type,
                _ => return None,
            };
            let name = v.get("name")?.as_str()?.to_owned();
            let at_ms = v.get("at")?.as_i64()?;
            Some((PauseTarget { kind, name }, at_ms))
        };
        if let Some((target, at_ms)) = pause_record("pause") {
            return Some(ControlMessage::Pause { target, at_ms });
        }
        pause_record("resume").map(|(target, at_ms)| ControlMessage::Resume { target, at_ms })
    }

    /// A lease or escrow-done record.
    fn parse_escrow(v: &Value) -> Option<ControlMessage> {
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let escrow_id = text("escrow")?;
        let until = v.get("until").and_then(Value::as_i64);
        if let (Some(task_id), Some(until_ms)) = (text("lease"), until) {
            return Some(ControlMessage::Lease {
                task_id,
                escrow_id,
                until_ms,
            });
        }
        text("escrow_done").map(|task_id| ControlMessage::EscrowDone { task_id, escrow_id })
    }

    /// The JSON body, which [`ControlMessage::parse`] reads back as `self`.
    pub fn to_json(&self) -> Vec<u8> {
        let v = match self {
            ControlMessage::Cancel(id) => json!({ "cancel": id }),
            ControlMessage::Marker(m) => json!({ "marker": m }),
            ControlMessage::Lease {
                task_id,
                escrow_id,
                until_ms,
            } => json!({ "lease": task_id, "escrow": escrow_id, "until": until_ms }),
            ControlMessage::EscrowDone { task_id, escrow_id } => {
                json!({ "escrow_done": task_id, "escrow": escrow_id })
            }
            ControlMessage::Pause { target, at_ms } => {
                json!({ "pause": target.kind.as_str(), "name": target.name, "at": at_ms })
            }
            ControlMessage::Change {
                task_id,
                at_ms,
                priority,
                due_ms,
            } => {
                let mut v = json!({ "change": task_id, "at": at_ms });
                if let Some(p) = priority {
                    v["priority"] = json!(p);
                }
                if let Some(d) = due_ms {
                    v["due"] = json!(d);
                }
                v
            }
            ControlMessage::Resume { target, at_ms } => {
                json!({ "resume": target.kind.as_str(), "name": target.name, "at": at_ms })
            }
        };
        serde_json::to_vec(&v).expect("a JSON object of strings and integers always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(task_id: &str, escrow_id: &str, until_ms: i64) -> ControlMessage {
        ControlMessage::Lease {
            task_id: task_id.into(),
            escrow_id: escrow_id.into(),
            until_ms,
        }
    }

    fn done(task_id: &str, escrow_id: &str) -> ControlMessage {
        ControlMessage::EscrowDone {
            task_id: task_id.into(),
            escrow_id: escrow_id.into(),
        }
    }

    #[test]
    fn commands_read_back_as_written() {
        for m in [
            ControlMessage::Cancel("0193-task".into()),
            ControlMessage::Cancel(String::new()),
            ControlMessage::Marker("boot \u{1F600} \"quoted\"".into()),
            lease("0193-long", "0193-escrow", 1_767_000_000_000),
            lease("", "", -1),
            done("0193-long", "0193-escrow"),
            ControlMessage::Pause {
                target: PauseTarget::queue("io"),
                at_ms: 1_767_000_000_000,
            },
            ControlMessage::Resume {
                target: PauseTarget::task_type("email.send"),
                at_ms: 0,
            },
            ControlMessage::Change {
                task_id: "t1".into(),
                at_ms: 5,
                priority: Some(9),
                due_ms: None,
            },
            ControlMessage::Change {
                task_id: "t1".into(),
                at_ms: 6,
                priority: Some(0),
                due_ms: Some(-3),
            },
        ] {
            assert_eq!(ControlMessage::parse(&m.to_json()), Some(m.clone()));
        }
        assert_eq!(
            ControlMessage::Cancel("t1".into()).to_json(),
            br#"{"cancel":"t1"}"#
        );
        assert_eq!(
            lease("t1", "e1", 5).to_json(),
            br#"{"escrow":"e1","lease":"t1","until":5}"#
        );
        assert_eq!(
            done("t1", "e1").to_json(),
            br#"{"escrow":"e1","escrow_done":"t1"}"#
        );
    }

    #[test]
    fn cancel_wins_and_anything_else_is_skipped() {
        assert_eq!(
            ControlMessage::parse(br#"{"marker":"m","cancel":"t","x":1}"#),
            Some(ControlMessage::Cancel("t".into()))
        );
        assert_eq!(
            ControlMessage::parse(br#"{"cancel":5,"marker":"m"}"#),
            Some(ControlMessage::Marker("m".into()))
        );
        for skipped in [
            &b""[..],
            b"not json",
            b"[\"cancel\",\"t\"]",
            b"\"cancel\"",
            br#"{"cancel":null}"#,
            br#"{"cancel":["t"]}"#,
            br#"{"Cancel":"t"}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(ControlMessage::parse(skipped), None, "{skipped:?}");
        }
    }

    #[test]
    fn change_records_need_a_time_and_a_field() {
        for skipped in [
            &br#"{"change":"t","priority":3}"#[..],
            br#"{"change":"t","at":1}"#,
            br#"{"change":"t","at":1,"priority":256}"#,
            br#"{"change":"t","at":1,"priority":-1}"#,
            br#"{"change":"t","at":1,"due":"soon"}"#,
            br#"{"change":5,"at":1,"due":1}"#,
        ] {
            assert_eq!(ControlMessage::parse(skipped), None, "{skipped:?}");
        }
    }

    #[test]
    fn pause_records_need_a_kind_a_name_and_a_time() {
        assert_eq!(
            ControlMessage::Pause {
                target: PauseTarget::queue("io"),
                at_ms: 7
            }
            .to_json(),
            br#"{"at":7,"name":"io","pause":"queue"}"#
        );
        assert_eq!(
            ControlMessage::parse(br#"{"resume":"type","name":"a.b","at":9,"pause":"queue"}"#),
            Some(ControlMessage::Pause {
                target: PauseTarget::queue("a.b"),
                at_ms: 9
            })
        );
        assert_eq!(
            ControlMessage::parse(br#"{"pause":"shelf","resume":"type","name":"a","at":9}"#),
            Some(ControlMessage::Resume {
                target: PauseTarget::task_type("a"),
                at_ms: 9
            })
        );
        for skipped in [
            &br#"{"pause":"queue","name":"io"}"#[..],
            br#"{"pause":"queue","at":1}"#,
            br#"{"pause":"queue","name":"io","at":"1"}"#,
            br#"{"pause":"queue","name":"io","at":1.5}"#,
            br#"{"pause":"Queue","name":"io","at":1}"#,
            br#"{"pause":true,"name":"io","at":1}"#,
            br#"{"resume":"type","name":5,"at":1}"#,
        ] {
            assert_eq!(ControlMessage::parse(skipped), None, "{skipped:?}");
        }
    }

    #[test]
    fn escrow_records_need_their_keys_and_types() {
        assert_eq!(
            ControlMessage::parse(br#"{"escrow_done":"t","lease":"t","until":9,"escrow":"e"}"#),
            Some(lease("t", "e", 9))
        );
        assert_eq!(
            ControlMessage::parse(br#"{"lease":"t","until":"9","escrow_done":"d","escrow":"e"}"#),
            Some(done("d", "e"))
        );
        assert_eq!(
            ControlMessage::parse(br#"{"cancel":"c","lease":"t","until":9,"escrow":"e"}"#),
            Some(ControlMessage::Cancel("c".into()))
        );
        for skipped in [
            &br#"{"lease":"t","escrow":"e"}"#[..],
            br#"{"lease":"t","until":1}"#,
            br#"{"lease":"t","until":1.5,"escrow":"e"}"#,
            br#"{"lease":7,"until":1,"escrow":"e"}"#,
            br#"{"lease":"t","until":1,"escrow":7}"#,
            br#"{"escrow_done":"t"}"#,
            br#"{"escrow_done":null,"escrow":"e"}"#,
            br#"{"escrow":"e"}"#,
        ] {
            assert_eq!(ControlMessage::parse(skipped), None, "{skipped:?}");
        }
    }
}
