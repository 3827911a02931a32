//! Chords: a group whose callback runs once every member has reached a
//! final outcome, with the members' results and failures in member order
//! (contract section 8).
//!
//! The join is held by the broker, never by a process:
//!
//! - A producer publishes the chord's **start** ([`Start`]: its size and
//!   callback) to `P.chords`, with the chord id as `message_id`, and the
//!   members to `P.tasks`, each with [`CHORD`] = the chord id and
//!   [`INDEX`] = its position.
//! - When a member reaches a final outcome (`succeeded`, `dead`,
//!   `cancelled`), whoever settles it (a worker, or the scheduler for a
//!   member dead-lettered by the broker) declares the chord's queue
//!   `P.chord.<id>` ([`queue_arguments`](crate::topology::chord_queue_arguments))
//!   and publishes an [`Outcome`] to it, confirmed before the member is
//!   acknowledged.
//! - One scheduler at a time (the exclusive consumer of `P.chords`) holds
//!   each start unacknowledged, consumes the chord's queue without
//!   acknowledging, and [`Fold`]s the outcomes (a duplicate of a member
//!   is dropped by its index). Once all are in it publishes the callback
//!   (confirmed), acknowledges the start, and deletes the chord's queue. A
//!   scheduler killed on the way leaves everything unacknowledged, and the
//!   next one folds again from the start.
//!
//! The callback's id is deterministic ([`callback_id`]): a scheduler killed
//! after publishing it and before acknowledging the start publishes it
//! again with the same id (at least once, effectively once for a handler
//! that deduplicates by id).

use amq_protocol_types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::headers;
use crate::task::InvalidTask;
use crate::workflow::{NextTask, Step, MAX_ID_BYTES, PARENT, WORKFLOW};

/// Header of a member: the id of the chord it belongs to (a string).
pub const CHORD: &str = "x-warren-chord";
/// Header of a member: its position in the chord, `0..size` (an integer).
pub const INDEX: &str = "x-warren-chord-index";

/// The most members a chord may have.
pub const MAX_MEMBERS: usize = 10_000;
/// The longest start message body, in bytes of JSON text.
pub const MAX_START_BYTES: usize = 65_536;
/// The deepest nesting of arrays and objects in a start message body.
pub const MAX_START_DEPTH: usize = 32;
/// A member's result longer than this (bytes of JSON text) reaches the
/// callback as `{"truncated": true, "bytes": <its length>}`; so does an
/// error longer than this. With task ids of at most 255 bytes and reasons
/// cut at [`MAX_REASON_BYTES`], the callback of 10,000 members then stays
/// under 9 MB: within the default `limits.max_body_bytes` (10 MiB) of the
/// worker that runs it, and RabbitMQ 4's default 16 MiB message size.
pub const MAX_RESULT_BYTES: usize = 512;
/// A reason longer than this reaches the callback cut to it.
pub const MAX_REASON_BYTES: usize = 64;
/// A task id longer than this (AMQP's `message_id` limit) reaches the
/// callback cut to it.
pub const MAX_TASK_ID_BYTES: usize = 255;
/// How long a chord's queue lives unused (no consumer, no declaration):
/// it cleans up after a chord that never completes or a duplicate outcome
/// that arrives after its chord completed.
pub const QUEUE_EXPIRES_MS: i64 = 7 * 24 * 3600 * 1000;

/// The key of the callback's arguments that receives the members' outcomes.
pub const RESULTS: &str = "results";

/// A chord's start: published to `P.chords` with the chord id as
/// `message_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    /// How many members it has, `1..=MAX_MEMBERS`; they carry indexes
    /// `0..size`.
    pub size: usize,
    /// What runs once all are final (its `after` is ignored; `pass_result`
    /// false leaves `results` out of its arguments).
    pub callback: Step,
}

fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "{what} is {} bytes, the limit is {MAX_ID_BYTES}",
            id.len()
        ));
    }
    Ok(())
}

impl Start {
    /// Encodes a start message body.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a start always serializes")
    }

    /// Reads the start of chord `id` (its `message_id`) from its body,
    /// within the bounds; the error says why it is refused.
    pub fn parse(id: Option<&str>, body: &[u8]) -> Result<Start, String> {
        let id = id.ok_or("a chord start needs its chord id as message_id")?;
        check_id("the chord id", id)?;
        if body.len() > MAX_START_BYTES {
            return Err(format!(
                "the chord start is {} bytes, the limit is {MAX_START_BYTES}",
                body.len()
            ));
        }
        let text = std::str::from_utf8(body).map_err(|_| "the chord start is not UTF-8")?;
        let depth = crate::workflow::json_depth(text);
        if depth > MAX_START_DEPTH {
            return Err(format!(
                "the chord start is nested {depth} deep, the limit is {MAX_START_DEPTH}"
            ));
        }
        let start: Start =
            serde_json::from_str(text).map_err(|e| format!("the chord start: {e}"))?;
        start.check()?;
        Ok(start)
    }

    /// Checks the bounds of a start as a producer would send it.
    pub fn check(&self) -> Result<(), String> {
        if self.size == 0 || self.size > MAX_MEMBERS {
            return Err(format!(
                "the chord has {} members, it must have 1..={MAX_MEMBERS}",
                self.size
            ));
        }
        self.callback
            .check_as("the callback")
            .map_err(|e| e.to_string())
    }
}

/// The id of chord `chord_id`'s callback: its step's `id`, else
/// `<chord id>.callback`.
pub fn callback_id(chord_id: &str, callback: &Step) -> String {
    callback
        .id
        .clone()
        .unwrap_or_else(|| format!("{chord_id}.callback"))
}

/// A task's place in a chord, read from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The chord id.
    pub chord_id: String,
    /// Its position, `0..MAX_MEMBERS`.
    pub index: usize,
}

fn invalid(message: impl Into<String>) -> InvalidTask {
    InvalidTask::new("bad_workflow", message)
}

impl Member {
    /// Reads [`CHORD`] and [`INDEX`]: `None` when the task carries neither,
    /// an error (`bad_workflow`) when one is missing or malformed.
    pub fn from_headers(h: Option<&FieldTable>) -> Result<Option<Member>, InvalidTask> {
        let chord = match h.and_then(|h| h.inner().get(CHORD)) {
            None => None,
            Some(AMQPValue::LongString(s)) => Some(
                String::from_utf8(s.as_bytes().to_vec())
                    .map_err(|_| invalid(format!("header {CHORD} is not UTF-8")))?,
            ),
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            Some(_) => return Err(invalid(format!("header {CHORD} must be a string"))),
        };
        let index = headers::get_int(h, INDEX).map_err(|e| invalid(e.to_string()))?;
        match (chord, index) {
            (None, None) => Ok(None),
            (Some(chord_id), Some(index)) => {
                check_id(&format!("header {CHORD}"), &chord_id).map_err(invalid)?;
                if !(0..MAX_MEMBERS as i64).contains(&index) {
                    return Err(invalid(format!(
                        "header {INDEX} must be 0..{MAX_MEMBERS}, not {index}"
                    )));
                }
                Ok(Some(Member {
                    chord_id,
                    index: index as usize,
                }))
            }
            (Some(_), None) => Err(invalid(format!("a chord member needs header {INDEX}"))),
            (None, Some(_)) => Err(invalid(format!("header {INDEX} needs header {CHORD}"))),
        }
    }
}

/// The final state of a member, as the callback sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Final {
    /// It succeeded: `result` holds its result.
    Succeeded,
    /// It ended dead: `reason` and `error` say why.
    Dead,
    /// It was cancelled.
    Cancelled,
}

/// A member's outcome, as published to `P.chord.<id>` and as each entry of
/// the callback's `results` (without `index` there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Its position in the chord.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Its task id.
    pub task_id: String,
    /// How it ended.
    pub state: Final,
    /// Its result (succeeded), capped at [`MAX_RESULT_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Its dead reason or cancel reason (cut at [`MAX_REASON_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its error (`kind`, `code`, `message`), for a dead member that had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `value` within [`MAX_RESULT_BYTES`] of JSON text, or a marker saying how
/// long it was.
pub fn cap(value: Value) -> Value {
    let len = serde_json::to_string(&value).map_or(0, |t| t.len());
    if len <= MAX_RESULT_BYTES {
        value
    } else {
        serde_json::json!({"truncated": true, "bytes": len})
    }
}

impl Outcome {
    /// The outcome of member `m`, task `task_id`, ending in `state` with
    /// `result` (succeeded) or `reason` and `error` (dead, cancelled); the
    /// result and error are capped.
    pub fn new(
        m: &Member,
        task_id: &str,
        state: Final,
        result: Option<Value>,
        reason: Option<String>,
        error: Option<Value>,
    ) -> Outcome {
        Outcome {
            index: Some(m.index),
            task_id: task_id.to_owned(),
            state,
            result: result.map(cap),
            reason,
            error: error.filter(|e| !e.is_null()).map(cap),
        }
    }

    /// Its message body.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an outcome always serializes")
    }
}

/// What [`Fold::add`] did with an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A member not seen before.
    New,
    /// A member already in (an outcome delivered twice): dropped.
    Duplicate,
    /// Not an outcome of this chord (malformed, or an index past its size):
    /// dropped, with the reason logged.
    Refused,
}

/// The members' outcomes of one chord, as they arrive.
#[derive(Debug)]
pub struct Fold {
    entries: Vec<Option<Outcome>>,
    count: usize,
}

impl Fold {
    /// An empty fold for a chord of `size` members.
    pub fn new(size: usize) -> Fold {
        Fold {
            entries: vec![None; size],
            count: 0,
        }
    }

    /// Adds one outcome message body.
    pub fn add(&mut self, body: &[u8]) -> Added {
        let Ok(mut o) = serde_json::from_slice::<Outcome>(body) else {
            return Added::Refused;
        };
        let Some(slot) = o.index.take().and_then(|i| self.entries.get_mut(i)) else {
            return Added::Refused;
        };
        if slot.is_some() {
            return Added::Duplicate;
        }
        o.result = o.result.map(cap);
        o.error = o.error.map(cap);
        o.reason = o.reason.map(|r| cut(&r, MAX_REASON_BYTES).to_owned());
        if o.task_id.len() > MAX_TASK_ID_BYTES {
            o.task_id = cut(&o.task_id, MAX_TASK_ID_BYTES).to_owned();
        }
        *slot = Some(o);
        self.count += 1;
        Added::New
    }

    /// How many distinct members are in.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether every member is in.
    pub fn is_complete(&self) -> bool {
        self.count == self.entries.len()
    }

    /// The callback of chord `chord_id`, its arguments completed with
    /// `results`: the outcomes in member order. Call once complete.
    pub fn callback(&self, chord_id: &str, start: &Start) -> NextTask {
        let s = &start.callback;
        let mut args = s.args.as_object().cloned().unwrap_or_default();
        if s.pass_result {
            let results: Vec<Value> = self
                .entries
                .iter()
                .map(|o| serde_json::to_value(o).unwrap_or(Value::Null))
                .collect();
            args.insert(RESULTS.to_owned(), Value::Array(results));
        }
        let mut h = FieldTable::default();
        headers::set_str(&mut h, WORKFLOW, chord_id);
        headers::set_str(&mut h, PARENT, chord_id);
        if let Some(n) = s.max_retries {
            headers::set_int(&mut h, headers::MAX_RETRIES, n.min(i64::MAX as u64) as i64);
        }
        if let Some(ms) = s.timeout_ms {
            headers::set_int(&mut h, headers::TIMEOUT_MS, ms.min(i64::MAX as u64) as i64);
        }
        NextTask {
            id: callback_id(chord_id, s),
            task_type: s.task_type.clone(),
            body: serde_json::to_vec(&Value::Object(args)).unwrap_or_else(|_| b"{}".to_vec()),
            priority: s.priority,
            headers: h,
        }
    }
}

/// The headers that make a task member `index` of chord `chord_id` (and of
/// its workflow).
pub fn member_headers(h: &mut FieldTable, chord_id: &str, index: usize) {
    headers::set_str(h, WORKFLOW, chord_id);
    headers::set_str(h, CHORD, chord_id);
    headers::set_int(h, INDEX, index as i64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn member(i: usize) -> Member {
        Member {
            chord_id: "c".into(),
            index: i,
        }
    }

    #[test]
    fn a_fold_keeps_member_order_and_drops_duplicates() {
        let start = Start::parse(
            Some("c"),
            br#"{"size":3,"callback":{"type":"diag.echo","args":{"k":1}}}"#,
        )
        .unwrap();
        let mut f = Fold::new(start.size);
        let ok = |i, r| {
            Outcome::new(
                &member(i),
                &format!("m{i}"),
                Final::Succeeded,
                Some(r),
                None,
                None,
            )
        };
        assert_eq!(f.add(&ok(2, json!(20)).encode()), Added::New);
        assert_eq!(f.add(&ok(2, json!(21)).encode()), Added::Duplicate);
        assert_eq!(f.add(b"{oops"), Added::Refused);
        assert_eq!(f.add(&ok(7, json!(1)).encode()), Added::Refused);
        let dead = Outcome::new(
            &member(1),
            "m1",
            Final::Dead,
            None,
            Some("permanent_failure".into()),
            Some(json!({"code": "boom"})),
        );
        assert_eq!(f.add(&dead.encode()), Added::New);
        assert!(!f.is_complete());
        let big = json!("x".repeat(5000));
        assert_eq!(f.add(&ok(0, big).encode()), Added::New);
        assert!(f.is_complete());
        let cb = f.callback("c", &start);
        assert_eq!(cb.id, "c.callback");
        let body: Value = serde_json::from_slice(&cb.body).unwrap();
        assert_eq!(body["k"], 1);
        let r = body["results"].as_array().unwrap();
        assert_eq!(r[0]["result"]["truncated"], true);
        assert_eq!(r[1]["state"], "dead");
        assert_eq!(r[1]["error"]["code"], "boom");
        assert_eq!(
            r[2],
            json!({"task_id": "m2", "state": "succeeded", "result": 20})
        );
    }

    #[test]
    fn the_largest_callback_fits_a_worker_default_body_limit() {
        let start = Start {
            size: MAX_MEMBERS,
            callback: Step::new("a.b", json!({})),
        };
        let mut f = Fold::new(MAX_MEMBERS);
        let (long_id, big) = ("i".repeat(400), json!("e".repeat(510)));
        for i in 0..MAX_MEMBERS {
            let m = member(i);
            let o = if i % 2 == 0 {
                Outcome::new(
                    &m,
                    &long_id,
                    Final::Succeeded,
                    Some(json!("r".repeat(510))),
                    None,
                    None,
                )
            } else {
                let mut o =
                    Outcome::new(&m, &long_id, Final::Dead, None, Some("x".repeat(500)), None);
                o.error = Some(big.clone());
                o
            };
            assert_eq!(f.add(&o.encode()), Added::New);
        }
        let body = f.callback("c", &start).body;
        assert!(body.len() < 9_000_000, "{} bytes", body.len());
        assert!(body.len() < 10 * 1024 * 1024);
    }

    #[test]
    fn hostile_starts_are_refused_with_their_reason() {
        let refuse = |id: Option<&str>, body: &str| Start::parse(id, body.as_bytes()).unwrap_err();
        let cb = r#""callback":{"type":"a.b"}"#;
        assert!(refuse(Some("c"), &format!(r#"{{"size":1000000,{cb}}}"#)).contains("members"));
        assert!(refuse(Some("c"), &format!(r#"{{"size":0,{cb}}}"#)).contains("members"));
        assert!(refuse(None, &format!(r#"{{"size":1,{cb}}}"#)).contains("message_id"));
        assert!(refuse(Some(&"i".repeat(300)), "{}").contains("300 bytes"));
        assert!(refuse(Some("c"), "{nope").contains("chord start"));
        assert!(refuse(Some("c"), r#"{"size":1,"callback":{"type":"a b"}}"#).contains("callback"));
        assert!(refuse(Some("c"), &format!(r#"{{"size":1,{cb},"x":1}}"#)).contains("x"));
        let deep = format!(
            r#"{{"size":1,"callback":{{"type":"a.b","args":{{"x":{}1{}}}}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(refuse(Some("c"), &deep).contains("nested"));
        let huge = format!(
            r#"{{"size":1,"callback":{{"type":"a.b","args":{{"x":"{}"}}}}}}"#,
            "y".repeat(70_000)
        );
        assert!(refuse(Some("c"), &huge).contains("bytes"));
    }

    #[test]
    fn member_headers_are_read_back_and_bad_ones_refused() {
        let mut h = FieldTable::default();
        member_headers(&mut h, "c", 4);
        assert_eq!(
            Member::from_headers(Some(&h)).unwrap(),
            Some(Member {
                chord_id: "c".into(),
                index: 4
            })
        );
        assert_eq!(Member::from_headers(None).unwrap(), None);
        let mut h = FieldTable::default();
        headers::set_str(&mut h, CHORD, "c");
        assert!(Member::from_headers(Some(&h))
            .unwrap_err()
            .message
            .contains(INDEX));
        headers::set_int(&mut h, INDEX, 10_000);
        assert!(Member::from_headers(Some(&h))
            .unwrap_err()
            .message
            .contains("0..10000"));
    }
}
