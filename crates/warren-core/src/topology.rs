//! The broker topology computed from configuration, as plain data.
//!
//! [`TopologyPlan::from_config`] lists every exchange, queue and binding
//! Warren declares; the scheduler applies it idempotently and
//! `warren topology show` prints it with [`TopologyPlan::render`]. When the
//! broker refuses a declaration because an object already exists with other
//! settings, [`TopologyPlan::explain_conflict`] turns its terse reply into a
//! sentence that names the object, the difference and the fix.

use std::collections::BTreeMap;
use std::fmt;

use amq_protocol_types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::config::{Config, QueueConfig, QueueKind};

/// The type of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routes by pattern over dot-separated routing keys.
    Topic,
    /// Routes every message to every bound queue.
    Fanout,
    /// Routes by exact routing key.
    Direct,
}

impl ExchangeKind {
    /// The AMQP name of the type (`topic`, `fanout`, `direct`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Fanout => "fanout",
            Self::Direct => "direct",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value of a declaration argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgValue {
    /// A string argument (sent as an AMQP long string).
    Str(String),
    /// An integer argument (sent as a signed 32-bit integer when it fits).
    Int(i64),
}

impl ArgValue {
    /// The value as an AMQP field value, for a declaration's argument table.
    /// Integers that fit go as signed 32-bit (`signedint`), the type
    /// RabbitMQ's own tools use, so re-declaring compares equal.
    pub fn to_amqp(&self) -> AMQPValue {
        match self {
            Self::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Self::Int(i) => match i32::try_from(*i) {
                Ok(small) => AMQPValue::LongInt(small),
                Err(_) => AMQPValue::LongLongInt(*i),
            },
        }
    }
}

impl fmt::Display for ArgValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::Int(i) => write!(f, "{i}"),
        }
    }
}

/// Converts a plan's arguments to the AMQP table a declaration carries.
pub fn field_table(arguments: &BTreeMap<String, ArgValue>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        table.insert(ShortString::from(key.as_str()), value.to_amqp());
    }
    table
}

/// One exchange to declare; every exchange is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangePlan {
    /// Full name, prefix included.
    pub name: String,
    /// Exchange type.
    pub kind: ExchangeKind,
    /// Declaration arguments (such as `alternate-exchange`).
    pub arguments: BTreeMap<String, ArgValue>,
    /// What it is for, in words, for listings.
    pub purpose: String,
}

/// One queue to declare; every queue is durable and not exclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePlan {
    /// Full name, prefix included.
    pub name: String,
    /// Declaration arguments (such as `x-max-priority`).
    pub arguments: BTreeMap<String, ArgValue>,
    /// What it holds, in words, for listings.
    pub purpose: String,
}

/// One binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingPlan {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue.
    pub queue: String,
    /// Binding key (a topic pattern for topic exchanges, `""` for fanout).
    pub routing_key: String,
}

/// Every exchange, queue and binding Warren declares for one configuration,
/// in declaration order (exchanges, then queues, then bindings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyPlan {
    /// Exchanges to declare.
    pub exchanges: Vec<ExchangePlan>,
    /// Queues to declare.
    pub queues: Vec<QueuePlan>,
    /// Bindings to create once exchanges and queues exist.
    pub bindings: Vec<BindingPlan>,
    /// Whether the configuration asks for the replicated topology
    /// (`topology.replicated`), so conflicts name that key.
    pub replicated: bool,
}

/// Delay tiers at least this long are lazy queues (contents on disk).
const LAZY_TIER_SECONDS: u64 = 64;

/// The arguments of a durable queue Warren owns, from the ones it needs for
/// its purpose (`base`): with `topology.replicated` it becomes a quorum queue
/// (unless `base` names another type, as the cancels stream does); a quorum
/// queue drops `x-queue-mode` (classic only) and, when it dead-letters,
/// does so at least once (`x-dead-letter-strategy = at-least-once`, which
/// needs `x-overflow = reject-publish`). Every declaration of such a queue,
/// in any process, goes through here so that they agree.
pub fn durable_queue_arguments(
    c: &Config,
    mut base: BTreeMap<String, ArgValue>,
) -> BTreeMap<String, ArgValue> {
    if c.topology.replicated && !base.contains_key("x-queue-type") {
        base.insert("x-queue-type".into(), ArgValue::Str("quorum".into()));
    }
    if base.get("x-queue-type") == Some(&ArgValue::Str("quorum".into())) {
        base.remove("x-queue-mode");
        if base.contains_key("x-dead-letter-exchange") {
            base.insert(
                "x-dead-letter-strategy".into(),
                ArgValue::Str("at-least-once".into()),
            );
            base.insert("x-overflow".into(), ArgValue::Str("reject-publish".into()));
        }
    }
    base
}

/// The arguments a work queue is declared with (its own purpose only;
/// [`work_queue_arguments`] adds what every durable queue gets).
fn work_queue_base_arguments(c: &Config, q: &QueueConfig) -> BTreeMap<String, ArgValue> {
    let dlx = c.names().dead_letter_exchange();
    match c.queue_kind(q) {
        QueueKind::Classic => args([
            ("x-dead-letter-exchange", ArgValue::Str(dlx)),
            ("x-max-priority", ArgValue::Int(q.max_priority.into())),
        ]),
        QueueKind::Quorum => args([
            ("x-dead-letter-exchange", ArgValue::Str(dlx)),
            ("x-queue-type", ArgValue::Str("quorum".into())),
        ]),
    }
}

/// The arguments of work queue `q` as declared, which its lanes and tenant
/// queues share (so they dead-letter, replicate and sort by priority
/// alike). Tenant queues are declared by workers, with these.
pub fn work_queue_arguments(c: &Config, q: &QueueConfig) -> BTreeMap<String, ArgValue> {
    durable_queue_arguments(c, work_queue_base_arguments(c, q))
}

/// The arguments of `P.q.<name>.tenants`, the directory of a work queue's
/// tenant queues: a stream (also on the replicated topology), kept whole
/// (no `x-max-age`: a record dropped would leave its tenant queue unread by
/// workers started later). It holds one short record per tenant queue,
/// plus duplicates from races.
pub fn tenant_directory_arguments() -> BTreeMap<String, ArgValue> {
    args([("x-queue-type", ArgValue::Str("stream".into()))])
}

/// The arguments of `P.tracker.published`, declared by the scheduler with
/// the topology and by the tracker that reads it: bounded to
/// `tracker.published_max_length` copies, the oldest dropped past that
/// (`drop-head`, never `reject-publish`, which would refuse producers'
/// tasks), and no dead-lettering; quorum when replicated.
pub fn published_queue_arguments(c: &Config) -> BTreeMap<String, ArgValue> {
    durable_queue_arguments(
        c,
        args([
            (
                "x-max-length",
                ArgValue::Int(i64::try_from(c.tracker.published_max_length).unwrap_or(i64::MAX)),
            ),
            ("x-overflow", ArgValue::Str("drop-head".into())),
        ]),
    )
}

/// The arguments of a paused type's queue `P.paused.<type>`, declared by
/// workers when they first park a task there: a task whose `expiration`
/// passes while parked dead-letters like one in its work queue (to the
/// scheduler, which parks it in `P.dead` as `expired`).
pub fn paused_type_queue_arguments(c: &Config) -> BTreeMap<String, ArgValue> {
    durable_queue_arguments(
        c,
        args([(
            "x-dead-letter-exchange",
            ArgValue::Str(c.names().dead_letter_exchange()),
        )]),
    )
}

/// The arguments of a chord's queue `P.chord.<id>`, declared by every
/// process that publishes a member's outcome to it or folds it: durable
/// (quorum when replicated), deleted by the broker after
/// [`QUEUE_EXPIRES_MS`](crate::chord::QUEUE_EXPIRES_MS) unused.
pub fn chord_queue_arguments(c: &Config) -> BTreeMap<String, ArgValue> {
    durable_queue_arguments(
        c,
        args([("x-expires", ArgValue::Int(crate::chord::QUEUE_EXPIRES_MS))]),
    )
}

fn args<const N: usize>(pairs: [(&str, ArgValue); N]) -> BTreeMap<String, ArgValue> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn exchange(
    name: String,
    kind: ExchangeKind,
    arguments: BTreeMap<String, ArgValue>,
    purpose: impl Into<String>,
) -> ExchangePlan {
    ExchangePlan {
        name,
        kind,
        arguments,
        purpose: purpose.into(),
    }
}

fn queue(
    name: String,
    arguments: BTreeMap<String, ArgValue>,
    purpose: impl Into<String>,
) -> QueuePlan {
    QueuePlan {
        name,
        arguments,
        purpose: purpose.into(),
    }
}

fn binding(exchange: String, queue: String, routing_key: impl Into<String>) -> BindingPlan {
    BindingPlan {
        exchange,
        queue,
        routing_key: routing_key.into(),
    }
}

impl TopologyPlan {
    /// The topology a (validated) configuration calls for.
    pub fn from_config(c: &Config) -> Self {
        use ExchangeKind::{Fanout, Topic};

        let n = c.names();
        let dlx = n.dead_letter_exchange();
        let default_queue = c.default_queue();
        let unrouted_to = match default_queue {
            Some(q) => format!("sent on to the default queue {}", n.work_queue(&q.name)),
            None => format!("parked in the queue {}", n.unroutable()),
        };

        let mut exchanges = vec![
            exchange(
                n.tasks(),
                Topic,
                args([("alternate-exchange", ArgValue::Str(n.unroutable()))]),
                "immediate tasks; routing key = task type; a type no route matches goes to the \
                 alternate exchange",
            ),
            exchange(
                n.delay(),
                Topic,
                BTreeMap::new(),
                "delayed tasks (x-delay or x-warren-eta); routing key = task type",
            ),
            exchange(
                n.events(),
                Topic,
                BTreeMap::new(),
                "status events; routing key = <state>.<task type>",
            ),
            exchange(
                n.control(),
                Fanout,
                BTreeMap::new(),
                "control commands such as {\"cancel\": \"<task id>\"}, to every worker and scheduler",
            ),
            exchange(
                n.unroutable(),
                Fanout,
                BTreeMap::new(),
                format!("tasks whose type matched no route, {unrouted_to}"),
            ),
            exchange(
                dlx.clone(),
                Fanout,
                BTreeMap::new(),
                "dead letters of work queues (expired or rejected tasks)",
            ),
            exchange(
                n.wait_due(),
                Fanout,
                BTreeMap::new(),
                "delayed tasks leaving a wait tier, back to the scheduler",
            ),
            exchange(
                n.escrow(),
                Fanout,
                BTreeMap::new(),
                "escrow copies of long tasks; routing key = their work queue",
            ),
            exchange(
                n.chords(),
                Fanout,
                BTreeMap::new(),
                "chord starts (size and callback), to the scheduler that folds chords",
            ),
        ];

        let unroutable_purpose = match default_queue {
            Some(q) => format!(
                "tasks whose type matched no route; empty while queue \"{}\" is the default",
                q.name
            ),
            None => "tasks whose type matched no route: parked, never dropped".to_string(),
        };
        // Every durable queue but the cancels stream goes through
        // `durable_queue_arguments`, which makes it quorum when replicated.
        let owned = |name: String, base: BTreeMap<String, ArgValue>, purpose: String| {
            queue(name, durable_queue_arguments(c, base), purpose)
        };
        let mut queues = vec![
            // An expired task here dead-letters to the scheduler, which parks
            // it in P.dead as `expired`: parked, never dropped.
            owned(
                n.unroutable(),
                args([("x-dead-letter-exchange", ArgValue::Str(dlx.clone()))]),
                unroutable_purpose,
            ),
            owned(
                n.dead(),
                BTreeMap::new(),
                "parking lot: tasks that reached a terminal failure".into(),
            ),
            owned(
                n.delay_intake(),
                args([("x-dead-letter-exchange", ArgValue::Str(dlx.clone()))]),
                "delayed tasks and retries, held until a scheduler takes them".into(),
            ),
            owned(
                n.wait_due(),
                BTreeMap::new(),
                "delayed tasks between wait tiers, for the scheduler's next hop or release".into(),
            ),
            queue(
                n.cancels(),
                args([
                    ("x-queue-type", ArgValue::Str("stream".into())),
                    (
                        "x-max-age",
                        ArgValue::Str(format!("{}s", c.scheduler.cancel_ttl_ms.div_ceil(1000))),
                    ),
                ]),
                "stream of cancel commands, replayed by every process on boot",
            ),
            owned(
                n.dead_letter_intake(),
                BTreeMap::new(),
                "dead-lettered tasks, for the scheduler to classify".into(),
            ),
            owned(
                n.escrow(),
                // The default exchange: an expired copy goes back to the
                // work queue its routing key names.
                args([("x-dead-letter-exchange", ArgValue::Str(String::new()))]),
                "escrow copies of tasks running past the consumer timeout, each expiring \
                 after its lease, then back to its work queue unless its worker is done"
                    .into(),
            ),
            owned(
                n.chords(),
                BTreeMap::new(),
                "chord starts, each held by the one scheduler folding its chord until its \
                 callback is published"
                    .into(),
            ),
        ];
        for t in crate::delay::tiers(c.scheduler.max_delay_ms) {
            if c.topology.replicated {
                // No TTL: dead-lettering into a quorum queue whose leader
                // just died can drop tasks (RabbitMQ 3.10), so on a cluster
                // the scheduler takes each task out when its time is up.
                queues.push(owned(
                    n.wait_tier(t),
                    BTreeMap::new(),
                    format!(
                        "delay tier: holds tasks {t} s; the scheduler takes each out when its time is up"
                    ),
                ));
                continue;
            }
            let mut arguments = args([
                ("x-dead-letter-exchange", ArgValue::Str(n.wait_due())),
                ("x-message-ttl", ArgValue::Int(t as i64 * 1000)),
            ]);
            // Long tiers may hold millions of tasks: keep them on disk. Short
            // ones turn over within seconds, where paging would only add I/O.
            if t >= LAZY_TIER_SECONDS {
                arguments.insert("x-queue-mode".into(), ArgValue::Str("lazy".into()));
            }
            queues.push(owned(
                n.wait_tier(t),
                arguments,
                format!("delay tier: holds tasks {t} s, then back to the scheduler"),
            ));
        }
        // The replicated topology releases every task from the scheduler:
        // no release tier dead-letters into a work queue there.
        let release_tiers = if c.topology.replicated {
            Vec::new()
        } else {
            crate::delay::release_tiers(c.scheduler.max_delay_ms)
        };
        for &t in &release_tiers {
            let name = n.release_tier(t);
            exchanges.push(exchange(
                name.clone(),
                Fanout,
                BTreeMap::new(),
                format!("into release tier {name}"),
            ));
            queues.push(owned(
                name,
                args([
                    ("x-dead-letter-exchange", ArgValue::Str(n.tasks())),
                    ("x-message-ttl", ArgValue::Int(t as i64 * 1000)),
                ]),
                format!(
                    "release tier: holds a task its last {t} s, then dead-letters it into {} (its work queue)",
                    n.tasks()
                ),
            ));
        }
        for q in &c.queues {
            let patterns: Vec<&str> = c
                .routes
                .iter()
                .filter(|r| r.queue == q.name)
                .map(|r| r.pattern.as_str())
                .collect();
            let mut receives = Vec::new();
            if !patterns.is_empty() {
                receives.push(format!("routes {}", patterns.join(", ")));
            }
            if q.default {
                receives.push("every type no route matches (default queue)".to_string());
            }
            let routed = if receives.is_empty() {
                "no routes".to_string()
            } else {
                receives.join("; ")
            };
            let arguments = work_queue_base_arguments(c, q);
            let kind = match c.queue_kind(q) {
                QueueKind::Classic => format!("classic, priorities 0..={}", q.max_priority),
                QueueKind::Quorum => match c.queue_bands(q) {
                    Some(b) => format!(
                        "quorum, replicated, priorities 0..={} sorted by workers into {} lanes",
                        q.max_priority,
                        b.lanes()
                    ),
                    None => "quorum, replicated, no priorities".to_string(),
                },
            };
            queues.push(owned(
                n.work_queue(&q.name),
                arguments.clone(),
                format!("work queue \"{}\" ({kind}): {routed}", q.name),
            ));
            // Lanes: same arguments as the entry, so they dead-letter and
            // replicate alike; filled by workers only, so never bound.
            if let Some(b) = c.queue_bands(q) {
                for k in 0..b.lanes() {
                    let (low, high) = b.band(k).unwrap_or((0, 0));
                    queues.push(owned(
                        n.lane_queue(&q.name, k),
                        arguments.clone(),
                        format!(
                            "lane {k} of work queue \"{}\": priorities {low}..={high}, moved \
                             here by workers from {}",
                            q.name,
                            n.work_queue(&q.name)
                        ),
                    ));
                }
            }
            if q.tenants {
                queues.push(queue(
                    crate::tenants::directory(&n, &q.name),
                    tenant_directory_arguments(),
                    format!(
                        "directory of the tenant queues of work queue \"{}\" (at most {} and \
                         the overflow, {}.tenant.<hash|overflow>, declared by workers): every \
                         worker reads it from the start and consumes each",
                        q.name,
                        q.tenants_max,
                        n.work_queue(&q.name)
                    ),
                ));
            }
        }

        let mut bindings: Vec<BindingPlan> = c
            .routes
            .iter()
            .map(|r| binding(n.tasks(), n.work_queue(&r.queue), r.pattern.clone()))
            .collect();
        bindings.push(binding(n.delay(), n.delay_intake(), "#"));
        bindings.push(binding(dlx, n.dead_letter_intake(), ""));
        bindings.push(binding(n.wait_due(), n.wait_due(), ""));
        for &t in &release_tiers {
            bindings.push(binding(n.release_tier(t), n.release_tier(t), ""));
        }
        bindings.push(binding(n.control(), n.cancels(), ""));
        bindings.push(binding(n.escrow(), n.escrow(), ""));
        bindings.push(binding(n.chords(), n.chords(), ""));
        let unrouted_queue = match default_queue {
            Some(q) => n.work_queue(&q.name),
            None => n.unroutable(),
        };
        bindings.push(binding(n.unroutable(), unrouted_queue, ""));
        if c.tracker.track_published {
            // A copy of every task that reaches a work queue or waits for
            // its time. Bound with the routes' own patterns, never `#`: a
            // task no route matches must still go to the alternate exchange.
            let published = n.tracker_published();
            queues.push(queue(
                published.clone(),
                published_queue_arguments(c),
                "copies of the tasks published, read by the tracker to show them from \
                 publication on; bounded, the oldest dropped",
            ));
            for r in &c.routes {
                bindings.push(binding(n.tasks(), published.clone(), r.pattern.clone()));
            }
            if default_queue.is_some() {
                bindings.push(binding(n.unroutable(), published.clone(), ""));
            }
            bindings.push(binding(n.delay(), published, "#"));
        }

        Self {
            exchanges,
            queues,
            bindings,
            replicated: c.topology.replicated,
        }
    }

    /// A listing for `warren topology show`: one exchange, queue or binding
    /// per line, arguments inline, purposes as `#` comments.
    pub fn render(&self) -> String {
        let mut out = String::new();

        out.push_str("# exchanges (all durable)\n");
        let rows: Vec<[String; 3]> = self
            .exchanges
            .iter()
            .map(|e| {
                [
                    format!("exchange {}", e.name),
                    format!("{}{}", e.kind, render_args(&e.arguments)),
                    e.purpose.clone(),
                ]
            })
            .collect();
        push_rows(&mut out, &rows);

        out.push_str(if self.replicated {
            "\n# queues (all durable; replicated: every queue but the cancels stream is quorum)\n"
        } else {
            "\n# queues (all durable)\n"
        });
        let rows: Vec<[String; 3]> = self
            .queues
            .iter()
            .map(|q| {
                [
                    format!("queue {}", q.name),
                    render_args(&q.arguments).trim_start().to_string(),
                    q.purpose.clone(),
                ]
            })
            .collect();
        push_rows(&mut out, &rows);

        out.push_str("\n# bindings (exchange -> queue, binding key)\n");
        let rows: Vec<[String; 3]> = self
            .bindings
            .iter()
            .map(|b| {
                [
                    format!("bind {} -> {}", b.exchange, b.queue),
                    format!("key {:?}", b.routing_key),
                    String::new(),
                ]
            })
            .collect();
        push_rows(&mut out, &rows);
        out
    }

    /// Explains a broker `PRECONDITION_FAILED` reply to a declaration, such as
    /// `inequivalent arg 'x-max-priority' for queue 'warren.q.io' in vhost
    /// '/': received '10' but current is '5'`, as one line naming the object,
    /// the difference and the fix. Text it cannot parse is returned with
    /// generic advice.
    pub fn explain_conflict(&self, broker_text: &str) -> String {
        match Conflict::parse(broker_text) {
            Some(conflict) => conflict.explain(self),
            None => format!(
                "{}: the broker refused to declare an object that already exists with other \
                 settings; compare `warren topology show` with the object on the broker, then \
                 delete that object (a queue's messages are lost) or change the configuration \
                 to match",
                broker_text.trim()
            ),
        }
    }
}

fn render_args(arguments: &BTreeMap<String, ArgValue>) -> String {
    arguments.iter().map(|(k, v)| format!(" {k}={v}")).collect()
}

/// Writes rows as aligned columns, the last column as a `#` comment.
fn push_rows(out: &mut String, rows: &[[String; 3]]) {
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0);
    for [what, detail, purpose] in rows {
        let line = if purpose.is_empty() {
            format!("{what:<w0$}  {detail}")
        } else {
            format!("{what:<w0$}  {detail:<w1$}  # {purpose}")
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// A parsed "inequivalent arg" reply.
struct Conflict<'a> {
    arg: &'a str,
    object: &'a str,
    name: &'a str,
    /// What Warren sent (the configuration); `None` when it sent no value.
    wanted: Option<&'a str>,
    /// What the broker has; `None` when the existing object lacks the arg.
    current: Option<&'a str>,
}

impl<'a> Conflict<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        const MARK: &str = "inequivalent arg '";
        let rest = &text[text.find(MARK)? + MARK.len()..];
        let (arg, rest) = rest.split_once("' for ")?;
        let (object, rest) = rest.split_once(" '")?;
        if object != "queue" && object != "exchange" {
            return None;
        }
        let (name, rest) = rest.split_once("' in vhost '")?;
        let (_vhost, rest) = rest.split_once("': received ")?;
        let (wanted, current) = rest.split_once(" but current is ")?;
        Some(Self {
            arg,
            object,
            name,
            wanted: parse_reported_value(wanted)?,
            current: parse_reported_value(current)?,
        })
    }

    fn explain(&self, plan: &TopologyPlan) -> String {
        let have = match self.current {
            Some(v) => format!("with {} {v}", self.arg),
            None => format!("without {}", self.arg),
        };
        let want = match self.wanted {
            Some(v) => format!("config says {v}"),
            None => "config sets none".to_string(),
        };
        let delete = match self.object {
            "queue" => "delete the queue (its messages are lost)",
            _ => "delete the exchange (its bindings go with it; Warren declares its own again)",
        };
        let short = (self.object == "queue")
            .then(|| work_queue_short_name(plan, self.name))
            .flatten();
        let ours = self.object == "queue" && plan.queues.iter().any(|q| q.name == self.name);
        // Arguments that differ between the classic and the replicated
        // declaration of the same queue.
        let switched = ours
            && matches!(
                self.arg,
                "x-queue-type" | "x-queue-mode" | "x-overflow" | "x-dead-letter-strategy"
            );
        let move_out = "a queue cannot change type or arguments in place: stop Warren and run \
                        `warren topology migrate`, which moves its messages out, declares it \
                        again and moves them back";
        let fix = match (self.arg, short, self.current) {
            ("x-max-priority", Some(short), Some(current))
                if current.parse::<u8>().is_ok_and(|v| v >= 1) =>
            {
                format!("{delete} or set max_priority = {current} in [[queues]] name = \"{short}\"")
            }
            _ if switched && plan.replicated && self.current != Some("quorum") => format!(
                "it was declared without topology.replicated = true; {move_out}, or set \
                 topology.replicated = false"
            ),
            _ if switched && !plan.replicated && short.is_none() && self.current.is_some() => {
                format!(
                    "it was declared with topology.replicated = true; set it again, or \
                     {move_out}",
                )
            }
            ("x-dead-letter-exchange" | "x-dead-letter-strategy" | "x-overflow", _, None)
                if ours =>
            {
                format!(
                    "it was declared by an earlier Warren without it (an expired task could \
                     vanish from {} before; at-least-once dead-lettering needs both \
                     x-dead-letter-strategy and x-overflow); {move_out}",
                    self.name
                )
            }
            ("x-queue-type", Some(short), current) => match current.unwrap_or("classic") {
                kind @ ("classic" | "quorum") => {
                    format!("{delete} or set type = \"{kind}\" in [[queues]] name = \"{short}\"")
                }
                _ => format!("{delete} so Warren can declare it again"),
            },
            ("x-dead-letter-exchange" | "alternate-exchange", ..) => format!(
                "it was declared by something else (another tool, or a Warren with another \
                 setup): {delete} so Warren can declare it again, or choose another prefix"
            ),
            _ => format!(
                "{delete} so Warren can declare it again, or change the configuration to match"
            ),
        };
        format!("{} {} exists {have}, {want}: {fix}", self.object, self.name)
    }
}

impl TopologyPlan {
    /// Explains the broker's refusal of a quorum queue in the plan (a
    /// broker before 3.10, or with quorum queues not enabled) as one line
    /// naming the setting that asked for it; `None` when `queue` is not a
    /// quorum queue of the plan or the reply is a conflict with an existing
    /// queue ([`TopologyPlan::explain_conflict`]).
    pub fn explain_quorum_refusal(&self, queue: &str, broker_text: &str) -> Option<String> {
        let q = self.queues.iter().find(|q| q.name == queue)?;
        if q.arguments.get("x-queue-type") != Some(&ArgValue::Str("quorum".into()))
            || broker_text.contains("inequivalent arg")
        {
            return None;
        }
        let (setting, undo) = match work_queue_short_name(self, queue) {
            Some(short) if !self.replicated => (
                format!("type = \"quorum\" in [[queues]] name = \"{short}\""),
                "set type = \"classic\" there",
            ),
            _ => (
                "topology.replicated = true".to_string(),
                "set topology.replicated = false",
            ),
        };
        Some(format!(
            "queue {queue}: the broker refused to declare it as a quorum queue ({}): {setting} \
             needs RabbitMQ 3.10 or later with quorum queues enabled (`rabbitmqctl \
             enable_feature_flag all`); upgrade the broker or {undo}",
            broker_text.trim()
        ))
    }
}

/// Reads `'10'`, `the value '10' of type 'signedint'` or `none`.
fn parse_reported_value(text: &str) -> Option<Option<&str>> {
    let text = text.trim_start();
    if text.starts_with("none") {
        return Some(None);
    }
    let quoted = text.strip_prefix("the value ").unwrap_or(text);
    let inner = quoted.strip_prefix('\'')?;
    let end = inner.find('\'')?;
    Some(Some(&inner[..end]))
}

/// The `[[queues]]` name of a work queue or lane in the plan (`warren.q.io`
/// and `warren.q.io.lane.1` -> `io`).
fn work_queue_short_name<'a>(plan: &TopologyPlan, name: &'a str) -> Option<&'a str> {
    let is_work_queue = plan
        .queues
        .iter()
        .any(|q| q.name == name && q.arguments.contains_key("x-dead-letter-exchange"));
    let (_, short) = name.rsplit_once(".q.")?;
    let short = short.split_once(".lane.").map_or(short, |(queue, _)| queue);
    is_work_queue.then_some(short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(toml: &str) -> TopologyPlan {
        TopologyPlan::from_config(&Config::from_toml(toml).unwrap())
    }

    fn queue<'a>(p: &'a TopologyPlan, name: &str) -> &'a QueuePlan {
        p.queues
            .iter()
            .find(|q| q.name == name)
            .unwrap_or_else(|| panic!("no queue {name}"))
    }

    fn bindings(p: &TopologyPlan) -> Vec<(&str, &str, &str)> {
        p.bindings
            .iter()
            .filter(|b| !b.queue.contains(".release."))
            .map(|b| {
                (
                    b.exchange.as_str(),
                    b.queue.as_str(),
                    b.routing_key.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn default_plan() {
        let p = plan("");
        let exchanges: Vec<(&str, ExchangeKind)> = p
            .exchanges
            .iter()
            .filter(|e| !e.name.starts_with("warren.release."))
            .map(|e| (e.name.as_str(), e.kind))
            .collect();
        assert_eq!(
            exchanges,
            [
                ("warren.tasks", ExchangeKind::Topic),
                ("warren.delay", ExchangeKind::Topic),
                ("warren.events", ExchangeKind::Topic),
                ("warren.control", ExchangeKind::Fanout),
                ("warren.unroutable", ExchangeKind::Fanout),
                ("warren.dlx", ExchangeKind::Fanout),
                ("warren.wait.due", ExchangeKind::Fanout),
                ("warren.escrow", ExchangeKind::Fanout),
                ("warren.chords", ExchangeKind::Fanout),
            ]
        );
        assert_eq!(
            p.exchanges[0].arguments,
            args([(
                "alternate-exchange",
                ArgValue::Str("warren.unroutable".into())
            )])
        );
        assert!(p.exchanges[1..].iter().all(|e| e.arguments.is_empty()));

        let queues: Vec<&str> = p
            .queues
            .iter()
            .map(|q| q.name.as_str())
            .filter(|q| !q.starts_with("warren.wait.") || *q == "warren.wait.due")
            .filter(|q| !q.starts_with("warren.release."))
            .collect();
        assert_eq!(
            queues,
            [
                "warren.unroutable",
                "warren.dead",
                "warren.delay.intake",
                "warren.wait.due",
                "warren.cancels",
                "warren.dlx.intake",
                "warren.escrow",
                "warren.chords",
                "warren.q.io",
                "warren.q.cpu",
                "warren.q.diag",
                "warren.tracker.published",
            ]
        );
        assert_eq!(
            queue(&p, "warren.tracker.published").arguments,
            args([
                ("x-max-length", ArgValue::Int(100_000)),
                ("x-overflow", ArgValue::Str("drop-head".into())),
            ]),
            "bounded, never refusing a producer's task, no dead letters"
        );
        let replicated = plan("[topology]\nreplicated = true\n");
        assert_eq!(
            queue(&replicated, "warren.tracker.published").arguments,
            args([
                ("x-max-length", ArgValue::Int(100_000)),
                ("x-overflow", ArgValue::Str("drop-head".into())),
                ("x-queue-type", ArgValue::Str("quorum".into())),
            ])
        );
        let off = plan("[tracker]\ntrack_published = false\n");
        assert!(off
            .queues
            .iter()
            .all(|q| q.name != "warren.tracker.published"));
        assert!(off
            .bindings
            .iter()
            .all(|b| b.queue != "warren.tracker.published"));
        let tiers: Vec<&str> = p
            .queues
            .iter()
            .map(|q| q.name.as_str())
            .filter(|q| q.starts_with("warren.wait.") && *q != "warren.wait.due")
            .collect();
        assert_eq!(
            tiers.len(),
            15 + 25,
            "1 s .. 15 s, then 16 s .. 2^28 s for the default 10-year maximum"
        );
        assert_eq!(tiers[0], "warren.wait.1s");
        assert!(
            !queue(&p, "warren.wait.32s")
                .arguments
                .contains_key("x-queue-mode"),
            "short tiers stay in memory"
        );
        assert_eq!(
            queue(&p, "warren.wait.64s").arguments,
            args([
                (
                    "x-dead-letter-exchange",
                    ArgValue::Str("warren.wait.due".into())
                ),
                ("x-message-ttl", ArgValue::Int(64_000)),
                ("x-queue-mode", ArgValue::Str("lazy".into())),
            ])
        );
        let release: Vec<&str> = p
            .queues
            .iter()
            .map(|q| q.name.as_str())
            .filter(|q| q.starts_with("warren.release."))
            .collect();
        let want: Vec<String> = (1..=15).map(|n| format!("warren.release.{n}s")).collect();
        assert_eq!(release, want, "a release tier for every second up to 15 s");
        assert_eq!(
            queue(&p, "warren.release.3s").arguments,
            args([
                (
                    "x-dead-letter-exchange",
                    ArgValue::Str("warren.tasks".into())
                ),
                ("x-message-ttl", ArgValue::Int(3_000)),
            ])
        );
        for name in &want {
            let x = p.exchanges.iter().find(|e| &e.name == name).expect(name);
            assert_eq!(x.kind, ExchangeKind::Fanout);
            assert!(p
                .bindings
                .iter()
                .any(|b| &b.exchange == name && &b.queue == name && b.routing_key.is_empty()));
        }
        assert_eq!(
            queue(&p, "warren.cancels").arguments["x-queue-type"],
            ArgValue::Str("stream".into())
        );
        assert_eq!(
            queue(&p, "warren.q.io").arguments,
            args([
                ("x-dead-letter-exchange", ArgValue::Str("warren.dlx".into())),
                ("x-max-priority", ArgValue::Int(10)),
            ])
        );
        assert!(queue(&p, "warren.dead").arguments.is_empty());
        assert_eq!(
            queue(&p, "warren.delay.intake").arguments,
            args([("x-dead-letter-exchange", ArgValue::Str("warren.dlx".into()))])
        );

        assert_eq!(
            bindings(&p),
            [
                ("warren.tasks", "warren.q.diag", "diag.*"),
                ("warren.tasks", "warren.q.io", "http.*"),
                ("warren.tasks", "warren.q.io", "file.*"),
                ("warren.delay", "warren.delay.intake", "#"),
                ("warren.dlx", "warren.dlx.intake", ""),
                ("warren.wait.due", "warren.wait.due", ""),
                ("warren.control", "warren.cancels", ""),
                ("warren.escrow", "warren.escrow", ""),
                ("warren.chords", "warren.chords", ""),
                ("warren.unroutable", "warren.unroutable", ""),
                ("warren.tasks", "warren.tracker.published", "diag.*"),
                ("warren.tasks", "warren.tracker.published", "http.*"),
                ("warren.tasks", "warren.tracker.published", "file.*"),
                ("warren.delay", "warren.tracker.published", "#"),
            ]
        );
        assert_eq!(
            queue(&p, "warren.escrow").arguments,
            args([("x-dead-letter-exchange", ArgValue::Str(String::new()))]),
            "expired escrow copies go back through the default exchange"
        );
    }

    #[test]
    fn default_queue_receives_unrouted_types() {
        let p = plan(
            "prefix = \"acme\"\n[[queues]]\nname = \"main\"\ndefault = true\n\
             [[queues]]\nname = \"diag\"\n\
             [[routes]]\npattern = \"diag.*\"\nqueue = \"diag\"\n",
        );
        assert_eq!(
            bindings(&p),
            [
                ("acme.tasks", "acme.q.diag", "diag.*"),
                ("acme.delay", "acme.delay.intake", "#"),
                ("acme.dlx", "acme.dlx.intake", ""),
                ("acme.wait.due", "acme.wait.due", ""),
                ("acme.control", "acme.cancels", ""),
                ("acme.escrow", "acme.escrow", ""),
                ("acme.chords", "acme.chords", ""),
                ("acme.unroutable", "acme.q.main", ""),
                ("acme.tasks", "acme.tracker.published", "diag.*"),
                ("acme.unroutable", "acme.tracker.published", ""),
                ("acme.delay", "acme.tracker.published", "#"),
            ]
        );
        // The unroutable queue still exists, so earlier parked tasks stay visible.
        assert!(p.queues.iter().any(|q| q.name == "acme.unroutable"));
    }

    #[test]
    fn quorum_queue_has_no_priority() {
        let p = plan("[[queues]]\nname = \"io\"\ntype = \"quorum\"\nmax_priority = 5\n[[queues]]\nname = \"cpu\"\n[[queues]]\nname = \"diag\"\n");
        assert_eq!(
            queue(&p, "warren.q.io").arguments,
            args([
                ("x-dead-letter-exchange", ArgValue::Str("warren.dlx".into())),
                (
                    "x-dead-letter-strategy",
                    ArgValue::Str("at-least-once".into())
                ),
                ("x-overflow", ArgValue::Str("reject-publish".into())),
                ("x-queue-type", ArgValue::Str("quorum".into())),
            ])
        );
        assert_eq!(
            queue(&p, "warren.q.cpu").arguments["x-max-priority"],
            ArgValue::Int(10)
        );
        // One quorum work queue leaves the rest of the topology classic.
        assert!(!queue(&p, "warren.dead")
            .arguments
            .contains_key("x-queue-type"));
        assert!(!p.replicated);
    }

    #[test]
    fn replicated_makes_every_durable_queue_quorum() {
        let p = plan("[topology]\nreplicated = true\n");
        assert!(p.replicated);
        let quorum = ArgValue::Str("quorum".into());
        for q in &p.queues {
            let a = &q.arguments;
            if q.name == "warren.cancels" {
                assert_eq!(a["x-queue-type"], ArgValue::Str("stream".into()));
                continue;
            }
            assert_eq!(a.get("x-queue-type"), Some(&quorum), "{}", q.name);
            assert!(
                !a.contains_key("x-queue-mode"),
                "{}: no lazy on quorum",
                q.name
            );
            assert!(!a.contains_key("x-max-priority"), "{}", q.name);
            if a.contains_key("x-dead-letter-exchange") {
                assert_eq!(
                    a["x-dead-letter-strategy"],
                    ArgValue::Str("at-least-once".into()),
                    "{}",
                    q.name
                );
                assert_eq!(
                    a["x-overflow"],
                    ArgValue::Str("reject-publish".into()),
                    "{}",
                    q.name
                );
            } else {
                assert!(!a.contains_key("x-dead-letter-strategy"), "{}", q.name);
            }
        }
        // The wait tiers have no TTL (the scheduler reads them), and there
        // are no release tiers: nothing dead-letters a delayed task.
        assert_eq!(
            queue(&p, "warren.wait.64s").arguments,
            args([("x-queue-type", quorum.clone())])
        );
        assert!(p.queues.iter().all(|q| !q.name.contains(".release.")));
        assert!(p.exchanges.iter().all(|e| !e.name.contains(".release.")));
        // Every other queue that dead-letters in the classic plan does so here too.
        let classic = plan("");
        let tier = |name: &str| name.contains(".wait.") && name != "warren.wait.due";
        let release = |name: &str| name.contains(".release.");
        for q in classic
            .queues
            .iter()
            .filter(|q| !tier(&q.name) && !release(&q.name))
        {
            let r = queue(&p, &q.name);
            assert_eq!(
                q.arguments.get("x-dead-letter-exchange"),
                r.arguments.get("x-dead-letter-exchange"),
                "{}",
                q.name
            );
            assert_eq!(
                q.arguments.get("x-message-ttl"),
                r.arguments.get("x-message-ttl"),
                "{}",
                q.name
            );
        }
        // The same queues, plus the priority lanes of the (now quorum) work
        // queues, which are never bound.
        let not_lanes = p.queues.iter().filter(|q| !q.name.contains(".lane."));
        let not_release = classic.queues.iter().filter(|q| !release(&q.name));
        assert_eq!(not_release.count(), not_lanes.count());
        let kept = |b: &&BindingPlan| !release(&b.queue);
        let classic_bindings: Vec<_> = classic.bindings.iter().filter(kept).collect();
        assert_eq!(classic_bindings, p.bindings.iter().collect::<Vec<_>>());
        let classic_exchanges: Vec<_> = classic
            .exchanges
            .iter()
            .filter(|e| !release(&e.name))
            .collect();
        assert_eq!(classic_exchanges, p.exchanges.iter().collect::<Vec<_>>());
        let text = p.render();
        assert!(text.contains("replicated: every queue but the cancels stream is quorum"));
        let dead = text
            .lines()
            .find(|l| l.starts_with("queue warren.dead "))
            .unwrap();
        assert!(dead.contains("x-queue-type=quorum"), "{dead}");
    }

    #[test]
    fn owned_queue_arguments_outside_the_plan() {
        let classic = Config::from_toml("").unwrap();
        let replicated = Config::from_toml("[topology]\nreplicated = true\n").unwrap();
        let base = args([("x-max-length", ArgValue::Int(1))]);
        assert_eq!(durable_queue_arguments(&classic, base.clone()), base);
        assert_eq!(
            durable_queue_arguments(&replicated, base),
            args([
                ("x-max-length", ArgValue::Int(1)),
                ("x-queue-type", ArgValue::Str("quorum".into())),
            ])
        );
        assert!(durable_queue_arguments(&classic, BTreeMap::new()).is_empty());
    }

    #[test]
    fn unroutable_dead_letters_in_both_topologies() {
        for toml in ["", "[topology]\nreplicated = true\n"] {
            let p = plan(toml);
            assert_eq!(
                queue(&p, "warren.unroutable").arguments["x-dead-letter-exchange"],
                ArgValue::Str("warren.dlx".into()),
                "{toml}"
            );
        }
    }

    #[test]
    fn explains_replication_conflicts() {
        let p = plan("[topology]\nreplicated = true\n");
        assert_eq!(
            p.explain_conflict(
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'warren.dead' \
                 in vhost '/': received the value 'quorum' of type 'longstr' but current is \
                 the value 'classic' of type 'longstr'"
            ),
            "queue warren.dead exists with x-queue-type classic, config says quorum: it was \
             declared without topology.replicated = true; a queue cannot change type or \
             arguments in place: stop Warren and run `warren topology migrate`, which moves \
             its messages out, declares it again and moves them back, or set \
             topology.replicated = false"
        );
        let work = p.explain_conflict(
            "inequivalent arg 'x-queue-mode' for queue 'warren.wait.64s' in vhost '/': \
             received none but current is the value 'lazy' of type 'longstr'",
        );
        assert!(
            work.ends_with("or set topology.replicated = false"),
            "{work}"
        );
        let work = p.explain_conflict(
            "inequivalent arg 'x-queue-type' for queue 'warren.q.io' in vhost '/': received \
             the value 'quorum' of type 'longstr' but current is none",
        );
        assert!(
            work.ends_with("or set topology.replicated = false"),
            "{work}"
        );

        let back = plan("").explain_conflict(
            "inequivalent arg 'x-queue-type' for queue 'warren.dead' in vhost '/': received \
             none but current is the value 'quorum' of type 'longstr'",
        );
        let strategy = plan("").explain_conflict(
            "inequivalent arg 'x-dead-letter-strategy' for queue 'warren.unroutable' in vhost \
             '/': received none but current is the value 'at-least-once' of type 'longstr'",
        );
        assert!(
            strategy.contains("it was declared with topology.replicated = true; set it again"),
            "{strategy}"
        );
        assert_eq!(
            back,
            "queue warren.dead exists with x-queue-type quorum, config sets none: it was \
             declared with topology.replicated = true; set it again, or a queue cannot change \
             type or arguments in place: stop Warren and run `warren topology migrate`, \
             which moves its messages out, declares it again and moves them back"
        );
    }

    #[test]
    fn explains_the_old_unroutable_queue() {
        let text = plan("").explain_conflict(
            "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue \
             'warren.unroutable' in vhost '/': received the value 'warren.dlx' of type \
             'longstr' but current is none",
        );
        assert!(
            text.starts_with(
                "queue warren.unroutable exists without x-dead-letter-exchange, config says \
                 warren.dlx: it was declared by an earlier Warren without it"
            ),
            "{text}"
        );
        assert!(text.contains("warren topology migrate"), "{text}");
    }

    #[test]
    fn explains_a_refused_quorum_queue() {
        let p = plan("[topology]\nreplicated = true\n");
        assert_eq!(
            p.explain_quorum_refusal(
                "warren.dead",
                "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue 'warren.dead' "
            )
            .unwrap(),
            "queue warren.dead: the broker refused to declare it as a quorum queue \
             (PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue 'warren.dead'): \
             topology.replicated = true needs RabbitMQ 3.10 or later with quorum queues enabled \
             (`rabbitmqctl enable_feature_flag all`); upgrade the broker or set \
             topology.replicated = false"
        );
        assert!(p
            .explain_quorum_refusal(
                "warren.dead",
                "inequivalent arg 'x-queue-type' for queue 'warren.dead' in vhost '/': x"
            )
            .is_none());
        assert!(p
            .explain_quorum_refusal("warren.cancels", "NOT_ALLOWED")
            .is_none());
        let one = plan(
            "[[queues]]\nname = \"io\"\ntype = \"quorum\"\n\
             [[routes]]\npattern = \"#\"\nqueue = \"io\"\n",
        );
        let text = one.explain_quorum_refusal("warren.q.io", "boom").unwrap();
        assert!(
            text.ends_with(
                "type = \"quorum\" in [[queues]] name = \"io\" needs RabbitMQ 3.10 or later \
                 with quorum queues enabled (`rabbitmqctl enable_feature_flag all`); upgrade the \
                 broker or set type = \"classic\" there"
            ),
            "{text}"
        );
        assert!(plan("")
            .explain_quorum_refusal("warren.dead", "boom")
            .is_none());
    }

    #[test]
    fn a_queue_with_tenants_gets_its_directory_stream() {
        let p = plan(
            "[[queues]]\nname = \"io\"\ntenants = true\ntenants_max = 5\n\
             [[queues]]\nname = \"cpu\"\n\
             [[routes]]\npattern = \"#\"\nqueue = \"io\"\n",
        );
        let dir = queue(&p, "warren.q.io.tenants");
        assert_eq!(dir.arguments, tenant_directory_arguments());
        assert!(dir.purpose.contains("at most 5"), "{}", dir.purpose);
        assert!(p.queues.iter().all(|q| q.name != "warren.q.cpu.tenants"));
        assert!(p.bindings.iter().all(|b| !b.queue.contains(".tenant")));
        let c = Config::from_toml(
            "[[queues]]\nname = \"io\"\ntenants = true\n\
             [[routes]]\npattern = \"#\"\nqueue = \"io\"\n",
        )
        .unwrap();
        assert_eq!(
            work_queue_arguments(&c, &c.queues[0]),
            queue(&p, "warren.q.io").arguments,
            "tenant queues are declared like their work queue"
        );
        // Replicated: still a stream.
        let r = plan(
            "[topology]\nreplicated = true\n[[queues]]\nname = \"io\"\ntenants = true\n\
             [[routes]]\npattern = \"#\"\nqueue = \"io\"\n",
        );
        assert_eq!(
            queue(&r, "warren.q.io.tenants").arguments,
            tenant_directory_arguments()
        );
    }

    #[test]
    fn quorum_queue_with_priorities_gets_lanes() {
        let p = plan(
            "[[queues]]\nname = \"io\"\ntype = \"quorum\"\n\
             [[queues]]\nname = \"cpu\"\ntype = \"quorum\"\nlanes = 1\n\
             [[queues]]\nname = \"diag\"\nlanes = 4\n\
             [[queues]]\nname = \"two\"\ntype = \"quorum\"\nmax_priority = 1\n",
        );
        let lanes: Vec<&str> = p
            .queues
            .iter()
            .map(|q| q.name.as_str())
            .filter(|q| q.contains(".lane."))
            .collect();
        assert_eq!(
            lanes,
            [
                "warren.q.io.lane.0",
                "warren.q.io.lane.1",
                "warren.q.io.lane.2",
                "warren.q.two.lane.0",
                "warren.q.two.lane.1",
            ],
            "default 3 lanes; lanes = 1 means none; classic queues have none; at most one \
             lane per priority"
        );
        let entry = queue(&p, "warren.q.io");
        for k in 0..3 {
            let lane = queue(&p, &format!("warren.q.io.lane.{k}"));
            assert_eq!(lane.arguments, entry.arguments);
        }
        assert!(queue(&p, "warren.q.io.lane.2")
            .purpose
            .contains("priorities 8..=10"));
        assert!(entry.purpose.contains("sorted by workers into 3 lanes"));
        assert!(
            p.bindings.iter().all(|b| !b.queue.contains(".lane.")),
            "lanes are never bound"
        );
        assert_eq!(
            queue(&p, "warren.q.diag").arguments["x-max-priority"],
            ArgValue::Int(10)
        );
        assert_eq!(
            p.explain_conflict(
                "inequivalent arg 'x-queue-type' for queue 'warren.q.io.lane.1' in vhost '/': \
                 received the value 'quorum' of type 'longstr' but current is none"
            ),
            "queue warren.q.io.lane.1 exists without x-queue-type, config says quorum: delete \
             the queue (its messages are lost) or set type = \"classic\" in [[queues]] name = \
             \"io\""
        );
    }

    #[test]
    fn arguments_convert_to_amqp() {
        let table = field_table(&args([
            ("x-max-priority", ArgValue::Int(10)),
            ("big", ArgValue::Int(1 << 40)),
            ("x-dead-letter-exchange", ArgValue::Str("warren.dlx".into())),
        ]));
        let inner = table.inner();
        assert_eq!(inner["x-max-priority"], AMQPValue::LongInt(10));
        assert_eq!(inner["big"], AMQPValue::LongLongInt(1 << 40));
        assert_eq!(
            inner["x-dead-letter-exchange"],
            AMQPValue::LongString("warren.dlx".into())
        );
        assert_eq!(ArgValue::Int(7).to_string(), "7");
        assert_eq!(ExchangeKind::Direct.as_str(), "direct");
    }

    #[test]
    fn render_lists_everything_with_purposes() {
        let text = plan("").render();
        assert!(text.contains("exchange warren.tasks"), "{text}");
        assert!(
            text.contains("topic alternate-exchange=warren.unroutable"),
            "{text}"
        );
        let io = text
            .lines()
            .find(|l| l.starts_with("queue warren.q.io "))
            .unwrap();
        assert!(
            io.contains("x-dead-letter-exchange=warren.dlx x-max-priority=10"),
            "{io}"
        );
        assert!(
            io.contains("# work queue \"io\" (classic, priorities 0..=10): routes http.*, file.*"),
            "{io}"
        );
        assert!(
            text.contains("bind warren.tasks -> warren.q.diag"),
            "{text}"
        );
        assert!(text.contains("key \"diag.*\""), "{text}");
        assert!(
            text.contains("bind warren.unroutable -> warren.unroutable"),
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("exchange ")).count(),
            9 + 15
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("queue ")).count(),
            12 + 40 + 15
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("bind ")).count(),
            10 + 4 + 15
        );
        assert!(text.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn explains_priority_conflict() {
        let p = plan("");
        assert_eq!(
            p.explain_conflict(
                "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue \
                 'warren.q.io' in vhost '/': received '10' but current is '5'"
            ),
            "queue warren.q.io exists with x-max-priority 5, config says 10: delete the queue \
             (its messages are lost) or set max_priority = 5 in [[queues]] name = \"io\""
        );
        assert_eq!(
            p.explain_conflict(
                "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue \
                 'warren.q.io' in vhost '/': received the value '10' of type 'signedint' but \
                 current is none"
            ),
            "queue warren.q.io exists without x-max-priority, config says 10: delete the queue \
             (its messages are lost) so Warren can declare it again, or change the \
             configuration to match"
        );
    }

    #[test]
    fn explains_queue_type_conflict() {
        let p = plan("");
        assert_eq!(
            p.explain_conflict(
                "inequivalent arg 'x-queue-type' for queue 'warren.q.io' in vhost '/': \
                 received none but current is the value 'quorum' of type 'longstr'"
            ),
            "queue warren.q.io exists with x-queue-type quorum, config sets none: delete the \
             queue (its messages are lost) or set type = \"quorum\" in [[queues]] name = \"io\""
        );
    }

    #[test]
    fn explains_exchange_conflicts() {
        let p = plan("");
        assert_eq!(
            p.explain_conflict(
                "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'warren.tasks' in \
                 vhost '/': received 'topic' but current is 'direct'"
            ),
            "exchange warren.tasks exists with type direct, config says topic: delete the \
             exchange (its bindings go with it; Warren declares its own again) so Warren can \
             declare it again, or change the configuration to match"
        );
        assert_eq!(
            p.explain_conflict(
                "inequivalent arg 'durable' for exchange 'warren.events' in vhost 'prod': \
                 received 'true' but current is 'false'"
            ),
            "exchange warren.events exists with durable false, config says true: delete the \
             exchange (its bindings go with it; Warren declares its own again) so Warren can \
             declare it again, or change the configuration to match"
        );
        assert_eq!(
            p.explain_conflict(
                "inequivalent arg 'alternate-exchange' for exchange 'warren.tasks' in vhost \
                 '/': received the value 'warren.unroutable' of type 'longstr' but current is \
                 none"
            ),
            "exchange warren.tasks exists without alternate-exchange, config says \
             warren.unroutable: it was declared by something else (another tool, or a Warren \
             with another setup): delete the exchange (its bindings go with it; Warren \
             declares its own again) so Warren can declare it again, or choose another prefix"
        );
    }

    #[test]
    fn unparseable_conflict_keeps_the_raw_text() {
        let p = plan("");
        let text = p.explain_conflict("PRECONDITION_FAILED - something new ");
        assert!(
            text.starts_with("PRECONDITION_FAILED - something new: the broker refused"),
            "{text}"
        );
        assert!(text.contains("warren topology show"), "{text}");
    }
}
