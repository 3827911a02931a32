//! `warren_scheduler::cron::run` against the real broker, in-process: one
//! leader among replicas, a standby taking over, and missed fires decided
//! from the records kept in the broker. (tests/e2e/cron.rs checks the same
//! through `warren scheduler` processes, including kill -9.)

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicRejectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, Consumer};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren_core::topology::TopologyPlan;
use warren_core::Config;
use warren_scheduler::cron::{self, CronError};

const T: Duration = Duration::from_secs(30);

fn broker_url() -> String {
    std::env::var("WARREN__BROKER__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A configuration with a fresh prefix and these `[[cron]]` entries; its
/// topology is applied.
async fn setup(name: &str, cron_toml: &str) -> Config {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let toml = format!(
        "prefix = \"wt.cronlib-{name}.{}\"\n[broker]\nurl = \"{}\"\n{cron_toml}",
        &suffix[..8],
        broker_url()
    );
    let config = Config::from_toml(&toml).expect("test configuration is valid");
    let conn = connect(&config).await;
    warren_scheduler::apply(&conn, &TopologyPlan::from_config(&config))
        .await
        .expect("topology applies");
    let _ = conn.close(200, "bye".into()).await;
    config
}

async fn connect(config: &Config) -> Connection {
    warren_client::runtime::connect(&config.broker, "test")
        .await
        .expect("broker reachable")
}

/// Runs `body`, then deletes every object of the prefix, even if it panicked.
async fn with_cleanup<F: Future<Output = ()> + Send + 'static>(config: &Config, body: F) {
    let outcome = tokio::spawn(body).await;
    let conn = connect(config).await;
    let ch = conn.create_channel().await.unwrap();
    let plan = TopologyPlan::from_config(config);
    let prefix = &config.prefix;
    let mut queues: Vec<String> = plan.queues.iter().map(|q| q.name.clone()).collect();
    queues.push(cron::leader_queue(prefix));
    queues.extend(
        config
            .cron
            .iter()
            .map(|c| cron::state_queue(prefix, &c.name)),
    );
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in &plan.exchanges {
        let _ = ch
            .exchange_delete(e.name.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A replica of the cron service, stoppable on its own.
struct Replica {
    stop: CancellationToken,
    handle: JoinHandle<Result<(), CronError>>,
}

impl Replica {
    fn start(config: &Config) -> Replica {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(cron::run(config.clone(), stop.clone()));
        Replica { stop, handle }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(T, self.handle)
            .await
            .expect("cron stops on shutdown")
            .expect("cron task")
            .expect("cron ends Ok");
    }
}

/// One task a schedule published, as taken from the work queue.
#[derive(Debug)]
struct Fire {
    id: String,
    props: BasicProperties,
    body: Vec<u8>,
    arrived: Instant,
}

/// Follows what arrives in a work queue.
struct Fires {
    _conn: Connection,
    consumer: Consumer,
    seen: Vec<Fire>,
}

impl Fires {
    async fn follow(config: &Config, queue: &str) -> Fires {
        let conn = connect(config).await;
        let ch = conn.create_channel().await.unwrap();
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
            .unwrap();
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
                id: d.properties.message_id().as_ref().unwrap().to_string(),
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

/// The fire time in a `cron:<name>:<time>` id.
fn fire_time(name: &str, id: &str) -> DateTime<Utc> {
    let text = id
        .strip_prefix(&format!("cron:{name}:"))
        .unwrap_or_else(|| panic!("{id} is not a task id of {name}"));
    assert!(text.ends_with('Z') && text.len() == 20, "{id}");
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

#[tokio::test]
async fn one_replica_fires_each_second_once_and_a_standby_takes_over() {
    let config = setup(
        "leader",
        "[[cron]]\nname = \"tick\"\nschedule = \"* * * * * *\"\ntask_type = \"diag.echo\"\n\
         args = { hello = \"cron\" }\npriority = 3\n",
    )
    .await;
    let c = config.clone();
    with_cleanup(&config, async move {
        let mut fires = Fires::follow(&c, &c.names().work_queue("diag")).await;
        let first = Replica::start(&c);
        fires.until("first fires", T, |s| s.len() >= 2).await;
        let second = Replica::start(&c);
        let n = fires.seen.len();
        fires
            .until("fires with two replicas", T, |s| s.len() >= n + 3)
            .await;
        // The first replica leads (it started alone); stopping it hands over.
        first.stop().await;
        let stopped = Instant::now();
        fires
            .until("fires after the hand-over", T, |s| {
                s.iter().filter(|f| f.arrived > stopped).count() >= 3
            })
            .await;
        second.stop().await;

        let times: Vec<DateTime<Utc>> = fires
            .seen
            .iter()
            .map(|f| fire_time("tick", &f.id))
            .collect();
        let unique: BTreeSet<_> = times.iter().collect();
        assert_eq!(unique.len(), times.len(), "duplicates: {:?}", fires.ids());
        for pair in times.windows(2) {
            assert_eq!(
                (pair[1] - pair[0]).num_seconds(),
                1,
                "gap or disorder: {:?}",
                fires.ids()
            );
        }
        let after = fires.seen.iter().find(|f| f.arrived > stopped).unwrap();
        assert!(
            after.arrived - stopped < Duration::from_secs(5),
            "the standby fired {:?} after the leader stopped",
            after.arrived - stopped
        );
        for f in &fires.seen {
            let p = &f.props;
            assert_eq!(p.kind().as_ref().unwrap().as_str(), "diag.echo");
            assert_eq!(
                p.content_type().as_ref().unwrap().as_str(),
                "application/json"
            );
            assert_eq!(*p.delivery_mode(), Some(2));
            assert_eq!(*p.priority(), Some(3));
            let header = p.headers().as_ref().unwrap().inner().get(cron::CRON_HEADER);
            assert!(
                matches!(header, Some(AMQPValue::LongString(s)) if s.to_string() == "tick"),
                "{header:?}"
            );
            let body: serde_json::Value = serde_json::from_slice(&f.body).unwrap();
            assert_eq!(body, serde_json::json!({"hello": "cron"}));
        }
    })
    .await;
}

/// Seeds a schedule's record as if it last fired at `last_fire`.
async fn seed_record(config: &Config, name: &str, last_fire: &str) {
    let conn = connect(config).await;
    let ch = conn.create_channel().await.unwrap();
    let queue = cron::state_queue(&config.prefix, name);
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        cron::state_queue_arguments(config),
    )
    .await
    .unwrap();
    let body = serde_json::json!({"schedule": name, "last_fire": last_fire}).to_string();
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        Default::default(),
        body.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

/// The `last_fire` of a schedule's record, leaving it in place.
async fn read_record(config: &Config, name: &str) -> String {
    let conn = connect(config).await;
    let ch = conn.create_channel().await.unwrap();
    let queue = cron::state_queue(&config.prefix, name);
    let msg = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a record");
    let record: serde_json::Value = serde_json::from_slice(&msg.delivery.data).unwrap();
    msg.delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    record["last_fire"].as_str().unwrap().to_owned()
}

/// Messages ready in a schedule's record queue.
async fn state_depth(config: &Config, name: &str) -> u32 {
    let conn = connect(config).await;
    let ch = conn.create_channel().await.unwrap();
    let queue = cron::state_queue(&config.prefix, name);
    let q = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

#[tokio::test]
async fn missed_fires_run_once_publishes_the_latest_skip_and_new_schedules_nothing() {
    // Yearly schedules: nothing fires on time during the test. Their order
    // makes "caught-up" decided last, so its task arrives after any other.
    let yearly = |name: &str, missed: &str| {
        format!(
            "[[cron]]\nname = \"{name}\"\nschedule = \"0 0 0 1 1 *\"\n\
             task_type = \"diag.echo\"\nmissed = \"{missed}\"\n"
        )
    };
    let config = setup(
        "missed",
        &[
            yearly("skipped", "skip"),
            yearly("fresh", "run_once"),
            yearly("caught-up", "run_once"),
        ]
        .concat(),
    )
    .await;
    let c = config.clone();
    with_cleanup(&config, async move {
        seed_record(&c, "skipped", "2020-01-01T00:00:00Z").await;
        seed_record(&c, "caught-up", "2020-01-01T00:00:00Z").await;
        let mut fires = Fires::follow(&c, &c.names().work_queue("diag")).await;
        let replica = Replica::start(&c);
        fires.until("the run_once fire", T, |s| !s.is_empty()).await;
        // Stop first: once it has stopped, anything it published has arrived.
        replica.stop().await;
        let latest_new_year = format!("{}-01-01T00:00:00Z", Utc::now().year());
        assert_eq!(fires.ids(), [format!("cron:caught-up:{latest_new_year}")]);
        assert_eq!(read_record(&c, "caught-up").await, latest_new_year);
        assert_eq!(read_record(&c, "skipped").await, "2020-01-01T00:00:00Z");
        assert_eq!(
            state_depth(&c, "fresh").await,
            0,
            "a new schedule has no record yet"
        );
        assert_eq!(
            state_depth(&c, "caught-up").await,
            1,
            "one record per schedule"
        );
    })
    .await;
}

#[tokio::test]
async fn no_schedules_returns_at_once_and_bad_ones_before_connecting() {
    let mut config =
        Config::from_toml("[broker]\nurl = \"amqp://nobody@127.0.0.1:1/%2f\"").unwrap();
    let done = tokio::time::timeout(T, cron::run(config.clone(), CancellationToken::new())).await;
    assert!(matches!(done, Ok(Ok(()))));
    config = Config::from_toml(
        "[broker]\nurl = \"amqp://nobody@127.0.0.1:1/%2f\"\n[[cron]]\nname = \"a\"\n\
         schedule = \"* * * * * *\"\ntimezone = \"Mars/Olympus\"\ntask_type = \"diag.echo\"\n",
    )
    .unwrap();
    let err = tokio::time::timeout(T, cron::run(config, CancellationToken::new()))
        .await
        .expect("returns at once")
        .unwrap_err();
    assert!(
        err.to_string().starts_with(
            "config key cron[0].timezone: \"Mars/Olympus\" is not in the IANA time zone database"
        ),
        "{err}"
    );
}
