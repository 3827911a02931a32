//! Cron schedules end to end: `warren scheduler` processes with `[[cron]]`
//! entries fire tasks that workers run; among several schedulers exactly one
//! fires; killing it hands over within seconds; missed fires follow the
//! schedule's policy from the record kept in the broker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, Consumer};
use serde_json::json;
use tokio::time::Instant;
use warren_core::TaskState;
use warren_e2e::{Env, Proc, T};

/// Starts `warren scheduler --config <file>`.
fn scheduler(env: &mut Env, file: &str) -> Proc {
    env.spawn(&["--config", file, "scheduler"], &[])
}

/// A `[[cron]]` entry of `diag.echo`, for [`Env::config_file`] (queues and
/// routes stay the built-in ones: a file's array replaces only the same key).
fn entry(name: &str, schedule: &str, extra: &str) -> String {
    format!(
        "[[cron]]\nname = \"{name}\"\nschedule = \"{schedule}\"\ntask_type = \"diag.echo\"\n\
         {extra}\n"
    )
}

/// Seconds since the Unix epoch of `YYYY-MM-DDTHH:MM:SSZ`.
fn unix_seconds(text: &str) -> i64 {
    assert!(text.len() == 20 && text.ends_with('Z'), "{text:?}");
    let n = |range: std::ops::Range<usize>| text[range].parse::<i64>().expect("digits");
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (H. Hinnant): March-based years make leap days last.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The fire time (Unix seconds) in a `cron:<name>:<time>` task id.
fn fire_time(name: &str, id: &str) -> i64 {
    let text = id
        .strip_prefix(&format!("cron:{name}:"))
        .unwrap_or_else(|| panic!("{id} is not a task id of schedule {name}"));
    unix_seconds(text)
}

/// One task taken from a work queue.
struct Fire {
    id: String,
    props: BasicProperties,
    body: Vec<u8>,
    arrived: Instant,
}

/// Follows what arrives in a work queue (no worker runs).
struct Fires {
    _conn: Connection,
    consumer: Consumer,
    seen: Vec<Fire>,
}

impl Fires {
    async fn follow(env: &Env, queue: &str) -> Fires {
        let (conn, ch) = env.open_channel().await;
        let consumer = ch
            .basic_consume(
                queue.into(),
                "test-fires".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        Fires {
            _conn: conn,
            consumer,
            seen: Vec::new(),
        }
    }

    /// Receives until `done(seen)` holds; panics after `timeout`.
    async fn until(&mut self, what: &str, timeout: Duration, done: impl Fn(&[Fire]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let next = tokio::time::timeout_at(deadline, self.consumer.next()).await;
            let Ok(Some(Ok(d))) = next else {
                panic!("{what}: not within {timeout:?}; got {:?}", self.ids());
            };
            self.seen.push(Fire {
                id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .expect("a task id")
                    .to_string(),
                props: d.properties.clone(),
                body: d.data.clone(),
                arrived: Instant::now(),
            });
        }
    }

    fn ids(&self) -> Vec<&str> {
        self.seen.iter().map(|f| f.id.as_str()).collect()
    }
}

const LEADER_LOG: &str = "cron leader";
const STANDBY_LOG: &str = "cron standby";

/// Asserts the fire times are consecutive seconds, each once.
fn assert_every_second_once(name: &str, fires: &Fires) {
    let mut times: Vec<i64> = fires.seen.iter().map(|f| fire_time(name, &f.id)).collect();
    times.sort_unstable();
    let unique: BTreeSet<i64> = times.iter().copied().collect();
    assert_eq!(unique.len(), times.len(), "duplicates: {:?}", fires.ids());
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 1, "a gap: {:?}", fires.ids());
    }
}

#[tokio::test]
async fn a_schedule_fires_every_second_and_its_tasks_run() {
    let mut env = Env::new("cron-fire", &[]).await;
    let file = env.config_file(&entry(
        "tick",
        "*/1 * * * * *",
        "args = { from = \"cron\" }\npriority = 4",
    ));
    env.spawn(&["worker"], &[]);
    let mut watch = env.watch(&["succeeded.diag.echo"]).await;
    let sched = scheduler(&mut env, &file);

    let mut done: BTreeMap<i64, String> = BTreeMap::new();
    let deadline = Instant::now() + T;
    while done.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(got) = watch.next(left).await.expect("watch") else {
            panic!(
                "only {} cron tasks succeeded within {T:?}: {done:?}\nscheduler log:\n{}",
                done.len(),
                env.log_of(&sched)
            );
        };
        let ev = got.event;
        assert_eq!(ev.state, TaskState::Succeeded);
        assert_eq!(ev.result, Some(json!({"from": "cron"})));
        assert_eq!(ev.attempt, 1);
        let at = fire_time("tick", &ev.task_id);
        assert!(
            done.insert(at, ev.task_id.clone()).is_none(),
            "{} ran twice",
            ev.task_id
        );
    }
    let first = *done.keys().next().unwrap();
    let last = *done.keys().last().unwrap();
    assert!(
        last - first <= 8,
        "4 fires of a one-second schedule span {}s: {done:?}",
        last - first
    );
    let log = env.log_of(&sched);
    assert!(log.contains(LEADER_LOG), "{log}");
    assert!(log.contains("cron fired"), "{log}");
}

#[tokio::test]
async fn two_schedulers_publish_each_fire_time_exactly_once() {
    let mut env = Env::new("cron-two", &[]).await;
    let file = env.config_file(&entry("tick", "* * * * * *", "priority = 2"));
    let mut fires = Fires::follow(&env, &env.names().work_queue("diag")).await;
    let a = scheduler(&mut env, &file);
    let b = scheduler(&mut env, &file);
    fires.until("the first fire", T, |s| !s.is_empty()).await;
    let first = fires.seen[0].arrived;
    // About five seconds of fires.
    fires
        .until("five seconds of fires", T, |s| {
            s.last().unwrap().arrived - first >= Duration::from_secs(5)
        })
        .await;

    assert_every_second_once("tick", &fires);
    for f in &fires.seen {
        let p = &f.props;
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "diag.echo");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.priority(), Some(2));
        let header = p.headers().as_ref().unwrap().inner().get("x-warren-cron");
        assert!(
            matches!(header, Some(AMQPValue::LongString(s)) if s.to_string() == "tick"),
            "x-warren-cron = {header:?}"
        );
        let body: serde_json::Value = serde_json::from_slice(&f.body).unwrap();
        assert_eq!(body, json!({}));
    }
    let logs = [env.log_of(&a), env.log_of(&b)];
    let leaders = logs.iter().filter(|l| l.contains(LEADER_LOG)).count();
    let standbys = logs.iter().filter(|l| l.contains(STANDBY_LOG)).count();
    assert_eq!((leaders, standbys), (1, 1), "{logs:#?}");
}

#[tokio::test]
async fn killing_the_leader_hands_over_and_fires_continue_within_seconds() {
    let mut env = Env::new("cron-kill", &[]).await;
    let file = env.config_file(&entry("tick", "* * * * * *", ""));
    let mut fires = Fires::follow(&env, &env.names().work_queue("diag")).await;
    let a = scheduler(&mut env, &file);
    let b = scheduler(&mut env, &file);
    fires.until("the first fires", T, |s| s.len() >= 2).await;
    let (leader, standby) = if env.log_of(&a).contains(LEADER_LOG) {
        (a, b)
    } else {
        (b, a)
    };
    assert!(env.log_of(&leader).contains(LEADER_LOG));

    env.signal(&leader, "KILL");
    let killed = Instant::now();
    let killed_unix = now_unix();
    env.wait_exit(&leader, T)
        .await
        .expect("killed scheduler exits");
    env.wait_log(&standby, LEADER_LOG, T).await;
    let took_over = killed.elapsed();
    fires
        .until("fires after the kill", T, |s| {
            s.iter().filter(|f| f.arrived > killed).count() >= 3
        })
        .await;
    let first_after = fires.seen.iter().find(|f| f.arrived > killed).unwrap();
    assert!(
        first_after.arrived - killed <= Duration::from_secs(5),
        "the first fire after the kill came {:?} later (take-over after {took_over:?})",
        first_after.arrived - killed
    );

    // No gap: the new leader fires the few seconds it missed, late. A
    // duplicate is possible only for the fire time the leader died in, and
    // its id says so.
    let mut times: Vec<i64> = fires
        .seen
        .iter()
        .map(|f| fire_time("tick", &f.id))
        .collect();
    times.sort_unstable();
    let mut dups = times.clone();
    dups.dedup();
    for pair in dups.windows(2) {
        assert_eq!(pair[1] - pair[0], 1, "a gap: {:?}", fires.ids());
    }
    for pair in times.windows(2) {
        if pair[0] == pair[1] {
            assert!(
                (pair[0] - killed_unix).abs() <= 2,
                "fire time {} published twice, far from the kill at {killed_unix}",
                pair[0]
            );
        }
    }
}

/// Seeds a schedule's record in `P.cron.state.<name>` as if it last fired at
/// `last_fire`: the durable queue (`x-max-length = 1`) and one message.
async fn seed_record(env: &Env, name: &str, last_fire: &str) {
    let (conn, ch) = env.open_channel().await;
    let queue = format!("{}.cron.state.{name}", env.prefix);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare record queue");
    let body = json!({"schedule": name, "last_fire": last_fire}).to_string();
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        Default::default(),
        body.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish record");
    let _ = conn.close(200, "bye".into()).await;
}

/// The `last_fire` in a schedule's record (read and put back).
async fn record_of(env: &Env, name: &str) -> Option<String> {
    let (conn, ch) = env.open_channel().await;
    let queue = format!("{}.cron.state.{name}", env.prefix);
    let msg = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")?;
    let record: serde_json::Value = serde_json::from_slice(&msg.delivery.data).expect("JSON");
    let _ = conn.close(200, "bye".into()).await; // Unacked: the record goes back.
    Some(record["last_fire"].as_str().expect("last_fire").to_owned())
}

#[tokio::test]
async fn missed_fires_run_once_fires_the_latest_skip_and_new_schedules_nothing() {
    let mut env = Env::new("cron-missed", &[]).await;
    // Yearly schedules, so nothing fires on time during the test; in this
    // order "caught-up" is decided last, so its task arrives after any other.
    let file = env.config_file(
        &[
            entry("skipped", "0 0 0 1 1 *", "missed = \"skip\""),
            entry("fresh", "0 0 0 1 1 *", "missed = \"run_once\""),
            entry("caught-up", "0 0 0 1 1 *", "missed = \"run_once\""),
        ]
        .concat(),
    );
    seed_record(&env, "skipped", "2020-01-01T00:00:00Z").await;
    seed_record(&env, "caught-up", "2020-01-01T00:00:00Z").await;
    let mut fires = Fires::follow(&env, &env.names().work_queue("diag")).await;
    let sched = scheduler(&mut env, &file);
    fires.until("the run_once fire", T, |s| !s.is_empty()).await;
    env.wait_log(&sched, "cron fired", T).await;

    assert_eq!(fires.seen.len(), 1, "{:?}", fires.ids());
    let id = &fires.seen[0].id;
    assert!(id.ends_with("-01-01T00:00:00Z"), "{id}");
    let at = fire_time("caught-up", id);
    let now = now_unix();
    assert!(
        at <= now && now - at <= 366 * 86_400,
        "{id} is not the latest New Year"
    );
    assert_eq!(
        *fires.seen[0].props.timestamp(),
        Some(at as u64),
        "timestamp = fire time"
    );
    let latest = id.strip_prefix("cron:caught-up:").unwrap();
    assert_eq!(record_of(&env, "caught-up").await.as_deref(), Some(latest));
    assert_eq!(
        record_of(&env, "skipped").await.as_deref(),
        Some("2020-01-01T00:00:00Z")
    );
    assert_eq!(record_of(&env, "fresh").await, None);
}
