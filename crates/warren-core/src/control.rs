//! Messages on `P.control` (contract section 5): cancel commands, and the
//! boot marker a process publishes to learn that it has read the cancel
//! stream up to its own start.

use serde_json::{json, Value};

/// One message read from `P.cancels` (the stream bound to `P.control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// `{"cancel": "<task id>"}`: cancel that task.
    Cancel(String),
    /// `{"marker": "<id>"}`: a process's boot marker.
    Marker(String),
}

impl ControlMessage {
    /// Reads a message body: a JSON object with a string `cancel` or, failing
    /// that, a string `marker`; other keys are ignored. Anything else
    /// (not JSON, not an object, neither key a string) is `None`, and the
    /// processes reading the stream skip it.
    pub fn parse(body: &[u8]) -> Option<ControlMessage> {
        let v: Value = serde_json::from_slice(body).ok()?;
        if let Some(id) = v.get("cancel").and_then(Value::as_str) {
            return Some(ControlMessage::Cancel(id.to_owned()));
        }
        v.get("marker")
            .and_then(Value::as_str)
            .map(|m| ControlMessage::Marker(m.to_owned()))
    }

    /// The JSON body, which [`ControlMessage::parse`] reads back as `self`.
    pub fn to_json(&self) -> Vec<u8> {
        let v = match self {
            ControlMessage::Cancel(id) => json!({ "cancel": id }),
            ControlMessage::Marker(m) => json!({ "marker": m }),
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
        ] {
            assert_eq!(ControlMessage::parse(&m.to_json()), Some(m.clone()));
        }
        assert_eq!(
            ControlMessage::Cancel("t1".into()).to_json(),
            br#"{"cancel":"t1"}"#
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
}
