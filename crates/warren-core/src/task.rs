//! Reading a task from a delivered message, and why a task can end dead.

use amq_protocol_types::FieldTable;
use serde_json::Value;

use crate::headers::{self, HeaderError};

/// Why a task was parked in `P.dead` (the `x-warren-dead-reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// A retryable failure with no retries left.
    RetriesExhausted,
    /// A permanent failure.
    PermanentFailure,
    /// The message could not be read as a task.
    Invalid,
    /// It expired before it started.
    Expired,
    /// It was redelivered too often without an outcome.
    Poison,
}

impl DeadReason {
    /// The word used in headers and events.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::RetriesExhausted => "retries_exhausted",
            DeadReason::PermanentFailure => "permanent_failure",
            DeadReason::Invalid => "invalid",
            DeadReason::Expired => "expired",
            DeadReason::Poison => "poison",
        }
    }
}

/// The AMQP properties of a delivered message that Warren reads, detached
/// from any client library.
#[derive(Debug, Clone, Default)]
pub struct MessageMeta {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// `content_type` property.
    pub content_type: Option<String>,
    /// `content_encoding` property.
    pub content_encoding: Option<String>,
    /// `message_id` property.
    pub message_id: Option<String>,
    /// AMQP `type` property.
    pub type_: Option<String>,
    /// Headers table.
    pub headers: Option<FieldTable>,
    /// `reply_to` property.
    pub reply_to: Option<String>,
    /// `correlation_id` property.
    pub correlation_id: Option<String>,
    /// `priority` property.
    pub priority: Option<u8>,
}

/// A message that is not a valid task; it is parked dead with reason `invalid`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid task ({code}): {message}")]
pub struct InvalidTask {
    /// Short machine word: `content_type`, `content_encoding`, `too_large`,
    /// `not_json`, `bad_header`, `bad_type`, `type_too_long`, `no_handler`,
    /// `headers_too_large`, `headers_too_deep`, `bad_workflow` (contract
    /// section 8).
    pub code: &'static str,
    /// What exactly is wrong.
    pub message: String,
}

impl InvalidTask {
    /// A new invalid-task error.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A task whose headers are over [`headers::MAX_HEADER_BYTES`] or nested
/// deeper than [`headers::MAX_HEADER_DEPTH`] is invalid (`headers_too_large`,
/// `headers_too_deep`): checked before anything re-publishes it.
pub fn check_headers(h: Option<&FieldTable>) -> Result<(), InvalidTask> {
    let Some(s) = headers::unfit(h) else {
        return Ok(());
    };
    Err(if s.bytes > headers::MAX_HEADER_BYTES {
        InvalidTask::new(
            "headers_too_large",
            format!(
                "headers are {} bytes, the limit is {}",
                s.bytes,
                headers::MAX_HEADER_BYTES
            ),
        )
    } else {
        InvalidTask::new(
            "headers_too_deep",
            format!(
                "headers are nested {} deep, the limit is {}",
                s.depth,
                headers::MAX_HEADER_DEPTH
            ),
        )
    })
}

impl From<HeaderError> for InvalidTask {
    fn from(e: HeaderError) -> Self {
        InvalidTask::new("bad_header", e.to_string())
    }
}

/// A task read from a message: what a handler and the runtime need.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEnvelope {
    /// The task id (`message_id`).
    pub id: String,
    /// The task type.
    pub task_type: String,
    /// The arguments: any JSON value.
    pub args: Value,
    /// Which attempt this is (1 on first execution).
    pub attempt: i64,
    /// Producer override of the retry policy.
    pub max_retries: Option<u64>,
    /// Producer override of the time limit.
    pub timeout_ms: Option<u64>,
}

/// The task type: the routing key when the message came through one of the
/// exchanges that route by type (`P.tasks`, `P.unroutable`), else the AMQP
/// `type` property, else the routing key.
pub fn task_type_of(meta: &MessageMeta, routing_exchanges: &[&str]) -> String {
    if routing_exchanges.contains(&meta.exchange.as_str()) {
        return meta.routing_key.clone();
    }
    meta.type_
        .clone()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| meta.routing_key.clone())
}

/// Whether the content type is JSON: absent, or `application/json` compared
/// case-insensitively with parameters ignored.
pub fn is_json_content_type(ct: Option<&str>) -> bool {
    match ct {
        None => true,
        Some(ct) => ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/json"),
    }
}

impl TaskEnvelope {
    /// Reads a task. `task_type` comes from [`task_type_of`]; `id` is the
    /// message id (the caller assigns one first when it is missing).
    pub fn parse(
        meta: &MessageMeta,
        task_type: &str,
        id: &str,
        body: &[u8],
        max_body_bytes: usize,
    ) -> Result<TaskEnvelope, InvalidTask> {
        if !is_json_content_type(meta.content_type.as_deref()) {
            return Err(InvalidTask::new(
                "content_type",
                format!(
                    "content_type {:?} is not application/json",
                    meta.content_type.as_deref().unwrap_or_default()
                ),
            ));
        }
        if let Some(enc) = meta.content_encoding.as_deref() {
            if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
                return Err(InvalidTask::new(
                    "content_encoding",
                    format!("content_encoding {enc:?} is not supported (send plain JSON)"),
                ));
            }
        }
        if body.len() > max_body_bytes {
            return Err(InvalidTask::new(
                "too_large",
                format!(
                    "body is {} bytes, the limit is {max_body_bytes} (limits.max_body_bytes)",
                    body.len()
                ),
            ));
        }
        if task_type.len() > crate::routes::MAX_TYPE_BYTES {
            return Err(InvalidTask::new(
                "type_too_long",
                format!(
                    "task type is {} bytes, the limit is {}",
                    task_type.len(),
                    crate::routes::MAX_TYPE_BYTES
                ),
            ));
        }
        if !crate::routes::is_valid_task_type(task_type) {
            return Err(InvalidTask::new(
                "bad_type",
                format!("task type {task_type:?} is not dot-separated words"),
            ));
        }
        let args: Value = serde_json::from_slice(body)
            .map_err(|e| InvalidTask::new("not_json", format!("body is not JSON: {e}")))?;
        let headers = meta.headers.as_ref();
        let attempt = if headers::get_flag(headers, headers::REPUBLISHED) {
            match headers::get_int(headers, headers::ATTEMPT)? {
                Some(a) if a >= 1 => a,
                Some(a) => {
                    return Err(InvalidTask::new(
                        "bad_header",
                        format!("header x-warren-attempt: {a} is below 1"),
                    ))
                }
                None => 1,
            }
        } else {
            1
        };
        Ok(TaskEnvelope {
            id: id.to_owned(),
            task_type: task_type.to_owned(),
            args,
            attempt,
            max_retries: headers::get_non_negative(headers, headers::MAX_RETRIES)?,
            timeout_ms: headers::get_non_negative(headers, headers::TIMEOUT_MS)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::{AMQPValue, LongString};

    fn meta() -> MessageMeta {
        MessageMeta {
            exchange: "w.tasks".into(),
            routing_key: "diag.echo".into(),
            ..Default::default()
        }
    }

    fn parse(m: &MessageMeta, body: &[u8]) -> Result<TaskEnvelope, InvalidTask> {
        TaskEnvelope::parse(m, "diag.echo", "id-1", body, 100)
    }

    #[test]
    fn content_types() {
        assert!(is_json_content_type(None));
        assert!(is_json_content_type(Some("application/json")));
        assert!(is_json_content_type(Some(
            "Application/JSON; charset=utf-8"
        )));
        assert!(!is_json_content_type(Some("text/plain")));
        assert!(!is_json_content_type(Some("")));
        let mut m = meta();
        m.content_type = Some("text/plain".into());
        assert_eq!(parse(&m, b"{}").unwrap_err().code, "content_type");
    }

    #[test]
    fn encodings_sizes_and_json() {
        let mut m = meta();
        m.content_encoding = Some("gzip".into());
        assert_eq!(parse(&m, b"{}").unwrap_err().code, "content_encoding");
        m.content_encoding = Some("IDENTITY".into());
        assert!(parse(&m, b"{}").is_ok());
        let m = meta();
        assert_eq!(parse(&m, &[b' '; 101]).unwrap_err().code, "too_large");
        assert_eq!(parse(&m, b"{not json").unwrap_err().code, "not_json");
        assert_eq!(parse(&m, b"\xff\xfe").unwrap_err().code, "not_json");
        // Any JSON value is valid arguments.
        assert_eq!(parse(&m, b"[1,2]").unwrap().args, serde_json::json!([1, 2]));
    }

    #[test]
    fn producer_set_attempt_is_ignored_until_republished() {
        let mut m = meta();
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongInt(7));
        m.headers = Some(h.clone());
        assert_eq!(parse(&m, b"{}").unwrap().attempt, 1);
        headers::set_flag(&mut h, headers::REPUBLISHED);
        m.headers = Some(h);
        assert_eq!(parse(&m, b"{}").unwrap().attempt, 7);
    }

    #[test]
    fn hostile_override_headers_make_the_task_invalid() {
        let mut m = meta();
        let mut h = FieldTable::default();
        h.insert(
            headers::MAX_RETRIES.into(),
            AMQPValue::LongString(LongString::from("three")),
        );
        m.headers = Some(h);
        let e = parse(&m, b"{}").unwrap_err();
        assert_eq!(e.code, "bad_header");
        assert!(e.message.contains("x-warren-max-retries"), "{e}");
        let mut h = FieldTable::default();
        h.insert(
            headers::TIMEOUT_MS.into(),
            AMQPValue::LongString("250".into()),
        );
        m.headers = Some(h);
        assert_eq!(parse(&m, b"{}").unwrap().timeout_ms, Some(250));
    }

    #[test]
    fn task_type_comes_from_the_routing_key_on_routing_exchanges() {
        let mut m = meta();
        m.type_ = Some("forged.type".into());
        assert_eq!(task_type_of(&m, &["w.tasks"]), "diag.echo");
        m.exchange = String::new();
        m.routing_key = "w.q.diag".into();
        assert_eq!(task_type_of(&m, &["w.tasks"]), "forged.type");
        m.type_ = None;
        assert_eq!(task_type_of(&m, &["w.tasks"]), "w.q.diag");
    }

    #[test]
    fn dead_reason_words() {
        assert_eq!(DeadReason::RetriesExhausted.as_str(), "retries_exhausted");
        assert_eq!(DeadReason::Poison.as_str(), "poison");
    }
}
