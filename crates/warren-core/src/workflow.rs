//! Workflows: chains and groups described in a task's headers (contract
//! section 8).
//!
//! A **chain** is a task carrying, in header [`CHAIN`], the steps that run
//! after it: a JSON array of [`Step`]s. When the task succeeds, its worker
//! publishes the first of them ([`Flow::after_success`]), carrying the rest,
//! with the task's result in the `previous` key of its arguments. When it
//! ends dead, the steps that follow are reported `cancelled` up to the first
//! one marked `"after": "always"`, which runs with the failure in
//! `previous_failure` ([`Flow::after_failure`]); when it is cancelled, every
//! step that follows is ([`Flow::after_cancel`]).
//!
//! A **group** is tasks published with the same [`WORKFLOW`] id; the
//! tracker counts their states. Every task of a workflow reports its
//! workflow and parent ids in its events.
//!
//! Everything read here comes from producers and is bounded: a chain of at
//! most [`MAX_CHAIN_STEPS`] steps, [`MAX_CHAIN_BYTES`] of JSON text, nested
//! at most [`MAX_CHAIN_DEPTH`] deep. A description over a bound or
//! malformed makes its task invalid (`bad_workflow`), before it runs.

use amq_protocol_types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::headers;
use crate::task::InvalidTask;

/// The id of the workflow a task belongs to (a string, at most
/// [`MAX_ID_BYTES`]). Set by producers on a group's members or a chain's
/// first task; the system copies it to every step. A chain whose first task
/// has none takes that task's id.
pub const WORKFLOW: &str = "x-warren-workflow";
/// The id of the task whose outcome published this one (set by the system).
pub const PARENT: &str = "x-warren-parent";
/// The steps that run after this task: a JSON array of steps, as a string.
pub const CHAIN: &str = "x-warren-chain";
/// This task's position in its chain, 0 for the first (set by the system).
pub const STEP: &str = "x-warren-step";
/// The id of the chain's first task; steps without an `id` of their own
/// get `<root>.<position>` (set by the system).
pub const ROOT: &str = "x-warren-chain-root";

/// The most steps a chain may carry.
pub const MAX_CHAIN_STEPS: usize = 100;
/// The longest [`CHAIN`] header, in bytes of JSON text.
pub const MAX_CHAIN_BYTES: usize = 32_768;
/// The deepest nesting of arrays and objects in a [`CHAIN`] header (the
/// array of steps and each step's object count).
pub const MAX_CHAIN_DEPTH: usize = 32;
/// The longest workflow id, chain root id or step id, in bytes: room is
/// left for `.<position>` within AMQP's 255-byte `message_id`.
pub const MAX_ID_BYTES: usize = 200;

/// The key of a step's arguments that receives the previous step's result.
pub const PREVIOUS: &str = "previous";
/// The key of an `"after": "always"` step's arguments that receives the
/// failure that stopped the steps before it.
pub const PREVIOUS_FAILURE: &str = "previous_failure";

/// When a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum After {
    /// Only when the step before it succeeded (the default).
    #[default]
    Success,
    /// Also when a step before it ended dead: the chain goes on from it.
    Always,
}

impl After {
    fn is_default(&self) -> bool {
        *self == After::Success
    }
}

/// One step of a chain, as carried in [`CHAIN`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The task type (routing key on `P.tasks`).
    #[serde(rename = "type")]
    pub task_type: String,
    /// Its arguments: a JSON object (default `{}`); `previous` and
    /// `previous_failure` are set by the system.
    #[serde(default = "empty_object", skip_serializing_if = "is_empty_object")]
    pub args: Value,
    /// Its task id; default `<chain root id>.<position>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// AMQP priority, 0..=9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Sets `x-warren-max-retries` on the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u64>,
    /// Sets `x-warren-timeout-ms` on the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// When it runs: `"success"` (default) or `"always"`.
    #[serde(default, skip_serializing_if = "After::is_default")]
    pub after: After,
    /// Whether its arguments receive `previous` (or `previous_failure`):
    /// true by default; false for a handler that refuses unknown keys.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub pass_result: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

fn is_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty)
}

impl Step {
    /// A step of `task_type` with `args`, nothing else set.
    pub fn new(task_type: impl Into<String>, args: Value) -> Self {
        Step {
            task_type: task_type.into(),
            args,
            id: None,
            priority: None,
            max_retries: None,
            timeout_ms: None,
            after: After::Success,
            pass_result: true,
        }
    }

    fn check(&self, n: usize) -> Result<(), String> {
        self.check_as(&format!("step {n}"))
    }

    /// Checks the step, its errors starting with `what`.
    pub(crate) fn check_as(&self, what: &str) -> Result<(), String> {
        if !crate::routes::is_valid_task_type(&self.task_type) {
            return Err(format!(
                "{what}: type {:?} is not dot-separated words of at most {} bytes",
                cut(&self.task_type, 64),
                crate::routes::MAX_TYPE_BYTES
            ));
        }
        if !self.args.is_object() {
            return Err(format!("{what}: args must be a JSON object"));
        }
        if let Some(id) = &self.id {
            check_id(id).map_err(|e| format!("{what}: id {e}"))?;
        }
        if self.priority.is_some_and(|p| p > 9) {
            return Err(format!("{what}: priority must be 0..=9"));
        }
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".into());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "is {} bytes, the limit is {MAX_ID_BYTES}",
            id.len()
        ));
    }
    Ok(())
}

/// Encodes steps as the [`CHAIN`] header's text.
pub fn encode_chain(steps: &[Step]) -> String {
    serde_json::to_string(steps).expect("steps always serialize")
}

/// Checks a chain as a producer would send it: the bounds and each step.
pub fn check_chain(steps: &[Step]) -> Result<(), String> {
    let text = encode_chain(steps);
    parse_chain(&text).map(|_| ())
}

/// Reads the text of a [`CHAIN`] header, within the bounds.
pub fn parse_chain(text: &str) -> Result<Vec<Step>, String> {
    if text.len() > MAX_CHAIN_BYTES {
        return Err(format!(
            "the chain is {} bytes, the limit is {MAX_CHAIN_BYTES}",
            text.len()
        ));
    }
    let depth = json_depth(text);
    if depth > MAX_CHAIN_DEPTH {
        return Err(format!(
            "the chain is nested {depth} deep, the limit is {MAX_CHAIN_DEPTH}"
        ));
    }
    let raw: Value =
        serde_json::from_str(text).map_err(|e| format!("the chain is not JSON: {e}"))?;
    let Value::Array(items) = raw else {
        return Err("the chain must be a JSON array of steps".into());
    };
    if items.len() > MAX_CHAIN_STEPS {
        return Err(format!(
            "the chain has {} steps, the limit is {MAX_CHAIN_STEPS}",
            items.len()
        ));
    }
    let mut steps = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let n = i + 1;
        let step: Step = serde_json::from_value(item).map_err(|e| format!("step {n}: {e}"))?;
        step.check(n)?;
        steps.push(step);
    }
    Ok(steps)
}

/// The nesting depth of arrays and objects in JSON text, counted without
/// parsing (brackets inside strings skipped), so a hostile text costs no
/// stack.
pub(crate) fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A task's place in a workflow, read from its headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    /// The workflow id: [`WORKFLOW`], else the chain's root id.
    pub workflow_id: String,
    /// [`PARENT`], when the system published this task.
    pub parent_id: Option<String>,
    /// Its position in its chain ([`STEP`], 0 when absent).
    pub step: i64,
    /// The id of its chain's first task.
    pub root_id: String,
    /// The steps that follow it.
    pub rest: Vec<Step>,
}

/// A task a workflow publishes next: to `P.tasks` under its type.
#[derive(Debug, Clone, PartialEq)]
pub struct NextTask {
    /// Its id (`message_id`).
    pub id: String,
    /// Its type (routing key and AMQP `type`).
    pub task_type: String,
    /// Its JSON body.
    pub body: Vec<u8>,
    /// Its AMQP priority.
    pub priority: Option<u8>,
    /// Its headers.
    pub headers: FieldTable,
}

/// A step that will not run: reported `cancelled` with `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The id it would have had.
    pub id: String,
    /// Its type.
    pub task_type: String,
    /// Why it does not run (names the step that stopped the chain).
    pub reason: String,
}

/// What follows a task that ended dead or was cancelled.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AfterStop {
    /// Steps reported `cancelled`.
    pub skipped: Vec<Skipped>,
    /// The `"after": "always"` step that runs anyway, if any.
    pub next: Option<NextTask>,
}

fn invalid(message: impl Into<String>) -> InvalidTask {
    InvalidTask::new("bad_workflow", message)
}

fn str_header(h: Option<&FieldTable>, key: &str) -> Result<Option<String>, InvalidTask> {
    match h.and_then(|h| h.inner().get(key)) {
        None => Ok(None),
        Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec())
            .map(Some)
            .map_err(|_| invalid(format!("header {key} is not UTF-8"))),
        Some(AMQPValue::ShortString(s)) => Ok(Some(s.as_str().to_owned())),
        Some(_) => Err(invalid(format!("header {key} must be a string"))),
    }
}

impl Flow {
    /// Reads the workflow headers of task `task_id`: `None` when it carries
    /// neither [`WORKFLOW`] nor [`CHAIN`]; an error (`bad_workflow`) when
    /// either is malformed or over its bounds.
    pub fn from_headers(
        h: Option<&FieldTable>,
        task_id: &str,
    ) -> Result<Option<Flow>, InvalidTask> {
        let workflow = str_header(h, WORKFLOW)?;
        let chain = str_header(h, CHAIN)?;
        if workflow.is_none() && chain.is_none() {
            return Ok(None);
        }
        let rest = match &chain {
            Some(text) => parse_chain(text).map_err(invalid)?,
            None => Vec::new(),
        };
        let root_id = match str_header(h, ROOT)? {
            Some(r) => r,
            None => task_id.to_owned(),
        };
        if !rest.is_empty() {
            check_id(&root_id).map_err(|e| {
                invalid(format!(
                    "a task carrying a chain needs an id (or {ROOT}) of at most \
                     {MAX_ID_BYTES} bytes; it {e}"
                ))
            })?;
        }
        let workflow_id = workflow.unwrap_or_else(|| root_id.clone());
        check_id(&workflow_id).map_err(|e| invalid(format!("header {WORKFLOW} {e}")))?;
        let step = headers::get_int(h, STEP)
            .map_err(|e| invalid(e.to_string()))?
            .unwrap_or(0);
        if !(0..=MAX_CHAIN_STEPS as i64).contains(&step) {
            return Err(invalid(format!(
                "header {STEP} must be 0..={MAX_CHAIN_STEPS}"
            )));
        }
        Ok(Some(Flow {
            workflow_id,
            parent_id: str_header(h, PARENT)?,
            step,
            root_id,
            rest,
        }))
    }

    /// The id of the step at `offset` in [`Flow::rest`].
    fn id_of(&self, offset: usize) -> String {
        let s = &self.rest[offset];
        s.id.clone()
            .unwrap_or_else(|| format!("{}.{}", self.root_id, self.step + 1 + offset as i64))
    }

    /// The task for the step at `offset` in [`Flow::rest`], published by
    /// task `parent_id`, its arguments completed with `key` = `value`.
    fn publish(&self, offset: usize, parent_id: &str, key: &str, value: Value) -> NextTask {
        let s = &self.rest[offset];
        let mut args = s.args.as_object().cloned().unwrap_or_default();
        if s.pass_result {
            args.insert(key.to_owned(), value);
        }
        let mut h = FieldTable::default();
        headers::set_str(&mut h, WORKFLOW, &self.workflow_id);
        headers::set_str(&mut h, PARENT, parent_id);
        headers::set_str(&mut h, ROOT, &self.root_id);
        headers::set_int(&mut h, STEP, self.step + 1 + offset as i64);
        let after = &self.rest[offset + 1..];
        if !after.is_empty() {
            headers::set_str(&mut h, CHAIN, &encode_chain(after));
        }
        if let Some(n) = s.max_retries {
            headers::set_int(&mut h, headers::MAX_RETRIES, n.min(i64::MAX as u64) as i64);
        }
        if let Some(ms) = s.timeout_ms {
            headers::set_int(&mut h, headers::TIMEOUT_MS, ms.min(i64::MAX as u64) as i64);
        }
        NextTask {
            id: self.id_of(offset),
            task_type: s.task_type.clone(),
            body: serde_json::to_vec(&Value::Object(args)).expect("JSON always serializes"),
            priority: s.priority,
            headers: h,
        }
    }

    /// What task `task_id` publishes when it succeeds with `result`: the
    /// next step, with `previous` = `result`, if there is one.
    pub fn after_success(&self, task_id: &str, result: &Value) -> Option<NextTask> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.publish(0, task_id, PREVIOUS, result.clone()))
    }

    /// What follows task `task_id` of `task_type` ending dead with `reason`
    /// and `error` (the event's `error` object, or null): the steps up to
    /// the first `"after": "always"` one are skipped, and that one runs with
    /// `previous_failure` = `{task_id, type, step, reason, error}`.
    pub fn after_failure(
        &self,
        task_id: &str,
        task_type: &str,
        reason: &str,
        error: Value,
    ) -> AfterStop {
        let why = format!(
            "chain stopped: step {} ({task_id}, {task_type}) ended dead ({reason})",
            self.step
        );
        let always = self.rest.iter().position(|s| s.after == After::Always);
        let stop = always.unwrap_or(self.rest.len());
        let failure = serde_json::json!({
            "task_id": task_id,
            "type": task_type,
            "step": self.step,
            "reason": reason,
            "error": error,
        });
        AfterStop {
            skipped: self.skip(0..stop, &why),
            next: always.map(|k| self.publish(k, task_id, PREVIOUS_FAILURE, failure)),
        }
    }

    /// What follows task `task_id` of `task_type` being cancelled: every
    /// step after it is skipped.
    pub fn after_cancel(&self, task_id: &str, task_type: &str) -> AfterStop {
        let why = format!(
            "chain stopped: step {} ({task_id}, {task_type}) was cancelled",
            self.step
        );
        AfterStop {
            skipped: self.skip(0..self.rest.len(), &why),
            next: None,
        }
    }

    fn skip(&self, range: std::ops::Range<usize>, why: &str) -> Vec<Skipped> {
        range
            .map(|k| Skipped {
                id: self.id_of(k),
                task_type: self.rest[k].task_type.clone(),
                reason: why.to_owned(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers_with(chain: Option<&str>, workflow: Option<&str>) -> FieldTable {
        let mut h = FieldTable::default();
        if let Some(c) = chain {
            headers::set_str(&mut h, CHAIN, c);
        }
        if let Some(w) = workflow {
            headers::set_str(&mut h, WORKFLOW, w);
        }
        h
    }

    fn flow(chain: &str) -> Flow {
        Flow::from_headers(Some(&headers_with(Some(chain), None)), "t0")
            .unwrap()
            .unwrap()
    }

    #[test]
    fn no_workflow_headers_is_no_flow() {
        assert_eq!(Flow::from_headers(None, "t").unwrap(), None);
        let h = FieldTable::default();
        assert_eq!(Flow::from_headers(Some(&h), "t").unwrap(), None);
    }

    #[test]
    fn a_chain_passes_each_result_on_and_carries_the_rest() {
        let f = flow(r#"[{"type":"diag.add","args":{"add":2}},{"type":"diag.echo","id":"last"}]"#);
        assert_eq!(f.workflow_id, "t0");
        let next = f.after_success("t0", &json!({"n": 1})).unwrap();
        assert_eq!(next.id, "t0.1");
        assert_eq!(next.task_type, "diag.add");
        let body: Value = serde_json::from_slice(&next.body).unwrap();
        assert_eq!(body, json!({"add": 2, "previous": {"n": 1}}));
        let f2 = Flow::from_headers(Some(&next.headers), &next.id)
            .unwrap()
            .unwrap();
        assert_eq!((f2.step, f2.root_id.as_str()), (1, "t0"));
        assert_eq!(f2.parent_id.as_deref(), Some("t0"));
        assert_eq!(f2.rest.len(), 1);
        let last = f2.after_success("t0.1", &json!(3)).unwrap();
        assert_eq!(last.id, "last");
        let f3 = Flow::from_headers(Some(&last.headers), &last.id)
            .unwrap()
            .unwrap();
        assert_eq!(f3.workflow_id, "t0");
        assert!(f3.rest.is_empty());
        assert_eq!(f3.after_success("last", &json!(1)), None);
    }

    #[test]
    fn a_failure_skips_up_to_an_always_step_which_gets_the_failure() {
        let f = flow(
            r#"[{"type":"a.b"},{"type":"c.d"},{"type":"clean.up","after":"always"},{"type":"e.f"}]"#,
        );
        let stop = f.after_failure("t0", "x.y", "permanent_failure", json!({"code": "boom"}));
        let ids: Vec<_> = stop.skipped.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["t0.1", "t0.2"]);
        assert!(stop.skipped[0]
            .reason
            .contains("step 0 (t0, x.y) ended dead (permanent_failure)"));
        let next = stop.next.unwrap();
        assert_eq!(next.id, "t0.3");
        let body: Value = serde_json::from_slice(&next.body).unwrap();
        assert_eq!(body["previous_failure"]["error"]["code"], "boom");
        let cancel = f.after_cancel("t0", "x.y");
        assert_eq!(cancel.skipped.len(), 4);
        assert!(cancel.next.is_none());
    }

    #[test]
    fn hostile_chains_are_invalid_with_their_reason() {
        let refuse = |h: FieldTable| {
            let e = Flow::from_headers(Some(&h), "t").unwrap_err();
            assert_eq!(e.code, "bad_workflow");
            e.message
        };
        let many = format!("[{}]", vec![r#"{"type":"a.b"}"#; 101].join(","));
        assert!(refuse(headers_with(Some(&many), None)).contains("101 steps"));
        let deep = format!(
            r#"[{{"type":"a.b","args":{{"x":{}1{}}}}}]"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(refuse(headers_with(Some(&deep), None)).contains("nested"));
        let huge = format!(
            r#"[{{"type":"a.b","args":{{"x":"{}"}}}}]"#,
            "y".repeat(40_000)
        );
        assert!(refuse(headers_with(Some(&huge), None)).contains("bytes"));
        assert!(refuse(headers_with(Some("{not json"), None)).contains("not JSON"));
        assert!(refuse(headers_with(Some(r#"{"type":"a.b"}"#), None)).contains("array"));
        assert!(refuse(headers_with(Some(r#"[{"type":"a b"}]"#), None)).contains("step 1"));
        assert!(
            refuse(headers_with(Some(r#"[{"type":"a.b","args":[1]}]"#), None)).contains("object")
        );
        assert!(
            refuse(headers_with(Some(r#"[{"type":"a.b","bogus":1}]"#), None)).contains("bogus")
        );
        assert!(refuse(headers_with(
            Some(r#"[{"type":"a.b","priority":12}]"#),
            None
        ))
        .contains("priority"));
        let mut h = FieldTable::default();
        h.insert(CHAIN.into(), AMQPValue::LongLongInt(5));
        assert!(refuse(h).contains("must be a string"));
        let long = "w".repeat(300);
        assert!(refuse(headers_with(None, Some(&long))).contains("300 bytes"));
    }

    #[test]
    fn a_long_task_id_cannot_root_a_chain() {
        let h = headers_with(Some(r#"[{"type":"a.b"}]"#), None);
        let e = Flow::from_headers(Some(&h), &"i".repeat(250)).unwrap_err();
        assert!(e.message.contains("at most 200 bytes"), "{e}");
    }

    #[test]
    fn steps_round_trip_through_their_encoding() {
        let mut s = Step::new("a.b", json!({"k": 1}));
        s.after = After::Always;
        s.priority = Some(3);
        let text = encode_chain(&[s.clone(), Step::new("c.d", json!({}))]);
        assert_eq!(
            text,
            r#"[{"type":"a.b","args":{"k":1},"priority":3,"after":"always"},{"type":"c.d"}]"#
        );
        assert_eq!(
            parse_chain(&text).unwrap(),
            vec![s, Step::new("c.d", json!({}))]
        );
    }
}
