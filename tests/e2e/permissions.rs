//! Least privilege on the broker: each role runs under a user of its own
//! with the permissions `warren topology permissions ROLE` prints, and the
//! broker refuses each role what it does not need.

mod tracker_support;

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ExchangeKind};
use serde_json::json;
use tracker_support::{tracker_env, TestDb};
use warren_client::{Client, TaskRequest};
use warren_core::config::BrokerUrls;
use warren_core::permissions::{regex_escape, Permissions, Role};
use warren_core::{Config, TaskState};
use warren_e2e::{final_event, until_final, BrokerUser, Env, T, T_LONG};

/// The env's configuration with the broker URL of `user`.
fn config_as(env: &Env, user: &BrokerUser) -> Config {
    let mut vars = env.vars.clone();
    vars.retain(|(k, _)| k != "WARREN__BROKER__URL");
    vars.push(("WARREN__BROKER__URL".into(), user.url()));
    Config::load_from(None, &vars).expect("valid configuration")
}

/// A user with the permissions of `role` for this env's configuration.
async fn user_for(env: &Env, role: Role) -> BrokerUser {
    BrokerUser::create(role.as_str(), &Permissions::for_role(&env.config, role)).await
}

#[tokio::test]
async fn each_role_runs_under_its_own_user() {
    let db = TestDb::sqlite("perms");
    // The topology is applied by the operator (guest) here.
    let (mut env, api) = tracker_env("perms", &db, &[]).await;
    let producer = user_for(&env, Role::Producer).await;
    let worker = user_for(&env, Role::Worker).await;
    let scheduler = user_for(&env, Role::Scheduler).await;
    let tracker = user_for(&env, Role::Tracker).await;
    let url = "WARREN__BROKER__URL";

    // It may not declare the topology, so it only checks that it is in place.
    let s = env.spawn(
        &["scheduler"],
        &[
            (url, &scheduler.url()),
            ("WARREN__SCHEDULER__DECLARE_TOPOLOGY", "false"),
        ],
    );
    env.wait_log(&s, "topology found in place", T).await;
    // diag.echo under a global concurrency limit: the worker declares and
    // deletes its permits (contract section 9).
    let cfg = env.config_file("[flow.concurrency]\n\"diag.echo\" = 1\n");
    let w = env.spawn(&["--config", &cfg, "worker"], &[(url, &worker.url())]);
    let t = env.spawn(&["tracker"], &[(url, &tracker.url())]);
    api.wait_ready().await;

    let client = Client::connect(&config_as(&env, &producer))
        .await
        .expect("the producer connects");
    let mut watch = client
        .watch(&["#"])
        .await
        .expect("the producer may watch events");
    let now = client
        .publish(&TaskRequest::new("diag.echo", json!({"n": 1})))
        .await
        .expect("the producer publishes to P.tasks");
    let mut later = TaskRequest::new("diag.echo", json!({"n": 2}));
    later.delay_ms = Some(1500);
    let later = client
        .publish(&later)
        .await
        .expect("the producer publishes to P.delay");
    let flaky = TaskRequest::new(
        "diag.fail",
        json!({"kind": "retryable", "message": "flaky upstream"}),
    )
    .header_int("x-warren-max-retries", 1);
    let flaky = client
        .publish(&flaky)
        .await
        .expect("publish a retrying task");

    // Two tasks with one unique key: the worker takes the key's lock.
    let mut unique = Vec::new();
    for n in 0..2 {
        let req = TaskRequest::new("diag.echo", json!({"n": n}))
            .header_str("x-warren-unique-key", "perms-once");
        unique.push(client.publish(&req).await.expect("publish a unique task"));
    }

    let mut all = vec![now.clone(), later.clone(), flaky.clone()];
    all.extend(unique.iter().cloned());
    let got = until_final(&mut watch, &all, T_LONG).await;
    assert_eq!(final_event(&got[&now]).state, TaskState::Succeeded);
    assert_eq!(final_event(&got[&unique[0]]).state, TaskState::Succeeded);
    let dup = final_event(&got[&unique[1]]);
    assert_eq!(dup.state, TaskState::Duplicate);
    assert_eq!(dup.duplicate_of.as_deref(), Some(unique[0].as_str()));
    let delayed = &got[&later];
    assert!(
        delayed
            .iter()
            .any(|e| e.event.state == TaskState::Scheduled),
        "the scheduler accepted the delayed task"
    );
    assert_eq!(final_event(delayed).state, TaskState::Succeeded);
    let dead = final_event(&got[&flaky]);
    assert_eq!(dead.state, TaskState::Dead);
    assert_eq!(dead.reason.as_deref(), Some("retries_exhausted"));
    assert_eq!(dead.attempt, 2, "retried once through the scheduler");

    // Direct reply-to: the worker answers on the default exchange.
    let reply = client
        .call(&TaskRequest::new("diag.echo", json!({"n": 3})), T)
        .await
        .expect("call through direct reply-to");
    assert_eq!(reply.state, TaskState::Succeeded);
    client
        .cancel("no-such-task")
        .await
        .expect("the producer may send cancels");

    // The tracker stored the events and reads the parking lot.
    api.wait_for(&format!("/api/tasks/{now}"), "tracked task", |v| {
        v["task"]["state"] == "succeeded"
    })
    .await;
    let parked = api.ok("/api/dead").await;
    assert!(
        parked["tasks"]
            .as_array()
            .is_some_and(|ts| ts.iter().any(|t| t["id"] == flaky.as_str())),
        "the tracker lists the dead task: {parked}"
    );

    // No role was refused anything on the way.
    for p in [&s, &w, &t] {
        let log = env.log_of(p);
        assert!(!log.contains("ACCESS_REFUSED"), "{log}");
    }
}

#[tokio::test]
async fn the_permissions_command_prints_the_rabbitmqctl_line() {
    let env = Env::new("perms-cli", &[]).await;
    for role in Role::ALL {
        let out = env.cli_ok(&["topology", "permissions", role.as_str()]);
        let expected = Permissions::for_role(&env.config, role)
            .set_permissions_command("/", &format!("{}-{role}", env.prefix));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{expected}\n")
        );
    }
    let out = env.cli_ok(&[
        "topology",
        "permissions",
        "producer",
        "--user",
        "shop's app",
        "--vhost",
        "prod",
    ]);
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with("rabbitmqctl set_permissions -p prod 'shop'\\''s app' '^"),
        "{line}"
    );
    let err = env.cli_err(&["topology", "permissions", "admin"]);
    assert_eq!(
        err.trim_end(),
        "error: unknown role \"admin\": choose one of producer, worker, scheduler, tracker, operator"
    );
}

#[tokio::test]
async fn a_least_privilege_scheduler_checks_the_topology_it_may_not_declare() {
    let mut env = Env::new("perms-sched", &[]).await;
    let user = user_for(&env, Role::Scheduler).await;
    let url = user.url();
    // Left to declare it (the default), it is refused, says so and checks.
    let s = env.spawn(&["scheduler"], &[("WARREN__BROKER__URL", &url)]);
    env.wait_log(&s, "topology found in place", T).await;
    env.wait_log(&s, "scheduler consuming its intake queues", T)
        .await;
    assert!(env
        .log_of(&s)
        .contains("scheduler.declare_topology = false"));
    env.kill(&s, T).await;

    // Without the topology it stops at once, naming the fix. The prefix is
    // a fresh one nothing was declared under (the user cannot declare).
    let bare = format!("{}-bare", env.prefix);
    let mut vars = env.vars.clone();
    vars.push(("WARREN__PREFIX".into(), bare.clone()));
    let bare_config = Config::load_from(None, &vars).expect("valid configuration");
    let bare_user = BrokerUser::create(
        "scheduler",
        &Permissions::for_role(&bare_config, Role::Scheduler),
    )
    .await;
    let s = env.spawn(
        &["scheduler"],
        &[
            ("WARREN__BROKER__URL", &bare_user.url()),
            ("WARREN__PREFIX", &bare),
            ("WARREN__SCHEDULER__DECLARE_TOPOLOGY", "false"),
        ],
    );
    assert_eq!(env.wait_exit(&s, T).await, Some(1), "{}", env.log_of(&s));
    let log = env.log_of(&s);
    assert!(
        log.contains(&format!(
            "exchange {bare}.tasks does not exist and this broker user may not declare it"
        )) && log.contains("`warren topology apply`"),
        "{log}"
    );
    assert!(!log.contains("ACCESS_REFUSED"), "{log}");
}

/// One AMQP operation, tried on a channel of its own.
#[derive(Debug)]
enum Op {
    Get(String),
    Purge(String),
    DeleteQueue(String),
    DeclareQueue(String),
    DeclareExchange(String),
    DeleteExchange(String),
    Bind { queue: String, exchange: String },
    Publish(String),
}

/// Runs `op` on a new channel of `conn`: the broker's error, if any.
async fn attempt(conn: &Connection, op: &Op) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    match op {
        Op::Get(q) => {
            let got = ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
                .await?;
            if let Some(m) = got {
                // Return it: this is only a check.
                m.delivery
                    .acker
                    .nack(lapin::options::BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
        Op::Purge(q) => {
            ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
                .await?;
        }
        Op::DeleteQueue(q) => {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Op::DeclareQueue(q) => {
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            };
            ch.queue_declare(q.as_str().into(), options, FieldTable::default())
                .await?;
        }
        Op::DeclareExchange(x) => {
            let options = ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            };
            let kind = ExchangeKind::Fanout;
            ch.exchange_declare(x.as_str().into(), kind, options, FieldTable::default())
                .await?;
        }
        Op::DeleteExchange(x) => {
            ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Op::Bind { queue, exchange } => {
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Op::Publish(x) => {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let confirm = ch
                .basic_publish(
                    x.as_str().into(),
                    "forged.test".into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default(),
                )
                .await?;
            // A refused publication closes the channel: the confirm fails.
            match tokio::time::timeout(Duration::from_secs(10), confirm).await {
                Ok(c) => {
                    c?;
                }
                Err(_) => panic!("no confirm nor error for a publication to {x} in 10 s"),
            }
            // A confirm may arrive before the close: a round trip on the
            // same channel surfaces the refusal.
            ch.basic_qos(1, Default::default()).await?;
        }
    }
    let _ = ch.close(200, "checked".into()).await;
    Ok(())
}

/// Connects as `user`.
async fn connect(user: &BrokerUser) -> Connection {
    let broker = warren_core::config::BrokerConfig {
        url: BrokerUrls::new(user.url()),
        ..Default::default()
    };
    warren_client::runtime::connect(&broker, "test")
        .await
        .unwrap_or_else(|e| panic!("connect as {}: {e}", user.name))
}

/// Asserts the broker refuses each of `ops` to `user` with ACCESS_REFUSED.
async fn assert_refused(user: &BrokerUser, ops: &[Op]) {
    let conn = connect(user).await;
    for op in ops {
        match attempt(&conn, op).await {
            Ok(()) => panic!("{} was allowed {op:?}", user.name),
            Err(e) => assert!(
                e.to_string().contains("ACCESS_REFUSED"),
                "{} doing {op:?}: expected ACCESS_REFUSED, got {e}",
                user.name
            ),
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Asserts `user` may do each of `ops` (so a refusal above is the
/// permissions', not a broken connection's).
async fn assert_allowed(user: &BrokerUser, ops: &[Op]) {
    let conn = connect(user).await;
    for op in ops {
        if let Err(e) = attempt(&conn, op).await {
            panic!("{} doing {op:?}: {e}", user.name);
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test]
async fn each_role_is_refused_what_it_does_not_need() {
    let env = Env::new("perms-deny", &[]).await;
    let n = env.names();
    let work = n.work_queue("diag");
    let producer = user_for(&env, Role::Producer).await;
    let worker = user_for(&env, Role::Worker).await;
    let scheduler = user_for(&env, Role::Scheduler).await;
    let tracker = user_for(&env, Role::Tracker).await;

    // The producer publishes and watches; it may not take, purge or delete
    // work, nor forge events.
    let watch = n.watch_queue("perm-test");
    assert_allowed(
        &producer,
        &[Op::Publish(n.tasks()), Op::DeclareQueue(watch.clone())],
    )
    .await;
    assert_refused(
        &producer,
        &[
            Op::Get(work.clone()),
            Op::Purge(work.clone()),
            Op::DeleteQueue(work.clone()),
            Op::DeleteQueue(n.dead()),
            Op::DeleteExchange(n.tasks()),
            Op::Publish(n.events()),
            Op::Publish(String::new()),
        ],
    )
    .await;

    // The worker consumes its queues and publishes events and the next
    // steps of chains; it may not declare or delete exchanges, nor delete
    // its queues.
    assert_allowed(
        &worker,
        &[
            Op::Get(work.clone()),
            Op::Publish(n.events()),
            Op::Publish(n.tasks()),
        ],
    )
    .await;
    assert_refused(
        &worker,
        &[
            Op::DeclareExchange(format!("{}.worker-made", env.prefix)),
            Op::DeclareExchange(n.tasks()),
            Op::DeleteExchange(n.tasks()),
            Op::DeleteExchange(n.events()),
            Op::DeleteQueue(work.clone()),
            Op::Get(n.dead()),
        ],
    )
    .await;

    // The scheduler reads its intake queues; it may not take work from a
    // work queue, nor delete what the operator declared.
    assert_allowed(&scheduler, &[Op::Get(n.delay_intake())]).await;
    assert_refused(
        &scheduler,
        &[
            Op::Get(work.clone()),
            Op::DeleteQueue(n.delay_intake()),
            Op::DeleteExchange(n.events()),
            Op::DeclareExchange(n.tasks()),
            Op::Publish(n.delay()),
        ],
    )
    .await;

    // The tracker binds its own queue to P.events and reads the parking
    // lot; it may not read work queues, bind anything else, or forge events.
    let own = format!("{}.tracker.events", env.prefix);
    assert_allowed(
        &tracker,
        &[
            Op::DeclareQueue(own.clone()),
            Op::Bind {
                queue: own.clone(),
                exchange: n.events(),
            },
            Op::Get(n.dead()),
        ],
    )
    .await;
    assert_refused(
        &tracker,
        &[
            Op::Get(work.clone()),
            Op::Bind {
                queue: work.clone(),
                exchange: n.events(),
            },
            Op::Publish(n.events()),
            Op::DeleteExchange(n.events()),
            Op::DeclareExchange(n.events()),
        ],
    )
    .await;

    // The publish-only grant docs/deployment.md suggests for an untrusted
    // publisher.
    let p = regex_escape(&env.prefix);
    let publisher = BrokerUser::create(
        "publisher",
        &Permissions {
            configure: "^$".into(),
            write: format!("^({p}\\.tasks|{p}\\.delay)$"),
            read: "^$".into(),
        },
    )
    .await;
    assert_allowed(
        &publisher,
        &[Op::Publish(n.tasks()), Op::Publish(n.delay())],
    )
    .await;
    assert_refused(
        &publisher,
        &[
            Op::Publish(n.control()),
            Op::DeclareQueue(n.watch_queue("perm-test")),
            Op::Get(work.clone()),
        ],
    )
    .await;

    // Nothing the roles tried removed anything.
    env.depth(&work).await;
    env.depth(&n.dead()).await;
    let (conn, ch) = env.open_channel().await;
    for x in [n.tasks(), n.events()] {
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("exchange {x} still exists: {e}"));
    }
    let _ = conn.close(200, "bye".into()).await;
}
