//! Messages on `P.control` (contract section 5): cancel commands, the
//! boot marker a process publishes to learn that it has read the cancel
//! stream up to its own start, and the lease and done records of tasks
//! held in escrow (tasks running longer than the broker's consumer timeout).

use serde_json::{json, Value};

/// One message read from `P.cancels` (the stream bound to `P.control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// `{"cancel": "<task id>"}`: cancel that task.
    Cancel(String),
    /// `{"marker": "<id>"}`: a process's boot marker.
    Marker(String),
    /// `{"lease": "<task id>", "until": <unix ms>}`: the worker running that
    /// task holds it in escrow until `until`, and renews the lease before
    /// then while the task runs.
    Lease {
        /// The task id.
        id: String,
        /// When the lease ends, in milliseconds since the Unix epoch.
        until_ms: i64,
    },
    /// `{"escrow_done": "<task id>"}`: the task held in escrow has its
    /// outcome recorded; its escrow copies are dropped when they return.
    EscrowDone(String),
}

impl ControlMessage {
    /// Reads a message body: a JSON object with, in this order of
    /// precedence, a string `cancel`, a string `marker`, a string `lease`
    /// with an integer `until`, or a string `escrow_done`; other keys are
    /// ignored. Anything else (not JSON, not an object, no such key with a
    /// value of its type) is `None`, and the processes reading the stream
    /// skip it.
    pub fn parse(body: &[u8]) -> Option<ControlMessage> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        if let Some(id) = text("cancel") {
            return Some(ControlMessage::Cancel(id));
        }
        if let Some(m) = text("marker") {
            return Some(ControlMessage::Marker(m));
        }
        if let (Some(id), Some(until_ms)) = (text("lease"), v.get("until").and_then(Value::as_i64))
        {
            return Some(ControlMessage::Lease { id, until_ms });
        }
        text("escrow_done").map(ControlMessage::EscrowDone)
    }

    /// The JSON body, which [`ControlMessage::parse`] reads back as `self`.
    pub fn to_json(&self) -> Vec<u8> {
        let v = match self {
            ControlMessage::Cancel(id) => json!({ "cancel": id }),
            ControlMessage::Marker(m) => json!({ "marker": m }),
            ControlMessage::Lease { id, until_ms } => json!({ "lease": id, "until": until_ms }),
            ControlMessage::EscrowDone(id) => json!({ "escrow_done": id }),
        };
        serde_json::to_vec(&v).expect("a JSON object of one string always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_read_back_as_written() {
        for m in [
            ControlMessage::Cancel("0193-task".into()),
            ControlMessage::Cancel(String::new()),
            ControlMessage::Marker("boot \u{1F600} \"quoted\"".into()),
            ControlMessage::Lease {
                id: "0193-long".into(),
                until_ms: 1_767_000_000_000,
            },
            ControlMessage::Lease {
                id: String::new(),
                until_ms: -1,
            },
            ControlMessage::EscrowDone("0193-long".into()),
        ] {
            assert_eq!(ControlMessage::parse(&m.to_json()), Some(m.clone()));
        }
        assert_eq!(
            ControlMessage::Cancel("t1".into()).to_json(),
            br#"{"cancel":"t1"}"#
        );
        assert_eq!(
            ControlMessage::Lease {
                id: "t1".into(),
                until_ms: 5
            }
            .to_json(),
            br#"{"lease":"t1","until":5}"#
        );
        assert_eq!(
            ControlMessage::EscrowDone("t1".into()).to_json(),
            br#"{"escrow_done":"t1"}"#
        );
    }

    #[test]
    fn escrow_records_need_their_types() {
        assert_eq!(
            ControlMessage::parse(br#"{"escrow_done":"t","lease":"t","until":9}"#),
            Some(ControlMessage::Lease {
                id: "t".into(),
                until_ms: 9
            })
        );
        assert_eq!(
            ControlMessage::parse(br#"{"lease":"t","until":"9","escrow_done":"d"}"#),
            Some(ControlMessage::EscrowDone("d".into()))
        );
        for skipped in [
            &br#"{"lease":"t"}"#[..],
            br#"{"lease":"t","until":1.5}"#,
            br#"{"lease":7,"until":1}"#,
            br#"{"escrow_done":null}"#,
        ] {
            assert_eq!(ControlMessage::parse(skipped), None, "{skipped:?}");
        }
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
}
