//! A task's tracked state, merged from its events in any order.
//!
//! Every field of a [`TaskRow`] is the value of the event with the highest
//! sort key for that field (a join in a lattice), so merging the same events
//! in any order, or one event twice, gives the same row. The state follows
//! the event with the highest [`state_key`]: final events (`succeeded`,
//! `dead`, `cancelled`) beat every other, the latest final one among them;
//! otherwise the highest attempt, then the latest time, then the state that
//! comes later in an attempt's life.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;
use warren_core::event::cap_result;
use warren_core::{Event, EventError, TaskState};

/// One event as the tracker stores it: decoded, its result capped, its time
/// in Unix milliseconds, and its JSON body as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingEvent {
    /// The decoded event (result capped).
    pub event: Event,
    /// `event.at` in Unix milliseconds (the receive time if it did not parse).
    pub at_ms: i64,
    /// The event as JSON, as stored in the history.
    pub body: String,
    /// The time [`state_key`] orders it by: `at_ms`, but for what the
    /// tracker read from a published copy ([`IncomingEvent::published`]),
    /// which any event of its attempt outranks whenever it is read.
    pub key_at_ms: i64,
    /// The task's priority, when known (from a published copy).
    pub priority: Option<i64>,
}

impl IncomingEvent {
    /// Reads an event body; results over `max_result_bytes` become a
    /// truncated preview; an unreadable `at` is replaced by `received_ms`.
    pub fn decode(
        data: &[u8],
        max_result_bytes: usize,
        received_ms: i64,
    ) -> Result<Self, EventError> {
        let mut event = Event::from_json(data)?;
        if let Some(result) = event.result.take() {
            event.result = Some(cap_result(result, max_result_bytes));
        }
        Ok(Self::from_event(event, received_ms))
    }

    /// Wraps a decoded event.
    pub fn from_event(event: Event, received_ms: i64) -> Self {
        let at_ms = parse_time_ms(&event.at).unwrap_or(received_ms);
        let body = String::from_utf8(event.to_json()).expect("serde_json writes UTF-8");
        Self {
            event,
            at_ms,
            body,
            key_at_ms: at_ms,
            priority: None,
        }
    }

    /// What a copy read from `P.tracker.published` says: the task is
    /// `queued` (or `scheduled`, with its due time) as of `received_ms`,
    /// with this priority. Its state ranks below every event of its
    /// attempt whatever their times (`key_at_ms` = `released_ms`, the due
    /// time of a copy the scheduler released, else 0), so a copy read late
    /// never overwrites a task's `started` or `succeeded`.
    pub fn published(
        mut event: Event,
        received_ms: i64,
        released_ms: Option<i64>,
        priority: Option<i64>,
    ) -> Self {
        event.at = format_ms(received_ms);
        let mut e = Self::from_event(event, received_ms);
        e.key_at_ms = released_ms.unwrap_or(0);
        e.priority = priority;
        if let Some(p) = priority {
            if let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(&e.body) {
                body.insert("priority".into(), Value::from(p));
                e.body = Value::Object(body).to_string();
            }
        }
        e
    }

    /// Sort key of this event for the fields other than the state: time,
    /// then event id, so two distinct events never tie.
    fn key(&self) -> String {
        format!("{:020}|{}", self.at_ms.max(0), self.event.event_id)
    }
}

/// An RFC 3339 time in Unix milliseconds.
pub fn parse_time_ms(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc).timestamp_millis())
}

/// Unix milliseconds as the contract writes times: `2026-11-24T10:00:00.123Z`.
pub fn format_ms(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The state a task is shown in after an event of this state: a progress
/// report means the task is running.
fn shown_state(state: TaskState) -> TaskState {
    match state {
        TaskState::Progress => TaskState::Started,
        other => other,
    }
}

/// Order of states within one attempt, for events stamped the same millisecond.
fn state_rank(state: TaskState) -> u8 {
    match state {
        TaskState::Queued => 0,
        TaskState::Scheduled => 1,
        TaskState::Started | TaskState::Progress => 2,
        TaskState::Failed => 3,
        TaskState::Succeeded | TaskState::Dead | TaskState::Cancelled | TaskState::Duplicate => 4,
    }
}

/// The key that decides which event sets a task's state; the highest wins.
pub fn state_key(ev: &IncomingEvent) -> String {
    let state = ev.event.state;
    let (final_flag, attempt) = if state.is_final() {
        (1, 0)
    } else {
        (0, ev.event.attempt.max(0))
    };
    format!(
        "{final_flag}|{attempt:020}|{:020}|{}|{}",
        ev.key_at_ms.max(0),
        state_rank(state),
        ev.event.event_id
    )
}

/// A task as stored in the `tasks` table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskRow {
    /// The task id.
    pub task_id: String,
    /// The task type.
    pub task_type: String,
    /// The current state (`scheduled`, `started`, `failed`, `succeeded`, `dead`, `cancelled`).
    pub state: String,
    /// Sort key of the event that set `state`.
    pub state_key: String,
    /// Highest attempt seen.
    pub attempts: i64,
    /// Short queue name, from the latest event that had one.
    pub queue: Option<String>,
    /// `host/pid` of the latest event that had one.
    pub worker: Option<String>,
    /// Earliest event time, Unix ms.
    pub first_seen: i64,
    /// Latest event time, Unix ms.
    pub last_at: i64,
    /// When the latest attempt started, Unix ms.
    pub started_at: Option<i64>,
    /// When the final event happened, Unix ms (only in a final state).
    pub finished_at: Option<i64>,
    /// Duration of the latest attempt that reported one.
    pub duration_ms: Option<i64>,
    /// The latest error, as JSON text.
    pub error: Option<String>,
    /// When the latest error happened, Unix ms.
    pub error_at: Option<i64>,
    /// The result of the latest success, as JSON text (capped).
    pub result: Option<String>,
    /// Why the task ended dead or cancelled.
    pub reason: Option<String>,
    /// When the latest scheduled attempt is due.
    pub due_at: Option<String>,
    /// Distinct events seen.
    pub events: i64,
    /// The priority it was published (or last changed) with, when known.
    pub priority: Option<i64>,
    /// The workflow it belongs to (contract section 8), when any.
    pub workflow_id: Option<String>,
    /// The task whose outcome published it, in a workflow.
    pub parent_id: Option<String>,
    /// Sort keys of the events each field came from.
    pub merge_keys: BTreeMap<String, String>,
}

impl TaskRow {
    /// An empty row for a task about to get its first event.
    pub fn empty(task_id: &str, task_type: &str) -> Self {
        Self {
            task_id: task_id.to_owned(),
            task_type: task_type.to_owned(),
            first_seen: i64::MAX,
            last_at: i64::MIN,
            ..Default::default()
        }
    }

    /// Merges one event that this row has not seen yet.
    pub fn apply(&mut self, ev: &IncomingEvent) {
        let e = &ev.event;
        if self.task_type.is_empty() {
            self.task_type = e.task_type.clone();
        }
        self.events += 1;
        self.attempts = self.attempts.max(e.attempt);
        self.first_seen = self.first_seen.min(ev.at_ms);
        self.last_at = self.last_at.max(ev.at_ms);

        let skey = state_key(ev);
        if skey > self.state_key {
            self.state = shown_state(e.state).as_str().to_owned();
            self.state_key = skey;
            self.finished_at = e.state.is_final().then_some(ev.at_ms);
        }

        let key = ev.key();
        let keys = &mut self.merge_keys;
        take_latest(keys, "queue", &key, &mut self.queue, e.queue.clone());
        take_latest(keys, "worker", &key, &mut self.worker, e.worker.clone());
        let duration = e.duration_ms.map(|d| i64::try_from(d).unwrap_or(i64::MAX));
        take_latest(keys, "duration", &key, &mut self.duration_ms, duration);
        let error = e
            .error
            .as_ref()
            .map(|err| serde_json::to_string(err).expect("an error object always serializes"));
        if take_latest(keys, "error", &key, &mut self.error, error) {
            self.error_at = Some(ev.at_ms);
        }
        let result = match e.state {
            TaskState::Succeeded => Some(
                e.result
                    .as_ref()
                    .map_or_else(|| "null".to_owned(), Value::to_string),
            ),
            _ => None,
        };
        take_latest(keys, "result", &key, &mut self.result, result);
        take_latest(keys, "reason", &key, &mut self.reason, e.reason.clone());
        let due = match e.state {
            TaskState::Scheduled => e.due_at.clone(),
            _ => None,
        };
        take_latest(keys, "due", &key, &mut self.due_at, due);
        take_latest(keys, "priority", &key, &mut self.priority, ev.priority);
        // Every event of a task names the same workflow and parent.
        if self.workflow_id.is_none() {
            self.workflow_id = e.workflow_id.clone();
        }
        if self.parent_id.is_none() {
            self.parent_id = e.parent_id.clone();
        }
        if e.state == TaskState::Started {
            let started_key = format!("{:020}|{key}", e.attempt.max(0));
            take_latest(
                keys,
                "started",
                &started_key,
                &mut self.started_at,
                Some(ev.at_ms),
            );
        }
    }

    /// The merge keys as stored (a JSON object).
    pub fn merge_keys_json(&self) -> String {
        serde_json::to_string(&self.merge_keys).expect("a string map always serializes")
    }

    /// Reads stored merge keys; unreadable ones count as none.
    pub fn parse_merge_keys(text: &str) -> BTreeMap<String, String> {
        serde_json::from_str(text).unwrap_or_default()
    }

    /// The row as the API and `warren tasks --json` show it.
    pub fn view(&self) -> TaskView {
        let json = |s: &Option<String>| {
            s.as_deref()
                .map(|t| serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_owned())))
        };
        TaskView {
            task_id: self.task_id.clone(),
            task_type: self.task_type.clone(),
            state: self.state.clone(),
            attempts: self.attempts,
            queue: self.queue.clone(),
            worker: self.worker.clone(),
            first_seen: format_ms(self.first_seen),
            last_event_at: format_ms(self.last_at),
            started_at: self.started_at.map(format_ms),
            finished_at: self.finished_at.map(format_ms),
            duration_ms: self.duration_ms,
            error: json(&self.error),
            result: json(&self.result),
            reason: self.reason.clone(),
            due_at: self.due_at.clone(),
            priority: self.priority,
            events: self.events,
            workflow_id: self.workflow_id.clone(),
            parent_id: self.parent_id.clone(),
        }
    }
}

/// Why a task cannot be changed (new priority or due time): it has started
/// or ended. `None` while it waits: `queued`, `scheduled`, or `failed` with
/// a retry to come.
pub fn change_refusal(task: &TaskRow) -> Option<String> {
    let id = &task.task_id;
    match task.state.as_str() {
        "queued" | "scheduled" | "failed" => None,
        "started" | "progress" => Some(format!(
            "task {id} has started (attempt {}{}): only a waiting task can be changed",
            task.attempts,
            task.worker
                .as_deref()
                .map(|w| format!(" on {w}"))
                .unwrap_or_default()
        )),
        ended => Some(format!(
            "task {id} has ended {ended}: only a waiting task can be changed"
        )),
    }
}

/// Why a task cannot be cancelled: it has ended. A waiting task is dropped
/// when next seen, a running one aborted.
pub fn cancel_refusal(task: &TaskRow) -> Option<String> {
    matches!(
        task.state.as_str(),
        "succeeded" | "dead" | "cancelled" | "duplicate"
    )
    .then(|| {
        format!(
            "task {} has ended {}: nothing to cancel",
            task.task_id, task.state
        )
    })
}

/// A workflow as the API and `warren workflow status` show it: its task
/// count per state (`counts`), the total, whether every task reached a
/// final state (`done`), and its tasks first seen first (`tasks`, at most
/// the listing's limit; `truncated` when there are more).
pub fn workflow_view(workflow_id: &str, counts: &BTreeMap<String, i64>, rows: &[TaskRow]) -> Value {
    let total: i64 = counts.values().sum();
    let open: i64 = counts
        .iter()
        .filter(|(s, _)| !matches!(s.as_str(), "succeeded" | "dead" | "cancelled" | "duplicate"))
        .map(|(_, n)| n)
        .sum();
    serde_json::json!({
        "workflow_id": workflow_id,
        "total": total,
        "counts": counts,
        "done": total > 0 && open == 0,
        "tasks": rows.iter().map(TaskRow::view).collect::<Vec<_>>(),
        "truncated": (rows.len() as i64) < total,
    })
}

/// Sets `slot` to `value` if `value` is present and `key` is higher than
/// the key `field` was last set with; returns whether it did.
fn take_latest<T>(
    keys: &mut BTreeMap<String, String>,
    field: &str,
    key: &str,
    slot: &mut Option<T>,
    value: Option<T>,
) -> bool {
    let Some(value) = value else {
        return false;
    };
    if keys.get(field).is_some_and(|k| k.as_str() >= key) {
        return false;
    }
    keys.insert(field.to_owned(), key.to_owned());
    *slot = Some(value);
    true
}

/// A task as the API shows it: times in RFC 3339, error and result as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskView {
    /// The task id.
    pub task_id: String,
    /// The task type.
    #[serde(rename = "type")]
    pub task_type: String,
    /// Current state.
    pub state: String,
    /// Highest attempt seen.
    pub attempts: i64,
    /// Short queue name.
    pub queue: Option<String>,
    /// `host/pid` of the latest event that named one.
    pub worker: Option<String>,
    /// First event time.
    pub first_seen: String,
    /// Latest event time.
    pub last_event_at: String,
    /// Start of the latest attempt.
    pub started_at: Option<String>,
    /// Time of the final event.
    pub finished_at: Option<String>,
    /// Duration of the latest attempt that reported one.
    pub duration_ms: Option<i64>,
    /// The latest error `{kind, code, message}`.
    pub error: Option<Value>,
    /// The result of the latest success (capped).
    pub result: Option<Value>,
    /// Why it ended dead or cancelled.
    pub reason: Option<String>,
    /// When the latest scheduled attempt is due.
    pub due_at: Option<String>,
    /// The priority it was published (or last changed) with, when known.
    pub priority: Option<i64>,
    /// Distinct events seen.
    pub events: i64,
    /// The workflow it belongs to (contract section 8); absent outside any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// The task whose outcome published it, in a workflow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_core::event::{ErrorKind, EventErrorInfo};

    fn ev(id: &str, state: TaskState, attempt: i64, at_ms: i64) -> IncomingEvent {
        let mut e = Event::new("task-1", "diag.fail", state, attempt);
        e.event_id = id.to_owned();
        e.at = format_ms(at_ms);
        e.queue = Some("diag".into());
        e.worker = Some(format!("host/{attempt}"));
        match state {
            TaskState::Failed => {
                e.retry = Some(attempt < 3);
                e.duration_ms = Some(5);
                e.error = Some(EventErrorInfo {
                    kind: ErrorKind::Retryable,
                    code: "boom".into(),
                    message: format!("attempt {attempt} failed"),
                });
            }
            TaskState::Succeeded => {
                e.duration_ms = Some(7);
                e.result = Some(serde_json::json!({"ok": attempt}));
            }
            TaskState::Dead => e.reason = Some("retries_exhausted".into()),
            TaskState::Scheduled => e.due_at = Some(format_ms(at_ms + 1000)),
            _ => {}
        }
        IncomingEvent::from_event(e, 0)
    }

    fn published(
        state: TaskState,
        attempt: i64,
        received_ms: i64,
        released: Option<i64>,
    ) -> IncomingEvent {
        let mut e = Event::new("task-1", "diag.fail", state, attempt);
        e.event_id = format!("published:{attempt}:{state:?}");
        e.queue = Some("diag".into());
        IncomingEvent::published(e, received_ms, released, Some(7))
    }

    #[test]
    fn a_published_copy_read_late_never_overwrites_what_came_after() {
        let queued = published(TaskState::Queued, 1, 9_000, None);
        let started = ev("e1", TaskState::Started, 1, 1_000);
        let done = ev("e2", TaskState::Succeeded, 1, 1_010);
        for order in [
            vec![&queued, &started, &done],
            vec![&started, &done, &queued],
            vec![&started, &queued, &done],
        ] {
            let row = merged(&order);
            assert_eq!(row.state, "succeeded");
            assert_eq!(row.priority, Some(7));
            assert_eq!(row.first_seen, 1_000);
        }
        let row = merged(&[&started, &queued]);
        assert_eq!(row.state, "started", "a copy read after the start");
        let row = merged(&[&queued]);
        assert_eq!(
            (row.state.as_str(), row.queue.as_deref()),
            ("queued", Some("diag"))
        );
        assert!(queued.body.contains("\"priority\":7"), "{}", queued.body);
    }

    #[test]
    fn a_released_copy_is_queued_until_its_attempt_starts() {
        let scheduled = ev("s2", TaskState::Scheduled, 2, 5_000);
        let failed = ev("f1", TaskState::Failed, 1, 4_000);
        let released = published(TaskState::Queued, 2, 8_000, Some(6_000));
        let started = ev("st2", TaskState::Started, 2, 6_500);
        assert_eq!(merged(&[&failed, &scheduled, &released]).state, "queued");
        assert_eq!(merged(&[&failed, &released, &scheduled]).state, "queued");
        assert_eq!(merged(&[&started, &released, &scheduled]).state, "started");
        // The first publication of a delayed task: the scheduler's own event
        // (same attempt) outranks the copy.
        let copy = published(TaskState::Scheduled, 1, 100, None);
        let accepted = ev("s1", TaskState::Scheduled, 1, 90);
        assert_eq!(merged(&[&copy, &accepted]).state_key, state_key(&accepted));
    }

    fn merged(events: &[&IncomingEvent]) -> TaskRow {
        let mut row = TaskRow::empty("task-1", "diag.fail");
        for e in events {
            row.apply(e);
        }
        row
    }

    /// Every order of `events` (Heap's algorithm).
    fn permutations<'a>(events: &[&'a IncomingEvent]) -> Vec<Vec<&'a IncomingEvent>> {
        fn go<'a>(k: usize, a: &mut Vec<&'a IncomingEvent>, out: &mut Vec<Vec<&'a IncomingEvent>>) {
            if k <= 1 {
                out.push(a.clone());
                return;
            }
            for i in 0..k {
                go(k - 1, a, out);
                let j = if k.is_multiple_of(2) { i } else { 0 };
                a.swap(j, k - 1);
            }
        }
        let mut out = Vec::new();
        go(events.len(), &mut events.to_vec(), &mut out);
        out
    }

    #[test]
    fn the_same_events_in_any_order_give_the_same_row() {
        let all = [
            ev("e1", TaskState::Started, 1, 1_000),
            ev("e2", TaskState::Failed, 1, 1_010),
            ev("e3", TaskState::Scheduled, 2, 1_010),
            ev("e4", TaskState::Started, 2, 2_000),
            ev("e5", TaskState::Failed, 2, 2_005),
            ev("e6", TaskState::Dead, 2, 2_006),
        ];
        let refs: Vec<&IncomingEvent> = all.iter().collect();
        let expected = merged(&refs);
        assert_eq!(expected.state, "dead");
        assert_eq!(expected.attempts, 2);
        assert_eq!(expected.first_seen, 1_000);
        assert_eq!(expected.last_at, 2_006);
        assert_eq!(expected.started_at, Some(2_000));
        assert_eq!(expected.finished_at, Some(2_006));
        assert_eq!(expected.reason.as_deref(), Some("retries_exhausted"));
        assert_eq!(expected.worker.as_deref(), Some("host/2"));
        assert!(expected
            .error
            .as_deref()
            .unwrap()
            .contains("attempt 2 failed"));
        assert_eq!(expected.error_at, Some(2_005));
        assert_eq!(expected.events, 6);
        let perms = permutations(&refs);
        assert_eq!(perms.len(), 720);
        for order in perms {
            assert_eq!(merged(&order), expected);
        }
    }

    #[test]
    fn final_state_wins_over_late_non_final_events() {
        let done = ev("e9", TaskState::Succeeded, 1, 1_000);
        // A started event stamped later (clock skew, or a redelivery) arrives after.
        let late = ev("e8", TaskState::Started, 1, 5_000);
        let row = merged(&[&done, &late]);
        assert_eq!(row.state, "succeeded");
        assert_eq!(row.finished_at, Some(1_000));
        assert_eq!(row.result.as_deref(), Some("{\"ok\":1}"));
        assert_eq!(row.last_at, 5_000);
    }

    #[test]
    fn a_later_final_event_replaces_an_earlier_one() {
        // A dead task replayed: attempt numbering restarts, it then succeeds.
        let dead = ev("a", TaskState::Dead, 3, 1_000);
        let started = ev("b", TaskState::Started, 1, 2_000);
        let ok = ev("c", TaskState::Succeeded, 1, 2_100);
        assert_eq!(merged(&[&dead, &started]).state, "dead");
        assert_eq!(merged(&[&ok, &dead, &started]).state, "succeeded");
        assert_eq!(merged(&[&dead, &started, &ok]).state, "succeeded");
    }

    #[test]
    fn a_retry_is_scheduled_after_its_failure_in_the_same_millisecond() {
        let failed = ev("z", TaskState::Failed, 1, 1_000);
        let scheduled = ev("a", TaskState::Scheduled, 2, 1_000);
        assert_eq!(merged(&[&failed, &scheduled]).state, "scheduled");
        assert_eq!(merged(&[&scheduled, &failed]).state, "scheduled");
    }

    #[test]
    fn progress_shows_as_running() {
        let started = ev("a", TaskState::Started, 1, 1_000);
        let progress = ev("b", TaskState::Progress, 1, 1_500);
        let row = merged(&[&progress, &started]);
        assert_eq!(row.state, "started");
        assert_eq!(row.events, 2);
    }

    #[test]
    fn large_results_are_capped_and_unreadable_times_use_the_receive_time() {
        let mut e = Event::new("t", "diag.echo", TaskState::Succeeded, 1);
        e.result = Some(serde_json::json!({"data": "x".repeat(5000)}));
        e.at = "yesterday".into();
        let got = IncomingEvent::decode(&e.to_json(), 1000, 42).unwrap();
        assert_eq!(got.at_ms, 42);
        assert_eq!(got.event.result.as_ref().unwrap()["truncated"], true);
        assert!(got.body.len() < 2000);
        assert!(IncomingEvent::decode(b"{not json", 1000, 0).is_err());
    }

    #[test]
    fn views_format_times_and_json() {
        let row = merged(&[&ev("e1", TaskState::Failed, 1, 1_700_000_000_000)]);
        let v = row.view();
        assert_eq!(v.first_seen, "2023-11-14T22:13:20.000Z");
        assert_eq!(v.error.as_ref().unwrap()["code"], "boom");
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["type"], "diag.fail");
        assert_eq!(json["state"], "failed");
    }
}
