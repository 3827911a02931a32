use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use serde_json::Value;
use warren_core::event::new_id;

use crate::ClientError;

/// One task to publish: its type, JSON arguments and optional properties.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    /// Task type, the routing key on `P.tasks` (e.g. `diag.echo`).
    pub task_type: String,
    /// Arguments as JSON.
    pub args: Value,
    /// Task id; a UUID v7 is assigned when `None`.
    pub id: Option<String>,
    /// 0..=9, higher first.
    pub priority: Option<u8>,
    /// Per-message TTL in milliseconds.
    pub expiration_ms: Option<u64>,
    /// Extra headers (e.g. `x-warren-max-retries`).
    pub headers: FieldTable,
    /// Run no earlier than this many ms from now (published to `P.delay`
    /// with `x-delay`).
    pub delay_ms: Option<i64>,
    /// Run no earlier than this time, RFC 3339 or Unix ms (published to
    /// `P.delay` with `x-warren-eta`; wins over `delay_ms`).
    pub eta: Option<String>,
}

impl TaskRequest {
    /// A task of `task_type` with `args`, nothing else set.
    pub fn new(task_type: impl Into<String>, args: Value) -> Self {
        Self {
            task_type: task_type.into(),
            args,
            id: None,
            priority: None,
            expiration_ms: None,
            headers: FieldTable::default(),
            delay_ms: None,
            eta: None,
        }
    }

    /// Delays the task by `ms` milliseconds (through `P.delay`).
    pub fn delay_ms(mut self, ms: i64) -> Self {
        self.delay_ms = Some(ms);
        self
    }

    /// Runs the task at `eta` (RFC 3339 or Unix ms, through `P.delay`).
    pub fn eta(mut self, eta: impl Into<String>) -> Self {
        self.eta = Some(eta.into());
        self
    }

    /// Whether the task goes through `P.delay`.
    pub fn is_delayed(&self) -> bool {
        self.delay_ms.is_some() || self.eta.is_some()
    }

    /// The exchange the task is published to: `P.delay` when delayed, else `P.tasks`.
    pub fn exchange(&self, names: &warren_core::Names) -> String {
        if self.is_delayed() {
            names.delay()
        } else {
            names.tasks()
        }
    }

    /// Sets the task id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the priority (0..=9).
    pub fn priority(mut self, p: u8) -> Self {
        self.priority = Some(p);
        self
    }

    /// Sets the per-message TTL.
    pub fn expiration_ms(mut self, ms: u64) -> Self {
        self.expiration_ms = Some(ms);
        self
    }

    /// Adds a header with a string value.
    pub fn header_str(mut self, key: &str, value: &str) -> Self {
        self.headers
            .insert(key.into(), AMQPValue::LongString(value.into()));
        self
    }

    /// Adds a header with an integer value.
    pub fn header_int(mut self, key: &str, value: i64) -> Self {
        self.headers
            .insert(key.into(), AMQPValue::LongLongInt(value));
        self
    }

    /// Checks what the broker or a worker would refuse: the task type, the
    /// priority and the id's length.
    pub(crate) fn check(&self) -> Result<(), ClientError> {
        if !warren_core::routes::is_valid_task_type(&self.task_type) {
            return Err(ClientError::InvalidRequest(format!(
                "task type {:?} must be dot-separated words such as diag.echo",
                self.task_type
            )));
        }
        if let Some(p) = self.priority {
            if p > 9 {
                return Err(ClientError::InvalidRequest(format!(
                    "priority {p} is above 9"
                )));
            }
        }
        if self.id.as_ref().is_some_and(|id| id.len() > 255) {
            return Err(too_long_id());
        }
        Ok(())
    }

    /// Checks the request and fixes its id: returns `(id, body, properties)`.
    pub(crate) fn encode(&self) -> Result<(String, Vec<u8>, BasicProperties), ClientError> {
        self.check()?;
        self.build()
    }

    /// [`encode`](Self::encode) for a request already checked with
    /// [`check`](Self::check).
    pub(crate) fn build(&self) -> Result<(String, Vec<u8>, BasicProperties), ClientError> {
        let id = self.id.clone().unwrap_or_else(new_id);
        let id_short = ShortString::try_new(id.clone()).map_err(|_| too_long_id())?;
        let body = serde_json::to_vec(&self.args).expect("a JSON value always serializes");
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id_short)
            .with_type(self.task_type.as_str().into());
        if let Some(p) = self.priority {
            props = props.with_priority(p);
        }
        if let Some(ms) = self.expiration_ms {
            props = props.with_expiration(ms.to_string().into());
        }
        let mut headers = self.headers.clone();
        if let Some(ms) = self.delay_ms {
            headers.insert(
                warren_core::headers::DELAY.into(),
                AMQPValue::LongLongInt(ms),
            );
        }
        if let Some(eta) = &self.eta {
            let v = match eta.parse::<i64>() {
                Ok(ms) => AMQPValue::LongLongInt(ms),
                Err(_) => AMQPValue::LongString(eta.as_str().into()),
            };
            headers.insert(warren_core::headers::ETA.into(), v);
        }
        if !headers.inner().is_empty() {
            props = props.with_headers(headers);
        }
        Ok((id, body, props))
    }
}

fn too_long_id() -> ClientError {
    ClientError::InvalidRequest("task id is longer than 255 bytes".to_owned())
}
