//! Cron schedules (`[[cron]]`), fired by exactly one scheduler replica.
//!
//! **Leadership.** Every replica with schedules keeps one broker connection
//! and competes for the exclusive queue `P.cron.leader`: the connection that
//! declared and consumes it leads. About every second a standby publishes an
//! empty mandatory message to it: routed means it is held; returned means it
//! is free, and the standby declares it, the broker refusing all but one
//! (`RESOURCE_LOCKED`). When the leader's connection dies the broker deletes
//! the queue, so a standby takes over within about a second. Nothing needs
//! cleaning up.
//!
//! **Firing.** At each fire time the leader publishes a normal task to
//! `P.tasks` with a publisher confirm. Its id is `cron:<name>:<fire time>`
//! (RFC 3339, UTC, whole seconds), so a duplicate after a fail-over is
//! recognisable. Then it records the fire time in the durable queue
//! `P.cron.state.<name>`, declared with `x-max-length = 1` so that it keeps
//! only the latest record.
//!
//! **Missed fires.** A new leader reads each schedule's record. Fire times
//! after it that are at most [`LATE_GRACE`] old are fired late (a fail-over
//! takes about a second); older ones were missed: `missed = "skip"` publishes
//! nothing for them, `"run_once"` one task for the latest. A schedule
//! without a record starts from now. A leader that falls behind follows the
//! same rule, and one process never fires the same schedule and time twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, Consumer, PublisherConfirm};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warren_client::runtime::{connect, process_identity, ConfirmChannel, Reconnect};
use warren_client::ClientError;
use warren_core::config::{parse_cron, ConfigIssue, CronConfig, MissedFires};
use warren_core::topology::{self, ArgValue};
use warren_core::{Config, ConfigError, Names};

use crate::metrics::SchedulerMetrics;

/// Header naming the schedule that published a task.
pub const CRON_HEADER: &str = "x-warren-cron";

/// How old a fire time may be when a leader reaches it and still be fired
/// (late) rather than counted as missed: covers a fail-over and short stalls.
pub const LATE_GRACE: TimeDelta = TimeDelta::seconds(10);

/// First and largest wait between tries to take the leader lock.
const LOCK_RETRY_FIRST: Duration = Duration::from_millis(200);
const LOCK_RETRY_MAX: Duration = Duration::from_secs(1);

/// The leader reads the wall clock at least this often, so a clock that
/// jumps is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Longest wait for a publisher confirm (a blocked broker, a dead link)
/// before the connection is given up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// AMQP reply code of a queue that another connection holds exclusively.
const RESOURCE_LOCKED: u16 = 405;

/// `P.cron.leader`: the exclusive queue whose holder fires the schedules.
pub fn leader_queue(prefix: &str) -> String {
    format!("{prefix}.cron.leader")
}

/// `P.cron.state.<name>`: durable queue holding one schedule's last fire time.
pub fn state_queue(prefix: &str, name: &str) -> String {
    format!("{prefix}.cron.state.{name}")
}

/// The declaration arguments of every `P.cron.state.<name>` queue: one
/// message at most (a new record drops the old), quorum with
/// `topology.replicated`.
pub fn state_queue_arguments(config: &Config) -> FieldTable {
    topology::field_table(&topology::durable_queue_arguments(
        config,
        [("x-max-length".to_string(), ArgValue::Int(1))].into(),
    ))
}

/// The id of the task fired by schedule `name` at `at`:
/// `cron:<name>:<RFC 3339 UTC, whole seconds>`.
pub fn task_id(name: &str, at: DateTime<Utc>) -> String {
    format!(
        "cron:{name}:{}",
        at.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// Why the cron service cannot run.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    /// A `[[cron]]` entry the scheduler cannot evaluate (a time zone missing
    /// from its database, a schedule that never fires); every one is listed.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Why one connection's session ended early; logged, then retried.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Broker(#[from] ClientError),
    #[error("no connection to the broker at {url} within {timeout:?}")]
    ConnectTimeout { url: String, timeout: Duration },
    #[error("lost the cron leader lock {0} (its queue was deleted or its channel closed)")]
    LockLost(String),
    #[error("no publisher confirm for {what} within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout { what: String },
}

/// One `[[cron]]` entry, compiled for evaluation.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The entry as configured.
    pub config: CronConfig,
    cron: Cron,
    tz: Tz,
}

/// What a leader does for one schedule at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Fire times to publish now, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// The latest fire time counted as missed (older than [`LATE_GRACE`]).
    /// Under `run_once` it is also the first entry of `fire`.
    pub missed: Option<DateTime<Utc>>,
}

impl Schedule {
    /// Compiles every `[[cron]]` entry of `config`, reporting all that the
    /// scheduler cannot use at once, each naming its key.
    pub fn compile_all(config: &Config, now: DateTime<Utc>) -> Result<Vec<Schedule>, CronError> {
        let mut schedules = Vec::new();
        let mut issues = Vec::new();
        for (i, entry) in config.cron.iter().enumerate() {
            match Schedule::compile(i, entry, now) {
                Ok(s) => schedules.push(s),
                Err(mut e) => issues.append(&mut e),
            }
        }
        if issues.is_empty() {
            Ok(schedules)
        } else {
            Err(ConfigError::Invalid(issues).into())
        }
    }

    /// Compiles entry `cron[index]`: resolves its time zone and parses its
    /// expression with [`parse_cron`], the parser configuration validation
    /// uses too (six fields, seconds first; the day fields match when either
    /// does, as in Vixie cron).
    pub fn compile(
        index: usize,
        entry: &CronConfig,
        now: DateTime<Utc>,
    ) -> Result<Schedule, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        let tz = entry.timezone.parse::<Tz>().map_err(|_| {
            issues.push(ConfigIssue {
                key: format!("cron[{index}].timezone"),
                problem: format!(
                    "{:?} is not in the IANA time zone database: use a name such as \"UTC\", \
                     \"Europe/Paris\" or \"America/New_York\" (letter case matters)",
                    entry.timezone
                ),
            })
        });
        let cron = parse_cron(&entry.schedule).map_err(|why| {
            issues.push(ConfigIssue {
                key: format!("cron[{index}].schedule"),
                problem: format!("{:?} {why}", entry.schedule),
            })
        });
        let (Ok(tz), Ok(cron)) = (tz, cron) else {
            return Err(issues);
        };
        let schedule = Schedule {
            config: entry.clone(),
            cron,
            tz,
        };
        if schedule.next_after(now).is_none() {
            return Err(vec![ConfigIssue {
                key: format!("cron[{index}].schedule"),
                problem: format!(
                    "{:?} never fires (no date matches it): check the day-of-month and month \
                     fields",
                    entry.schedule
                ),
            }]);
        }
        Ok(schedule)
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The first fire time strictly after `t`, if there is one.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    /// The latest fire time in `(after, upto]`, if there is one.
    fn latest_in(&self, after: DateTime<Utc>, upto: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&upto.with_timezone(&self.tz), true)
            .ok()
            .map(|at| at.with_timezone(&Utc))
            .filter(|&at| at > after)
    }

    /// What to publish at `now` when every fire time up to `cursor` has been
    /// dealt with: the fire times in `(cursor, now]` at most [`LATE_GRACE`]
    /// old, preceded under `run_once` by the latest older (missed) one.
    pub fn decide(&self, cursor: DateTime<Utc>, now: DateTime<Utc>) -> Decision {
        let mut decision = Decision::default();
        let on_time_from = cursor.max(now - LATE_GRACE);
        decision.missed = self.latest_in(cursor, now - LATE_GRACE);
        if let (Some(missed), MissedFires::RunOnce) = (decision.missed, self.config.missed) {
            decision.fire.push(missed);
        }
        let mut t = on_time_from;
        while let Some(next) = self.next_after(t).filter(|&n| n <= now) {
            decision.fire.push(next);
            t = next;
        }
        decision
    }
}

/// Fires the configured cron schedules until `shutdown`, as leader or
/// standby; returns at once when there are none. Broker trouble is logged
/// and retried with backoff, never returned: the only error is a schedule
/// the scheduler cannot evaluate, found before connecting.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), CronError> {
    run_counted(config, shutdown, Arc::default()).await
}

/// [`run`], counting leadership and fires in `metrics`.
pub(crate) async fn run_counted(
    config: Config,
    shutdown: CancellationToken,
    metrics: Arc<SchedulerMetrics>,
) -> Result<(), CronError> {
    if config.cron.is_empty() {
        return Ok(());
    }
    let schedules = Schedule::compile_all(&config, Utc::now())?;
    let service = CronService {
        names: config.names(),
        identity: process_identity(),
        schedules,
        config,
        metrics,
    };
    let mut fired = Fired::new();
    let max = Duration::from_millis(service.config.broker.reconnect_max_ms);
    let mut retry = Reconnect::new("cron", max);
    while retry.ready(&shutdown).await {
        match service.session(&mut fired, &shutdown, &mut retry).await {
            Ok(()) => break,
            Err(e) => retry.lost(&e),
        }
    }
    info!("cron stopped");
    Ok(())
}

/// The cron side of one scheduler process.
struct CronService {
    config: Config,
    names: Names,
    identity: String,
    schedules: Vec<Schedule>,
    metrics: Arc<SchedulerMetrics>,
}

/// The latest fire time this process sent per schedule name, so that it
/// never fires one twice, even when the broker lost its record.
type Fired = HashMap<String, DateTime<Utc>>;

/// A schedule while this process leads.
struct Slot<'a> {
    schedule: &'a Schedule,
    /// Every fire time up to here has been published or counted missed.
    cursor: DateTime<Utc>,
    /// The next fire time after `cursor`.
    next: Option<DateTime<Utc>>,
}

impl CronService {
    /// One connection's life: returns `Ok` on shutdown, `Err` when it died.
    async fn session(
        &self,
        fired: &mut Fired,
        shutdown: &CancellationToken,
        retry: &mut Reconnect,
    ) -> Result<(), SessionError> {
        let broker = &self.config.broker;
        // One connect timeout per node: a round tries each node once.
        let nodes = broker.url.nodes().len().max(1) as u32;
        let timeout = Duration::from_millis(broker.connect_timeout_ms) * nodes;
        let conn = tokio::time::timeout(timeout, connect(broker, "cron"))
            .await
            .map_err(|_| SessionError::ConnectTimeout {
                url: broker.url.redacted(),
                timeout,
            })??;
        retry.up();
        let result = match self.campaign(&conn, shutdown).await {
            Ok(Some(lock)) => {
                self.metrics.cron_leader(true);
                let r = self.lead(&conn, lock, fired, shutdown).await;
                self.metrics.cron_leader(false);
                r
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e.into()),
        };
        let _ = conn.close(200, "cron stopping".into()).await;
        result
    }

    /// Tries to take `P.cron.leader` until it succeeds (the lock's consumer)
    /// or `shutdown` (`None`). While a leader holds it, a standby only probes
    /// (see [`Self::leader_present`]) about every second, since a refused
    /// declare closes a channel, which the broker and the client log as
    /// errors.
    async fn campaign(
        &self,
        conn: &Connection,
        shutdown: &CancellationToken,
    ) -> Result<Option<Consumer>, ClientError> {
        let queue = leader_queue(self.names.prefix());
        let probe = ConfirmChannel::open(conn).await?;
        let mut wait = LOCK_RETRY_FIRST;
        let mut said_standby = false;
        // The first try declares at once: alone, a replica leads without a
        // probe's returned message in its log.
        let mut first = true;
        loop {
            if std::mem::take(&mut first) || !self.leader_present(&probe, &queue).await? {
                match self.try_lock(conn, &queue).await {
                    Ok(lock) => {
                        let _ = probe.channel().close(200, "cron leader".into()).await;
                        return Ok(Some(lock));
                    }
                    // Another replica was quicker.
                    Err(e) if is_resource_locked(&e) => {}
                    Err(source) => {
                        return Err(ClientError::Amqp {
                            what: format!("take the cron leader lock {queue}"),
                            source,
                        })
                    }
                }
            }
            if !said_standby {
                info!("cron standby: another scheduler holds {queue}");
                said_standby = true;
            }
            let jittered = rand::thread_rng().gen_range(wait * 3 / 4..=wait);
            tokio::select! {
                _ = tokio::time::sleep(jittered) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
            wait = (wait * 2).min(LOCK_RETRY_MAX);
        }
    }

    /// Whether some connection holds the leader queue: an empty, mandatory,
    /// immediately expiring message to it is routed, or returned when the
    /// queue is gone. Publishing to another connection's exclusive queue is
    /// allowed, so this never closes the channel.
    async fn leader_present(
        &self,
        probe: &ConfirmChannel,
        queue: &str,
    ) -> Result<bool, ClientError> {
        let what = format!("probe of the cron leader lock {queue}");
        let confirm = probe
            .channel()
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"",
                BasicProperties::default().with_expiration("0".into()),
            )
            .await
            .map_err(amqp(&what))?;
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| ClientError::Closed(what.clone()))?
            .map_err(amqp(&what))?;
        Ok(confirmation.take_message().is_none())
    }

    /// Declares and consumes the exclusive leader queue on a channel of its
    /// own (a refusal closes that channel).
    async fn try_lock(&self, conn: &Connection, queue: &str) -> Result<Consumer, lapin::Error> {
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.basic_consume(
            queue.into(),
            format!("{queue}.{}", self.identity.replace('/', "-")).into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    }

    /// Fires the schedules while the lock is held; returns `Ok` on
    /// shutdown, `Err` when the lock or the connection is lost.
    async fn lead(
        &self,
        conn: &Connection,
        mut lock: Consumer,
        fired: &mut Fired,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let out = ConfirmChannel::open(conn).await?;
        self.check_tasks_exchange(conn).await?;
        let now = Utc::now();
        let mut slots = Vec::with_capacity(self.schedules.len());
        for schedule in &self.schedules {
            let stored = self.read_state(&out, schedule.name()).await?;
            let known = fired.get(schedule.name()).copied();
            let cursor = stored.max(known).unwrap_or(now);
            slots.push(Slot {
                schedule,
                cursor,
                next: schedule.next_after(cursor),
            });
        }
        info!(
            schedules = slots.len(),
            lock = %leader_queue(self.names.prefix()),
            "cron leader: this scheduler fires the schedules"
        );
        loop {
            let now = Utc::now();
            for slot in &mut slots {
                if slot.next.is_some_and(|n| n <= now) {
                    self.advance(&out, slot, fired, now).await?;
                }
            }
            let wake = slots.iter().filter_map(|s| s.next).min();
            let nap = wake.map_or(MAX_SLEEP, |w| {
                (w - Utc::now()).to_std().unwrap_or_default().min(MAX_SLEEP)
            });
            tokio::select! {
                // A millisecond more so the wall clock has reached the fire time.
                _ = tokio::time::sleep(nap + Duration::from_millis(1)) => {}
                _ = shutdown.cancelled() => return Ok(()),
                lost = lock.next() => {
                    if matches!(lost, Some(Ok(_))) {
                        continue; // Someone published to the lock queue: ignore it.
                    }
                    return Err(SessionError::LockLost(leader_queue(self.names.prefix())));
                }
            }
        }
    }

    /// Publishes what one schedule owes at `now` and moves its cursor on.
    async fn advance(
        &self,
        out: &ConfirmChannel,
        slot: &mut Slot<'_>,
        fired: &mut Fired,
        now: DateTime<Utc>,
    ) -> Result<(), SessionError> {
        let schedule = slot.schedule;
        let decision = schedule.decide(slot.cursor, now);
        if let Some(missed) = decision.missed {
            info!(
                schedule = schedule.name(),
                latest_missed = %missed.to_rfc3339_opts(SecondsFormat::Secs, true),
                missed = schedule.config.missed.as_str(),
                "cron fire times were missed"
            );
        }
        for at in decision.fire {
            if fired.get(schedule.name()).is_some_and(|&f| f >= at) {
                continue;
            }
            // Sent: whatever the confirm says, this process will not send it again.
            self.fire(out, schedule, at, || {
                fired.insert(schedule.name().to_owned(), at);
            })
            .await?;
        }
        slot.cursor = slot.cursor.max(now);
        slot.next = schedule.next_after(slot.cursor);
        Ok(())
    }

    /// Publishes one fire's task (confirmed), then its record in
    /// `P.cron.state.<name>` (confirmed).
    async fn fire(
        &self,
        out: &ConfirmChannel,
        schedule: &Schedule,
        at: DateTime<Utc>,
        sent: impl FnOnce(),
    ) -> Result<(), SessionError> {
        let c = &schedule.config;
        let id = task_id(&c.name, at);
        let body = serde_json::to_vec(&c.args).expect("JSON values always serialise");
        let mut headers = FieldTable::default();
        headers.insert(
            CRON_HEADER.into(),
            AMQPValue::LongString(LongString::from(c.name.as_str())),
        );
        let mut props = BasicProperties::default()
            .with_message_id(ShortString::from(id.as_str()))
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(ShortString::from(c.task_type.as_str()))
            .with_timestamp(u64::try_from(at.timestamp()).unwrap_or(0))
            .with_headers(headers);
        if let Some(p) = c.priority {
            props = props.with_priority(p);
        }
        let task = out
            .send(&self.names.tasks(), &c.task_type, &body, props)
            .await?;
        sent();
        confirm(task, &id).await?;
        info!(schedule = %c.name, task_id = %id, r#type = %c.task_type, "cron fired");
        self.metrics.cron_fired(&c.name);

        let record = serde_json::json!({
            "schedule": c.name,
            "last_fire": at.to_rfc3339_opts(SecondsFormat::Secs, true),
            "task_id": id,
        });
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let queue = state_queue(self.names.prefix(), &c.name);
        let state = out
            .send("", &queue, record.to_string().as_bytes(), props)
            .await?;
        confirm(state, &format!("the record of {id} in {queue}")).await
    }

    /// Declares `P.cron.state.<name>` and reads its record, leaving it in
    /// place; `None` if the schedule never fired.
    async fn read_state(
        &self,
        out: &ConfirmChannel,
        name: &str,
    ) -> Result<Option<DateTime<Utc>>, ClientError> {
        let queue = state_queue(self.names.prefix(), name);
        let amqp = |what: &str| {
            let what = format!("{what} {queue}");
            move |source| ClientError::Amqp { what, source }
        };
        let ch = out.channel();
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            state_queue_arguments(&self.config),
        )
        .await
        .map_err(|source| {
            let what = if source.to_string().contains("inequivalent arg") {
                format!(
                    "declare {queue} (it exists with other arguments, declared with another \
                     topology.replicated: stop Warren and run `warren topology migrate`, or \
                     delete it, as it holds only the schedule's last fire time)"
                )
            } else {
                format!("declare {queue}")
            };
            ClientError::Amqp { what, source }
        })?;
        let Some(msg) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(amqp("read"))?
        else {
            return Ok(None);
        };
        let last = parse_record(&msg.delivery.data);
        msg.delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await
            .map_err(amqp("put back the record in"))?;
        if last.is_none() {
            warn!(%queue, "cron record unreadable: the schedule starts from now");
        }
        debug!(%queue, last_fire = ?last, "cron record read");
        Ok(last)
    }

    /// Fails when `P.tasks` is missing (the topology was not applied), on a
    /// channel of its own since the broker closes it on that failure.
    async fn check_tasks_exchange(&self, conn: &Connection) -> Result<(), ClientError> {
        let tasks = self.names.tasks();
        let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
        ch.exchange_declare(
            tasks.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp(&format!(
            "exchange {tasks} (apply the topology: `warren topology apply`)"
        )))?;
        let _ = ch.close(200, "checked".into()).await;
        Ok(())
    }
}

/// The last fire time in a `P.cron.state.<name>` record.
fn parse_record(body: &[u8]) -> Option<DateTime<Utc>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = value.get("last_fire")?.as_str()?;
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Awaits a publisher confirm (bounded); a negative one is an error naming `what`.
async fn confirm(confirm: PublisherConfirm, what: &str) -> Result<(), SessionError> {
    let c = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| SessionError::ConfirmTimeout {
            what: what.to_owned(),
        })?
        .map_err(|source| ClientError::Amqp {
            what: format!("confirm of {what}"),
            source,
        })?;
    if c.is_nack() {
        return Err(ClientError::Nacked {
            task_id: what.to_owned(),
        }
        .into());
    }
    Ok(())
}

fn is_resource_locked(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == RESOURCE_LOCKED)
}

/// `map_err` helper: a lapin error while doing `what`.
fn amqp(what: &str) -> impl FnOnce(lapin::Error) -> ClientError {
    let what = what.to_owned();
    move |source| ClientError::Amqp { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn schedule(expr: &str, tz: &str, missed: &str) -> Schedule {
        let toml = format!(
            "[[cron]]\nname = \"s\"\nschedule = \"{expr}\"\ntimezone = \"{tz}\"\n\
             task_type = \"diag.echo\"\nmissed = \"{missed}\"\n"
        );
        let config = Config::from_toml(&toml).unwrap();
        Schedule::compile(0, &config.cron[0], at("2026-03-01T00:00:00Z")).unwrap()
    }

    fn compile_error(expr: &str, tz: &str) -> String {
        let toml = format!(
            "[[cron]]\nname = \"s\"\nschedule = \"{expr}\"\ntimezone = \"{tz}\"\n\
             task_type = \"diag.echo\"\n"
        );
        let config = Config::from_toml(&toml).unwrap();
        Schedule::compile_all(&config, at("2026-03-01T00:00:00Z"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn names_and_ids() {
        assert_eq!(leader_queue("acme"), "acme.cron.leader");
        assert_eq!(state_queue("acme", "tick"), "acme.cron.state.tick");
        assert_eq!(
            task_id("tick", at("2026-03-01T10:00:05.250+01:00")),
            "cron:tick:2026-03-01T09:00:05Z"
        );
    }

    #[test]
    fn next_fire_times_are_whole_seconds_strictly_after() {
        let s = schedule("*/5 * * * * *", "UTC", "skip");
        assert_eq!(
            s.next_after(at("2026-03-01T10:00:00.300Z")),
            Some(at("2026-03-01T10:00:05Z"))
        );
        assert_eq!(
            s.next_after(at("2026-03-01T10:00:05Z")),
            Some(at("2026-03-01T10:00:10Z"))
        );
    }

    #[test]
    fn time_zones_follow_daylight_saving() {
        // 02:30 every day in Paris: 01:30 UTC in winter, 00:30 UTC in summer;
        // on 2026-03-29 02:30 does not exist and fires at the first instant after the gap.
        let s = schedule("0 30 2 * * *", "Europe/Paris", "skip");
        assert_eq!(
            s.next_after(at("2026-03-27T12:00:00Z")),
            Some(at("2026-03-28T01:30:00Z"))
        );
        let after_gap = s.next_after(at("2026-03-28T12:00:00Z")).unwrap();
        assert!(after_gap >= at("2026-03-29T01:00:00Z") && after_gap <= at("2026-03-29T01:30:00Z"));
        assert_eq!(
            s.next_after(at("2026-03-30T12:00:00Z")),
            Some(at("2026-03-31T00:30:00Z"))
        );
    }

    #[test]
    fn on_time_fires_are_all_published_in_order() {
        let s = schedule("* * * * * *", "UTC", "skip");
        let d = s.decide(at("2026-03-01T10:00:00Z"), at("2026-03-01T10:00:03.500Z"));
        assert_eq!(
            d.fire,
            [
                at("2026-03-01T10:00:01Z"),
                at("2026-03-01T10:00:02Z"),
                at("2026-03-01T10:00:03Z")
            ]
        );
        assert_eq!(d.missed, None);
        assert_eq!(
            s.decide(at("2026-03-01T10:00:03Z"), at("2026-03-01T10:00:03.900Z")),
            Decision::default()
        );
    }

    #[test]
    fn missed_fires_skip_publishes_only_those_within_grace() {
        let s = schedule("* * * * * *", "UTC", "skip");
        let d = s.decide(at("2026-03-01T10:00:00Z"), at("2026-03-01T10:01:00.500Z"));
        assert_eq!(d.missed, Some(at("2026-03-01T10:00:50Z")));
        assert_eq!(d.fire.len(), 10);
        assert_eq!(d.fire[0], at("2026-03-01T10:00:51Z"));
        assert_eq!(d.fire[9], at("2026-03-01T10:01:00Z"));

        let hourly = schedule("0 0 * * * *", "UTC", "skip");
        let d = hourly.decide(at("2026-03-01T10:00:00Z"), at("2026-03-01T13:30:00Z"));
        assert_eq!(d.missed, Some(at("2026-03-01T13:00:00Z")));
        assert!(d.fire.is_empty());
    }

    #[test]
    fn missed_fires_run_once_publishes_the_latest() {
        let hourly = schedule("0 0 * * * *", "UTC", "run_once");
        let d = hourly.decide(at("2026-03-01T10:00:00Z"), at("2026-03-01T13:30:00Z"));
        assert_eq!(d.missed, Some(at("2026-03-01T13:00:00Z")));
        assert_eq!(d.fire, [at("2026-03-01T13:00:00Z")]);
        // Nothing missed: nothing extra.
        let d = hourly.decide(at("2026-03-01T13:00:00Z"), at("2026-03-01T13:30:00Z"));
        assert_eq!(d, Decision::default());
        // A fire a few seconds old (a fail-over) is late, not missed.
        let d = hourly.decide(at("2026-03-01T12:00:00Z"), at("2026-03-01T13:00:02Z"));
        assert_eq!(d.missed, None);
        assert_eq!(d.fire, [at("2026-03-01T13:00:00Z")]);
    }

    #[test]
    fn schedules_the_scheduler_cannot_use_name_their_key() {
        assert_eq!(
            compile_error("* * * * * *", "Europe/Pariss"),
            "config key cron[0].timezone: \"Europe/Pariss\" is not in the IANA time zone \
             database: use a name such as \"UTC\", \"Europe/Paris\" or \"America/New_York\" \
             (letter case matters)"
        );
        assert_eq!(
            compile_error("0 0 0 30 2 *", "UTC"),
            "config key cron[0].schedule: \"0 0 0 30 2 *\" never fires (no date matches it): \
             check the day-of-month and month fields"
        );
    }

    #[test]
    fn records_parse_or_are_ignored() {
        assert_eq!(
            parse_record(br#"{"schedule":"s","last_fire":"2026-03-01T10:00:00Z"}"#),
            Some(at("2026-03-01T10:00:00Z"))
        );
        assert_eq!(parse_record(b"not json"), None);
        assert_eq!(parse_record(br#"{"last_fire":"yesterday"}"#), None);
    }

    /// Validation and the scheduler read cron expressions with one parser:
    /// for each expression, edge cases included, `Config::from_toml` and
    /// `Schedule::compile` agree on whether it is valid, and with the table.
    #[test]
    fn validation_and_scheduler_agree_on_every_expression() {
        let cases = warren_core::config::CRON_SAMPLES.iter().copied();
        let now = at("2026-03-01T00:00:00Z");
        let valid = Config::from_toml(
            "[[cron]]\nname = \"s\"\nschedule = \"* * * * * *\"\ntask_type = \"diag.echo\"\n",
        )
        .unwrap();
        for (expr, accepted) in cases {
            let toml = format!(
                "[[cron]]\nname = \"s\"\nschedule = \"{expr}\"\ntask_type = \"diag.echo\"\n"
            );
            let validated = Config::from_toml(&toml).is_ok();
            let entry = CronConfig {
                schedule: expr.into(),
                ..valid.cron[0].clone()
            };
            let compiled = Schedule::compile(0, &entry, now).is_ok();
            assert_eq!(
                (validated, compiled),
                (accepted, accepted),
                "{expr:?}: (validation, scheduler)"
            );
        }
        // `L` alone in the day of week parses but matches no day: like any
        // schedule that never fires, only the scheduler refuses it.
        assert!(parse_cron("0 0 12 * * L").is_ok());
        assert!(compile_error("0 0 12 * * L", "UTC").contains("never fires"));
    }
}
