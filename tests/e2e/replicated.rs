//! The replicated topology (`topology.replicated`: every durable queue a
//! quorum queue) on the default single node, and `P.unroutable` parking
//! expired tasks instead of dropping them.

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use warren_client::TaskRequest;
use warren_core::TaskState;
use warren_e2e::{final_event, states, until_final, CommandExt, Env, Mgmt, T_LONG};

const REPLICATED: (&str, &str) = ("WARREN__TOPOLOGY__REPLICATED", "true");

/// A task of a type no route matches (the default configuration has no
/// default queue), expiring 1 ms after it is queued.
fn unroutable(id: &str, delay_ms: Option<i32>) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_expiration("1".into());
    if let Some(ms) = delay_ms {
        let mut h = FieldTable::default();
        h.insert("x-delay".into(), AMQPValue::LongInt(ms));
        p = p.with_headers(h);
    }
    p
}

/// Publishes an immediate and a delayed unroutable task with
/// `expiration: "1"` and checks both end dead as `expired`, parked in
/// `P.dead`, and `P.unroutable` is left empty.
async fn expired_unroutable_tasks_are_parked(env: &Env, watch: &mut warren_client::EventWatch) {
    let n = env.names();
    env.publish_raw(
        &n.tasks(),
        "nowhere.now",
        b"{}",
        unroutable("unrouted-now", None),
    )
    .await;
    env.publish_raw(
        &n.delay(),
        "nowhere.later",
        b"{}",
        unroutable("unrouted-later", Some(800)),
    )
    .await;
    let ids = ["unrouted-now", "unrouted-later"];
    let got = until_final(watch, &ids, T_LONG).await;
    for id in ids {
        let ev = final_event(&got[id]);
        assert_eq!(ev.state, TaskState::Dead, "{id}: {:?}", states(&got[id]));
        assert_eq!(ev.reason.as_deref(), Some("expired"), "{id}");
    }
    let dead = env.drain(&n.dead()).await;
    let mut parked: Vec<String> = dead
        .iter()
        .map(|(p, _)| {
            let h = p.headers().clone();
            assert_eq!(
                warren_core::headers::get_str(h.as_ref(), "x-warren-dead-reason").as_deref(),
                Some("expired")
            );
            p.message_id().as_ref().expect("id").to_string()
        })
        .collect();
    parked.sort();
    assert_eq!(parked, ["unrouted-later", "unrouted-now"]);
    assert_eq!(env.depth(&n.unroutable()).await, 0);
}

#[tokio::test]
async fn an_expired_unroutable_task_is_parked_dead_expired() {
    let (env, mut watch) = Env::with_up_watching("repl-unrouted", &[]).await;
    expired_unroutable_tasks_are_parked(&env, &mut watch).await;
}

#[tokio::test]
async fn a_replicated_topology_runs_every_kind_of_task() {
    let (env, mut watch) = Env::with_up_watching(
        "repl-run",
        &[
            REPLICATED,
            ("WARREN__RETRY__DEFAULT__BASE_MS", "200"),
            ("WARREN__RETRY__DEFAULT__CAP_MS", "400"),
        ],
    )
    .await;

    // Every durable queue of the prefix is quorum but the cancels stream;
    // none is lazy, and every one that dead-letters does so at least once.
    let queues = Mgmt::new().queues_of(&env.prefix).await;
    let n = env.names();
    let durable: Vec<_> = queues
        .iter()
        .filter(|(name, _, _)| !name.starts_with(&format!("{}.watch.", env.prefix)))
        .collect();
    assert!(durable.len() > 40, "{durable:?}");
    for (name, kind, args) in &durable {
        if *name == n.cancels() {
            assert_eq!(kind, "stream");
            continue;
        }
        assert_eq!(kind, "quorum", "{name}");
        assert!(args.get("x-queue-mode").is_none(), "{name}: {args}");
        if args.get("x-dead-letter-exchange").is_some() {
            assert_eq!(args["x-dead-letter-strategy"], "at-least-once", "{name}");
            assert_eq!(args["x-overflow"], "reject-publish", "{name}");
        }
    }
    for q in [
        n.work_queue("io"),
        n.dead(),
        n.unroutable(),
        n.wait_tier(64),
    ] {
        assert!(durable.iter().any(|(name, _, _)| *name == q), "{q}");
    }

    let now = env
        .publish(&TaskRequest::new("diag.echo", json!({"n": 1})))
        .await;
    let later = env
        .publish(&TaskRequest::new("diag.echo", json!({"n": 2})).delay_ms(1500))
        .await;
    let retried = env
        .publish(
            &TaskRequest::new(
                "diag.fail",
                json!({"kind": "retryable", "message": "again"}),
            )
            .header_int("x-warren-max-retries", 1),
        )
        .await;
    let permanent = env
        .publish(&TaskRequest::new(
            "diag.fail",
            json!({"kind": "permanent", "message": "no"}),
        ))
        .await;
    let got = until_final(&mut watch, &[&now, &later, &retried, &permanent], T_LONG).await;
    assert_eq!(states(&got[&now]), ["started", "succeeded"]);
    assert_eq!(
        states(&got[&later]),
        ["scheduled", "started", "succeeded"],
        "delayed through the quorum delay intake and tiers"
    );
    assert_eq!(
        states(&got[&retried]),
        [
            "started",
            "failed",
            "scheduled",
            "started",
            "failed",
            "dead"
        ],
        "retried through the quorum delay intake, then parked"
    );
    assert_eq!(final_event(&got[&retried]).attempt, 2);
    assert_eq!(states(&got[&permanent]), ["started", "failed", "dead"]);
    env.wait_depth(&n.dead(), 2, T_LONG).await;

    // Unroutable and expired on the replicated topology too.
    let _ = env.drain(&n.dead()).await;
    expired_unroutable_tasks_are_parked(&env, &mut watch).await;
}

#[tokio::test]
async fn replicated_over_a_classic_topology_is_a_one_line_conflict() {
    let env = Env::new("repl-conflict", &[]).await;
    let err = env
        .warren(&["topology", "apply"])
        .env(REPLICATED.0, REPLICATED.1)
        .fails();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    let line = errors[0];
    assert!(
        line.contains(&format!("{}.", env.prefix)),
        "names the queue: {line}"
    );
    assert!(
        line.contains("declared without topology.replicated = true"),
        "{line}"
    );
    assert!(line.contains("run `warren topology migrate`"), "{line}");
    assert!(
        line.ends_with("or set topology.replicated = false"),
        "{line}"
    );
    // A scheduler started with the replicated setting stops with that line.
    let mut env = env;
    let scheduler = env.spawn(&["scheduler"], &[REPLICATED]);
    let code = env.wait_exit(&scheduler, T_LONG).await;
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    assert!(
        env.log_of(&scheduler).contains(line),
        "{}",
        env.log_of(&scheduler)
    );
    // The classic topology is untouched and still applies.
    env.cli_ok(&["topology", "apply"]);
    // `topology show` prints the replicated plan without a broker.
    let out = env
        .warren(&["topology", "show"])
        .env(REPLICATED.0, REPLICATED.1)
        .succeeds();
    let text = String::from_utf8_lossy(&out.stdout);
    let dead = format!("queue {} ", env.names().dead());
    let line = text
        .lines()
        .find(|l| l.starts_with(&dead))
        .expect("P.dead listed");
    assert!(line.contains("x-queue-type=quorum"), "{line}");
}

#[tokio::test]
async fn migrate_moves_a_classic_topology_to_replicated_losing_nothing() {
    let mut env = Env::new("repl-migrate", &[]).await;
    let n = env.names();
    // Two delayed tasks waiting in a wait tier, held by the broker alone.
    let scheduler = env.spawn(&["scheduler"], &[]);
    let published_at = chrono::Utc::now().timestamp_millis();
    let mut delayed = Vec::new();
    for i in 0..2 {
        let req = TaskRequest::new("diag.echo", json!({ "d": i }))
            .id(format!("later-{i}"))
            .delay_ms(25_000);
        delayed.push(env.publish(&req).await);
    }
    env.wait_depth(&n.wait_tier(16), 2, T_LONG).await;
    env.kill(&scheduler, T_LONG).await;
    // Three tasks in a work queue (no worker), one parked unroutable, one dead.
    let mut now = Vec::new();
    for i in 0..3 {
        now.push(
            env.publish(&TaskRequest::new("diag.echo", json!({ "n": i })))
                .await,
        );
    }
    // One as another client would publish it: no `type` property, the
    // routing key alone says the type.
    env.publish_raw(
        &n.tasks(),
        "diag.echo",
        b"{}",
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("untyped".into()),
    )
    .await;
    now.push("untyped".to_owned());
    env.publish_raw(
        &n.tasks(),
        "nowhere.parked",
        b"{}",
        BasicProperties::default().with_message_id("parked".into()),
    )
    .await;
    env.publish_raw(
        "",
        &n.dead(),
        b"{}",
        BasicProperties::default().with_message_id("was-dead".into()),
    )
    .await;
    env.wait_depth(&n.work_queue("diag"), 4, T_LONG).await;
    env.wait_depth(&n.unroutable(), 1, T_LONG).await;
    env.wait_depth(&n.dead(), 1, T_LONG).await;

    let out = env
        .warren(&["topology", "migrate"])
        .env(REPLICATED.0, REPLICATED.1)
        .succeeds();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "queue {} redeclared, 4 messages moved out and back",
            n.work_queue("diag")
        )),
        "{text}"
    );

    // Every durable queue is quorum now, with its messages; the tier's are
    // back in it (a replicated tier has no TTL: the scheduler takes them out
    // and plans the rest of their wait from their due time), no release
    // tier is left (the replicated topology has none), nor a holding queue.
    let queues = Mgmt::new().queues_of(&env.prefix).await;
    for (name, kind, _) in &queues {
        assert!(!name.ends_with(".migrating"), "{name} left behind");
        if *name != n.cancels() {
            assert_eq!(kind, "quorum", "{name}");
        }
    }
    assert_eq!(env.depth(&n.work_queue("diag")).await, 4);
    assert_eq!(env.depth(&n.unroutable()).await, 1);
    assert_eq!(env.depth(&n.dead()).await, 1);
    // The classic tier's TTL (16 s) may have passed before the run reached
    // it (a loaded machine): the two are then in `P.wait.due`, moved as well.
    let tier = env.depth(&n.wait_tier(16)).await;
    let due = env.depth(&n.wait_due()).await;
    assert_eq!(tier + due, 2, "{tier} in the 16 s tier, {due} in wait.due");
    assert!(
        queues
            .iter()
            .all(|(name, _, _)| !name.contains(".release.")),
        "{queues:?}"
    );
    // A holding queue an interrupted run left behind is emptied into its
    // queue by the next run, which finds nothing else to redeclare.
    let hold = format!("{}.migrating", n.work_queue("diag"));
    let (conn, ch) = env.open_channel().await;
    ch.queue_declare(
        hold.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare a holding queue");
    let _ = conn.close(200, "bye".into()).await;
    env.publish_raw(
        "",
        &hold,
        b"{}",
        BasicProperties::default()
            .with_message_id("held".into())
            .with_type("diag.echo".into()),
    )
    .await;
    now.push("held".to_owned());
    let out = env
        .warren(&["topology", "migrate"])
        .env(REPLICATED.0, REPLICATED.1)
        .succeeds();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 queues redeclared"), "{text}");
    assert!(
        text.contains("1 messages moved back from holding queues"),
        "{text}"
    );
    assert_eq!(env.depth(&n.work_queue("diag")).await, 5);
    env.warren(&["topology", "apply"])
        .env(REPLICATED.0, REPLICATED.1)
        .succeeds();

    // Every task runs on the replicated topology, the delayed ones not early.
    let mut watch = env.watch(&["#"]).await;
    let up = env.spawn(&["up"], &[REPLICATED]);
    let all: Vec<&String> = now.iter().chain(&delayed).collect();
    let got = until_final(&mut watch, &all, T_LONG).await;
    for id in &all {
        assert_eq!(final_event(&got[*id]).state, TaskState::Succeeded, "{id}");
    }
    for id in &delayed {
        let started = got[id]
            .iter()
            .find(|e| e.event.state == TaskState::Started)
            .expect("started");
        assert!(
            warren_e2e::unix_ms(&started.event.at) >= published_at + 25_000,
            "{id} started early: {}",
            started.event.at
        );
    }
    let parked = env.drain(&n.unroutable()).await;
    assert_eq!(
        parked[0].0.message_id().as_ref().map(|m| m.as_str()),
        Some("parked")
    );

    // And back to classic, the dead task still there.
    env.kill(&up, T_LONG).await;
    env.wait_depth(&n.dead(), 1, T_LONG).await;
    env.cli_ok(&["topology", "migrate"]);
    for (name, kind, _) in Mgmt::new().queues_of(&env.prefix).await {
        if name != n.cancels() && !name.starts_with(&format!("{}.watch.", env.prefix)) {
            assert_eq!(kind, "classic", "{name}");
        }
    }
    let dead = env.drain(&n.dead()).await;
    assert_eq!(
        dead.iter()
            .map(|(p, _)| p.message_id().as_ref().map(|m| m.to_string()))
            .collect::<Vec<_>>(),
        [Some("was-dead".to_owned())]
    );
}
