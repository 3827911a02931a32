//! Status events published to `P.events` (contract section 4).

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The state a status event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// The task was published and waits in a work queue. No process
    /// publishes it on `P.events`: the tracker records it from the copy it
    /// reads in `P.tracker.published`.
    Queued,
    /// A delayed task or a retry was accepted by the scheduler.
    Scheduled,
    /// A handler began an attempt.
    Started,
    /// The handler returned a result (final).
    Succeeded,
    /// An attempt failed.
    Failed,
    /// The task was parked in `P.dead` (final).
    Dead,
    /// A cancel command reached the task (final).
    Cancelled,
    /// A running handler reported how far it got (at most once a second).
    Progress,
    /// Dropped unrun: another task with its unique key came first (final;
    /// `duplicate_of` names that task).
    Duplicate,
}

impl TaskState {
    /// The lowercase word used in routing keys and bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Scheduled => "scheduled",
            TaskState::Started => "started",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Dead => "dead",
            TaskState::Cancelled => "cancelled",
            TaskState::Progress => "progress",
            TaskState::Duplicate => "duplicate",
        }
    }

    /// Whether this is a task's last event.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Dead | TaskState::Cancelled | TaskState::Duplicate
        )
    }
}

/// Whether a failure may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// Timeouts, connection errors, HTTP 5xx and 429: worth another attempt.
    Retryable,
    /// Invalid arguments, HTTP 4xx: another attempt would fail the same way.
    Permanent,
}

/// The `error` object of an event: `{kind, code, message}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventErrorInfo {
    /// Retryable or permanent.
    pub kind: ErrorKind,
    /// A short machine word: `timeout`, `panic`, `invalid_args`, `http_503`, …
    pub code: String,
    /// Human text.
    pub message: String,
}

/// The `progress` object of a `progress` event: `{bytes, total}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressInfo {
    /// Units done so far (bytes for transfers).
    pub bytes: u64,
    /// Units in all, when known.
    pub total: Option<u64>,
}

/// One status event, with every key of the contract's example present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique event id; also the AMQP `message_id`.
    pub event_id: String,
    /// The task's id.
    pub task_id: String,
    /// The task type.
    #[serde(rename = "type")]
    pub task_type: String,
    /// The state this event reports.
    pub state: TaskState,
    /// The attempt the event concerns (0 if none started).
    pub attempt: i64,
    /// Short queue name (`io`), if known.
    pub queue: Option<String>,
    /// `host/pid` of the emitting process.
    pub worker: Option<String>,
    /// When the event happened, RFC 3339 with milliseconds, UTC.
    pub at: String,
    /// How long the attempt ran (succeeded, failed).
    pub duration_ms: Option<u64>,
    /// The handler's result (succeeded), capped in size.
    pub result: Option<Value>,
    /// What went wrong (failed, dead).
    pub error: Option<EventErrorInfo>,
    /// Why the task ended dead or cancelled.
    pub reason: Option<String>,
    /// When a scheduled task is due.
    pub due_at: Option<String>,
    /// On `failed` only: whether another attempt will follow.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry: Option<bool>,
    /// On `progress` only: how far the running attempt got.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub progress: Option<ProgressInfo>,
    /// On tasks of a workflow only: the workflow's id (header
    /// `x-warren-workflow`, or the id of a chain's first task).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workflow_id: Option<String>,
    /// On tasks of a workflow only: the id of the task whose outcome
    /// published this one (header `x-warren-parent`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parent_id: Option<String>,
    /// On `duplicate` only: the id of the task holding the unique key.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duplicate_of: Option<String>,
}

/// An event body that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid event body: {0}")]
pub struct EventError(#[from] serde_json::Error);

/// Formats a time as the contract writes it: `2026-11-24T10:00:00.123Z`.
pub fn format_time(t: DateTime<Utc>) -> String {
    let (year, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        // Years of other than four digits, leap seconds: chrono's way.
        return t.to_rfc3339_opts(SecondsFormat::Millis, true);
    }
    // Written digit by digit: this runs for every event, and chrono's
    // general formatter costs several times as much.
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 3, nanos / 1_000_000);
    String::from_utf8(b.to_vec()).expect("ASCII digits")
}

/// A fresh, time-ordered id (UUID v7) for tasks and events.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Stands for the task type in the routing key of an event whose type is too
/// long to route.
pub const TYPE_TOO_LONG_KEY: &str = "_type_too_long";

impl Event {
    /// A new event for a task, stamped now, with every optional field empty.
    pub fn new(task_id: &str, task_type: &str, state: TaskState, attempt: i64) -> Self {
        Event {
            event_id: new_id(),
            task_id: task_id.to_owned(),
            task_type: task_type.to_owned(),
            state,
            attempt,
            queue: None,
            worker: None,
            at: format_time(Utc::now()),
            duration_ms: None,
            result: None,
            error: None,
            reason: None,
            due_at: None,
            retry: None,
            progress: None,
            workflow_id: None,
            parent_id: None,
            duplicate_of: None,
        }
    }

    /// The routing key on `P.events`: `<state>.<task type>`, or
    /// `<state>._type_too_long` for a type over
    /// [`MAX_TYPE_BYTES`](crate::routes::MAX_TYPE_BYTES), whose key would
    /// not fit AMQP's 255 bytes (the body still names the type).
    pub fn routing_key(&self) -> String {
        let t = if self.task_type.len() > crate::routes::MAX_TYPE_BYTES {
            TYPE_TOO_LONG_KEY
        } else {
            self.task_type.as_str()
        };
        let state = self.state.as_str();
        let mut key = String::with_capacity(state.len() + 1 + t.len());
        key.push_str(state);
        key.push('.');
        key.push_str(t);
        key
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Room for a typical event at once (about 400 bytes with a small
        // result): grown from empty, the buffer would be reallocated and
        // copied seven times per event.
        let mut out = Vec::with_capacity(512);
        serde_json::to_writer(&mut out, self).expect("an event always serializes");
        out
    }

    /// Reads an event body.
    pub fn from_json(body: &[u8]) -> Result<Self, EventError> {
        Ok(serde_json::from_slice(body)?)
    }
}

/// Caps a result at `max_bytes` of JSON; a larger one becomes
/// `{"truncated": true, "bytes": N, "preview": "<first 1 KiB as text>"}`.
pub fn cap_result(result: Value, max_bytes: usize) -> Value {
    // Measured without keeping the text: most results fit, and are then
    // written once, in their event.
    let mut counted = Counted(0);
    serde_json::to_writer(&mut counted, &result).expect("counting never fails");
    if counted.0 <= max_bytes {
        return result;
    }
    let text = serde_json::to_string(&result).expect("a JSON value always serializes");
    let mut end = text.len().min(1024);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    serde_json::json!({"truncated": true, "bytes": text.len(), "preview": &text[..end]})
}

/// A writer that only counts the bytes written to it.
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CONTRACT_KEYS: [&str; 13] = [
        "event_id",
        "task_id",
        "type",
        "state",
        "attempt",
        "queue",
        "worker",
        "at",
        "duration_ms",
        "result",
        "error",
        "reason",
        "due_at",
    ];

    #[test]
    fn every_contract_key_is_present_even_when_null() {
        let e = Event::new("t1", "diag.echo", TaskState::Started, 1);
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        let obj = v.as_object().unwrap();
        for k in CONTRACT_KEYS {
            assert!(obj.contains_key(k), "missing key {k}");
        }
        assert_eq!(obj["state"], "started");
        assert_eq!(obj["type"], "diag.echo");
        assert!(obj["result"].is_null());
        assert!(!obj.contains_key("retry"), "retry is only on failed events");
        assert!(
            !obj.contains_key("progress"),
            "progress is only on progress events"
        );
    }

    #[test]
    fn progress_events_carry_bytes_and_total() {
        let mut e = Event::new("t1", "file.download", TaskState::Progress, 1);
        e.progress = Some(ProgressInfo {
            bytes: 10,
            total: None,
        });
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        for k in CONTRACT_KEYS {
            assert!(v.as_object().unwrap().contains_key(k), "missing key {k}");
        }
        assert_eq!(v["state"], "progress");
        assert_eq!(v["progress"], json!({"bytes": 10, "total": null}));
        assert_eq!(e.routing_key(), "progress.file.download");
        assert!(!TaskState::Progress.is_final());
        assert_eq!(Event::from_json(&e.to_json()).unwrap(), e);
    }

    /// Every process that forwards an event (the tracker stores what it
    /// decoded, re-encoded) must keep a handler's numbers to the last bit:
    /// serde_json's default float parser is off by one bit for some of them
    /// (found by fuzzing).
    #[test]
    fn results_keep_every_float_exactly_through_decode_and_encode() {
        let mut e = Event::new("t1", "diag.echo", TaskState::Succeeded, 1);
        for x in [-3.777777777777785e69, 1.1112222222222222e18, 2.5, 1e-300] {
            e.result = Some(json!({ "n": x }));
            let again = Event::from_json(&e.to_json()).unwrap();
            assert_eq!(again.result.unwrap()["n"].as_f64(), Some(x), "{x:e}");
        }
        let text = br#"{"n":-377777777777777777777777777777777777777777777777777777777777777e7}"#;
        let v: Value = serde_json::from_slice(text).unwrap();
        let once = serde_json::to_vec(&v).unwrap();
        let twice = serde_json::to_vec(&serde_json::from_slice::<Value>(&once).unwrap()).unwrap();
        assert_eq!(once, twice, "re-encoding is stable");
    }

    #[test]
    fn failed_events_carry_retry_and_error() {
        let mut e = Event::new("t1", "diag.fail", TaskState::Failed, 2);
        e.retry = Some(false);
        e.error = Some(EventErrorInfo {
            kind: ErrorKind::Retryable,
            code: "timeout".into(),
            message: "took too long".into(),
        });
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["retry"], false);
        assert_eq!(
            v["error"],
            json!({"kind": "retryable", "code": "timeout", "message": "took too long"})
        );
        assert_eq!(e.routing_key(), "failed.diag.fail");
        assert_eq!(Event::from_json(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn every_routing_key_fits_amqp_whatever_the_type() {
        let longest = "t".repeat(crate::routes::MAX_TYPE_BYTES);
        let e = Event::new("id", &longest, TaskState::Cancelled, 0);
        assert_eq!(e.routing_key(), format!("cancelled.{longest}"));
        assert!(e.routing_key().len() <= 255);
        let hostile = "t".repeat(255);
        for state in [TaskState::Scheduled, TaskState::Succeeded, TaskState::Dead] {
            let e = Event::new("id", &hostile, state, 0);
            assert_eq!(
                e.routing_key(),
                format!("{}._type_too_long", state.as_str())
            );
        }
    }

    #[test]
    fn time_format_is_rfc3339_millis_utc() {
        let t = DateTime::parse_from_rfc3339("2026-11-24T10:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_time(t), "2026-11-24T10:00:00.123Z");
    }

    #[test]
    fn format_time_writes_what_chrono_writes() {
        use chrono::TimeZone;
        // From year 0 to 9999 in uneven steps (every month, day and time of
        // day comes up), and the edges of the four-digit years.
        let (first, last) = (-62_167_219_200_000i64, 253_402_300_799_999i64);
        let mut ms = first;
        while ms <= last {
            let t = Utc.timestamp_millis_opt(ms).unwrap();
            assert_eq!(
                format_time(t),
                t.to_rfc3339_opts(SecondsFormat::Millis, true)
            );
            ms += 7_777_777_777_777 / 1000 + 13;
        }
        for ms in [first, first - 1, last, last + 1, 0, 1_764_000_000_123] {
            let t = Utc.timestamp_millis_opt(ms).unwrap();
            assert_eq!(
                format_time(t),
                t.to_rfc3339_opts(SecondsFormat::Millis, true)
            );
        }
    }

    #[test]
    fn large_results_are_truncated_and_say_so() {
        let small = json!({"a": 1});
        assert_eq!(cap_result(small.clone(), 100), small);
        let big = json!({"data": "é".repeat(5000)});
        let capped = cap_result(big, 2000);
        assert_eq!(capped["truncated"], true);
        assert!(capped["bytes"].as_u64().unwrap() > 10_000);
        assert!(capped["preview"].as_str().unwrap().len() <= 1024);
    }

    #[test]
    fn final_states() {
        assert!(TaskState::Succeeded.is_final());
        assert!(TaskState::Dead.is_final());
        assert!(TaskState::Cancelled.is_final());
        assert!(TaskState::Duplicate.is_final());
        assert!(!TaskState::Failed.is_final());
    }
}
