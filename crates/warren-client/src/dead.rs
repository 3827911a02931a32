//! Listing, replaying and purging the parking lot `P.dead`.
//!
//! Every operation reads the queue with `basic.get` (acknowledgements on) on
//! a channel of its own, at most as many messages as the queue held when the
//! operation began, so a task parked meanwhile (say, a replayed task that
//! failed again) is never read twice. Messages an operation does not take are
//! returned unacknowledged, so the queue keeps them. Replay acknowledges a
//! message only after the broker confirmed its copy on `P.tasks`: an
//! interrupted replay loses nothing, at worst a task is both replayed and
//! still in `P.dead`.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::ops::ControlFlow;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};
use warren_core::{headers, Names};

use crate::connect::confirmed;
use crate::connect::ConfirmChannel;
use crate::outbox::copy_producer_properties;
use crate::{ClientError, ORIGINAL_EXPIRATION};

/// The header the broker records dead-lettering in; dropped on replay.
pub const X_DEATH: &str = "x-death";

/// Headers a replay removes, so the task starts again from attempt 1.
pub const REPLAY_REMOVED_HEADERS: [&str; 10] = [
    headers::ATTEMPT,
    headers::REPUBLISHED,
    headers::DEAD_REASON,
    headers::DEAD_DETAIL,
    headers::DEAD_QUEUE,
    headers::LAST_ERROR,
    X_DEATH,
    headers::DELIVERY_COUNT,
    ORIGINAL_EXPIRATION,
    warren_core::delay::DUE_AT,
];

/// Confirms a replay keeps in flight before it waits for the oldest.
const REPLAY_WINDOW: usize = 64;

/// One task parked in `P.dead`: its properties and body as the queue holds them.
#[derive(Debug, Clone)]
pub struct DeadTask {
    /// The message's AMQP properties, headers included.
    pub properties: BasicProperties,
    /// The message body, untouched.
    pub body: Vec<u8>,
}

impl DeadTask {
    fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// The task id (`message_id`), if the message has one.
    pub fn id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|s| s.as_str())
    }

    /// The task type (AMQP `type` property), if set.
    pub fn task_type(&self) -> Option<&str> {
        self.properties.kind().as_ref().map(|s| s.as_str())
    }

    /// Why it was parked (`x-warren-dead-reason`).
    pub fn reason(&self) -> Option<String> {
        headers::get_str(self.headers(), headers::DEAD_REASON)
    }

    /// What exactly went wrong (`x-warren-dead-detail`).
    pub fn detail(&self) -> Option<String> {
        headers::get_str(self.headers(), headers::DEAD_DETAIL)
    }

    /// The `x-warren-attempt` header, if present and an integer.
    pub fn attempt(&self) -> Option<i64> {
        headers::get_int(self.headers(), headers::ATTEMPT)
            .ok()
            .flatten()
    }

    /// The work queue it was taken from (`x-warren-dead-queue`), when known.
    pub fn queue(&self) -> Option<String> {
        headers::get_str(self.headers(), headers::DEAD_QUEUE)
    }

    /// One JSON object: `id`, `type`, `reason`, `detail`, `attempt`, `queue`,
    /// `bytes`, `headers` (as JSON) and `body` (as JSON if it parses, else as
    /// text); absent fields are `null`.
    pub fn to_json(&self) -> Value {
        let body = serde_json::from_slice::<Value>(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()));
        json!({
            "id": self.id(),
            "type": self.task_type(),
            "reason": self.reason(),
            "detail": self.detail(),
            "attempt": self.attempt(),
            "queue": self.queue(),
            "bytes": self.body.len(),
            "headers": self.headers().map_or(Value::Null, table_to_json),
            "body": body,
        })
    }
}

/// Which dead tasks an operation concerns; every field set must match.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    /// Exact task type.
    pub task_type: Option<String>,
    /// Exact dead reason (`invalid`, `expired`, ...).
    pub reason: Option<String>,
    /// Task ids; `None` means any.
    pub ids: Option<BTreeSet<String>>,
}

impl DeadFilter {
    /// Whether `task` is selected.
    pub fn matches(&self, task: &DeadTask) -> bool {
        if let Some(t) = &self.task_type {
            if task.task_type() != Some(t.as_str()) {
                return false;
            }
        }
        if let Some(r) = &self.reason {
            if task.reason().as_deref() != Some(r.as_str()) {
                return false;
            }
        }
        if let Some(ids) = &self.ids {
            if !task.id().is_some_and(|id| ids.contains(id)) {
                return false;
            }
        }
        true
    }
}

/// What a listing saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListReport {
    /// Messages in `P.dead` when the listing began.
    pub depth: u32,
    /// Messages read.
    pub scanned: u32,
    /// Messages that matched the filter (and were shown).
    pub matched: usize,
    /// Whether the listing stopped at its limit before reading everything.
    pub limited: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Tasks published to `P.tasks` and removed from `P.dead`.
    pub replayed: usize,
    /// Ids (or `-`) of matching tasks left in `P.dead` because they have no
    /// `type` property to route them by.
    pub skipped_no_type: Vec<String>,
    /// Ids of every matching task seen, replayed or skipped.
    pub found: BTreeSet<String>,
}

/// What a purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Tasks that matched the filter.
    pub matched: usize,
    /// Tasks deleted (0 when the confirmation said no).
    pub deleted: usize,
}

/// The operations on `P.dead`, over one connection.
#[derive(Debug)]
pub struct DeadLetters<'a> {
    conn: &'a Connection,
    names: Names,
}

impl<'a> DeadLetters<'a> {
    /// Operations on `names.dead()` over `conn`.
    pub fn new(conn: &'a Connection, names: &Names) -> Self {
        Self {
            conn,
            names: names.clone(),
        }
    }

    /// Calls `each` for every matching task, in queue order, up to `limit`
    /// tasks or until `each` breaks; the queue is left as it was.
    pub async fn list(
        &self,
        filter: &DeadFilter,
        limit: Option<usize>,
        mut each: impl FnMut(&DeadTask) -> ControlFlow<()>,
    ) -> Result<ListReport, ClientError> {
        let mut scan = Scan::open(self.conn, &self.names.dead()).await?;
        let mut report = ListReport {
            depth: scan.depth,
            ..Default::default()
        };
        while let Some((tag, task)) = scan.next().await? {
            scan.keep(tag);
            report.scanned += 1;
            if filter.matches(&task) {
                report.matched += 1;
                if each(&task).is_break() {
                    break;
                }
                if limit.is_some_and(|l| report.matched >= l) {
                    report.limited = scan.remaining > 0;
                    break;
                }
            }
        }
        scan.finish().await?;
        Ok(report)
    }

    /// Publishes every matching task to `P.tasks` (routing key = its `type`)
    /// with [`replay_properties`], acknowledging each in `P.dead` only after
    /// the broker confirmed its copy. Matching tasks without a `type` and
    /// tasks that do not match stay in `P.dead` untouched.
    pub async fn replay(&self, filter: &DeadFilter) -> Result<ReplayReport, ClientError> {
        let publish = ConfirmChannel::open(self.conn).await?;
        let tasks = self.names.tasks();
        let mut scan = Scan::open(self.conn, &self.names.dead()).await?;
        let mut report = ReplayReport::default();
        let mut in_flight = VecDeque::new();
        while let Some((tag, task)) = scan.next().await? {
            if !filter.matches(&task) {
                scan.keep(tag);
                continue;
            }
            let id = task.id().unwrap_or("-").to_owned();
            report.found.insert(id.clone());
            let Some(task_type) = task.task_type() else {
                scan.keep(tag);
                report.skipped_no_type.push(id);
                continue;
            };
            let props = replay_properties(&task.properties);
            let confirm = publish.send(&tasks, task_type, &task.body, props).await?;
            in_flight.push_back((tag, confirm, id));
            if in_flight.len() >= REPLAY_WINDOW {
                if let Some((tag, confirm, id)) = in_flight.pop_front() {
                    confirmed(confirm, &id).await?;
                    scan.ack(tag).await?;
                    report.replayed += 1;
                }
            }
        }
        while let Some((tag, confirm, id)) = in_flight.pop_front() {
            confirmed(confirm, &id).await?;
            scan.ack(tag).await?;
            report.replayed += 1;
        }
        scan.finish().await?;
        let _ = publish.channel().close(200, "replay done".into()).await;
        Ok(report)
    }

    /// Counts the matching tasks, asks `confirm` with that count (not asked
    /// when there are none) and deletes them if it answers true. The matching
    /// tasks are held unacknowledged meanwhile, so exactly those counted are
    /// deleted.
    pub async fn purge<F, Fut>(
        &self,
        filter: &DeadFilter,
        confirm: F,
    ) -> Result<PurgeReport, ClientError>
    where
        F: FnOnce(usize) -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut scan = Scan::open(self.conn, &self.names.dead()).await?;
        let mut matched = Vec::new();
        while let Some((tag, task)) = scan.next().await? {
            if filter.matches(&task) {
                matched.push(tag);
            } else {
                scan.keep(tag);
            }
        }
        let mut report = PurgeReport {
            matched: matched.len(),
            deleted: 0,
        };
        if !matched.is_empty() && confirm(matched.len()).await {
            for tag in &matched {
                scan.ack(*tag).await?;
            }
            report.deleted = matched.len();
        } else if let Some(last) = matched.last() {
            scan.keep(*last);
        }
        scan.finish().await?;
        Ok(report)
    }
}

/// One pass over a snapshot of a queue with `basic.get` on its own channel.
struct Scan {
    channel: Channel,
    queue: String,
    /// Messages in the queue when the pass began.
    depth: u32,
    /// How many more the pass may read.
    remaining: u32,
    /// The highest delivery tag left unacknowledged, to return on finish.
    last_kept: Option<u64>,
}

impl Scan {
    async fn open(conn: &Connection, queue: &str) -> Result<Self, ClientError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(ClientError::amqp("open channel"))?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(ClientError::amqp(format!(
                "queue {queue} (does the topology exist? run `warren topology apply`)"
            )))?;
        Ok(Self {
            channel,
            queue: queue.to_owned(),
            depth: q.message_count(),
            remaining: q.message_count(),
            last_kept: None,
        })
    }

    /// The next message of the snapshot, unacknowledged, with its delivery tag.
    async fn next(&mut self) -> Result<Option<(u64, DeadTask)>, ClientError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let got = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(ClientError::amqp(format!("basic.get from {}", self.queue)))?;
        let Some(m) = got else {
            self.remaining = 0;
            return Ok(None);
        };
        self.remaining -= 1;
        let d = m.delivery;
        Ok(Some((
            d.delivery_tag,
            DeadTask {
                properties: d.properties,
                body: d.data,
            },
        )))
    }

    /// Marks a message to be returned to the queue on finish.
    fn keep(&mut self, tag: u64) {
        self.last_kept = Some(self.last_kept.map_or(tag, |t| t.max(tag)));
    }

    /// Removes a message from the queue.
    async fn ack(&self, tag: u64) -> Result<(), ClientError> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: false })
            .await
            .map_err(ClientError::amqp(format!("ack in {}", self.queue)))
    }

    /// Returns every kept message to the queue and closes the channel.
    async fn finish(self) -> Result<(), ClientError> {
        if let Some(tag) = self.last_kept {
            self.channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(ClientError::amqp(format!(
                    "return messages to {}",
                    self.queue
                )))?;
        }
        self.channel
            .close(200, "done".into())
            .await
            .map_err(ClientError::amqp(format!(
                "close channel on {}",
                self.queue
            )))
    }
}

/// The properties of a replayed copy: the headers of
/// [`REPLAY_REMOVED_HEADERS`] removed (so the attempt count starts again),
/// `expiration` restored from `x-warren-original-expiration` when that holds
/// a valid TTL, every other property and header kept, except `user_id`,
/// which the broker refuses unless it names the publishing user.
pub fn replay_properties(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(h) = p.headers() {
        let mut kept = h.inner().clone();
        for k in REPLAY_REMOVED_HEADERS {
            kept.remove(k);
        }
        out = out.with_headers(FieldTable::from(kept));
    }
    match (
        headers::original_expiration(p.headers().as_ref()),
        p.expiration(),
    ) {
        (Some(e), _) => out = out.with_expiration(e),
        (None, Some(e)) => out = out.with_expiration(e.clone()),
        (None, None) => {}
    }
    // Delivery mode, id and type exactly as parked (absent stays absent).
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    copy_producer_properties(p, out)
}

/// An AMQP table as a JSON object: integers and floats as numbers, strings
/// and byte arrays as text (lossy UTF-8), nested tables and arrays as such.
pub fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => json!(i),
        AMQPValue::ShortShortUInt(i) => json!(i),
        AMQPValue::ShortInt(i) => json!(i),
        AMQPValue::ShortUInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongUInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => float(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::Void => Value::Null,
    }
}

/// A float as a JSON number; NaN and infinities, which JSON lacks, as `null`.
fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{DecimalValue, FieldArray};

    fn dead_headers() -> FieldTable {
        let mut h = FieldTable::default();
        headers::set_int(&mut h, headers::ATTEMPT, 4);
        headers::set_flag(&mut h, headers::REPUBLISHED);
        headers::set_str(&mut h, headers::DEAD_REASON, "retries_exhausted");
        headers::set_str(&mut h, headers::DEAD_DETAIL, "gave up");
        headers::set_str(&mut h, headers::DEAD_QUEUE, "io");
        headers::set_str(&mut h, headers::LAST_ERROR, "timeout");
        headers::set_str(&mut h, ORIGINAL_EXPIRATION, "60000");
        h.insert(
            X_DEATH.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(
                FieldTable::default(),
            )])),
        );
        headers::set_str(&mut h, "x-custom", "kept");
        headers::set_int(&mut h, headers::MAX_RETRIES, 3);
        h
    }

    fn task(props: BasicProperties, body: &[u8]) -> DeadTask {
        DeadTask {
            properties: props,
            body: body.to_vec(),
        }
    }

    #[test]
    fn replay_resets_the_attempt_and_keeps_everything_else() {
        let p = BasicProperties::default()
            .with_headers(dead_headers())
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("corr".into())
            .with_reply_to("replies".into())
            .with_message_id("t-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("diag.echo".into())
            .with_user_id("someone-else".into())
            .with_app_id("app".into())
            .with_cluster_id("cl".into());
        let out = replay_properties(&p);
        let h = out.headers().clone().unwrap();
        let keys: Vec<&str> = h.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["x-custom", "x-warren-max-retries"]);
        assert_eq!(out.expiration().as_ref().unwrap().as_str(), "60000");
        assert_eq!(out.user_id(), &None, "user_id is dropped");
        let expected = p.clone().with_headers(h).with_expiration("60000".into());
        assert_eq!(
            format!("{:?}", out.clone().with_user_id("someone-else".into())),
            format!("{expected:?}"),
            "every other property is kept"
        );
    }

    #[test]
    fn replay_without_original_expiration_sets_none() {
        let p = BasicProperties::default().with_type("diag.echo".into());
        let out = replay_properties(&p);
        assert_eq!(out.expiration(), &None);
        assert_eq!(out.headers(), &None);
        let mut h = FieldTable::default();
        headers::set_str(&mut h, ORIGINAL_EXPIRATION, "soon");
        let out = replay_properties(&BasicProperties::default().with_headers(h));
        assert_eq!(out.expiration(), &None, "an invalid TTL is not restored");
        assert!(out.headers().as_ref().unwrap().inner().is_empty());
        // A whole number, but over the 255 bytes of the property: building
        // it panicked.
        let mut h = FieldTable::default();
        let padded = format!("{}60000", "0".repeat(300));
        headers::set_str(&mut h, ORIGINAL_EXPIRATION, &padded);
        let out = replay_properties(&BasicProperties::default().with_headers(h));
        assert_eq!(out.expiration(), &None, "an oversized TTL is not restored");
    }

    #[test]
    fn filter_matches_type_reason_and_ids_exactly() {
        let t = task(
            BasicProperties::default()
                .with_headers(dead_headers())
                .with_type("diag.echo".into())
                .with_message_id("t-1".into()),
            b"{}",
        );
        let bare = task(BasicProperties::default(), b"{}");
        let f = |ty: Option<&str>, r: Option<&str>, ids: Option<&[&str]>| DeadFilter {
            task_type: ty.map(str::to_owned),
            reason: r.map(str::to_owned),
            ids: ids.map(|i| i.iter().map(|s| (*s).to_owned()).collect()),
        };
        assert!(f(None, None, None).matches(&t));
        assert!(f(None, None, None).matches(&bare));
        assert!(f(Some("diag.echo"), Some("retries_exhausted"), Some(&["t-1"])).matches(&t));
        assert!(!f(Some("diag"), None, None).matches(&t));
        assert!(!f(Some("diag.echo.x"), None, None).matches(&t));
        assert!(!f(None, Some("invalid"), None).matches(&t));
        assert!(!f(None, None, Some(&["t-2"])).matches(&t));
        assert!(!f(Some("diag.echo"), None, None).matches(&bare));
        assert!(!f(None, Some("invalid"), None).matches(&bare));
        assert!(!f(None, None, Some(&["t-1"])).matches(&bare));
    }

    #[test]
    fn json_shows_fields_headers_and_body() {
        let t = task(
            BasicProperties::default()
                .with_headers(dead_headers())
                .with_type("diag.echo".into())
                .with_message_id("t-1".into()),
            br#"{"a": [1, 2]}"#,
        );
        let j = t.to_json();
        assert_eq!(j["id"], "t-1");
        assert_eq!(j["type"], "diag.echo");
        assert_eq!(j["reason"], "retries_exhausted");
        assert_eq!(j["detail"], "gave up");
        assert_eq!(j["attempt"], 4);
        assert_eq!(j["queue"], "io");
        assert_eq!(j["bytes"], 13);
        assert_eq!(j["body"], json!({"a": [1, 2]}));
        assert_eq!(j["headers"]["x-custom"], "kept");
        assert_eq!(j["headers"]["x-warren-republished"], true);
        assert_eq!(j["headers"]["x-death"], json!([{}]));

        let bad = task(BasicProperties::default(), b"{oops\xff").to_json();
        assert_eq!(bad["body"], "{oops\u{fffd}");
        assert_eq!(bad["id"], Value::Null);
        assert_eq!(bad["attempt"], Value::Null);
        assert_eq!(bad["headers"], Value::Null);
    }

    #[test]
    fn every_amqp_value_becomes_json() {
        let mut t = FieldTable::default();
        t.insert("f".into(), AMQPValue::Double(1.5));
        t.insert("nan".into(), AMQPValue::Double(f64::NAN));
        t.insert(
            "d".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 150,
            }),
        );
        t.insert("v".into(), AMQPValue::Void);
        t.insert("ts".into(), AMQPValue::Timestamp(7));
        t.insert("neg".into(), AMQPValue::ShortShortInt(-3));
        let j = table_to_json(&t);
        assert_eq!(
            j,
            json!({"f": 1.5, "nan": null, "d": 1.5, "v": null, "ts": 7, "neg": -3})
        );
    }
}
