//! Malformed messages are parked dead `invalid`, intact, and the worker keeps working.

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use warren_client::TaskRequest;
use warren_core::headers::get_str;
use warren_core::TaskState;
use warren_e2e::{final_event, until_final, Env, T};

fn props(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
}

#[tokio::test]
async fn each_kind_of_invalid_message_is_parked_with_its_reason_and_nothing_is_lost() {
    let (env, mut watch) =
        Env::with_up_watching("invalid", &[("WARREN__LIMITS__MAX_BODY_BYTES", "1024")]).await;
    let tasks = env.names().tasks();
    let mut hostile = FieldTable::default();
    hostile.insert(
        "x-warren-timeout-ms".into(),
        AMQPValue::LongString("soon".into()),
    );
    hostile.insert("x-custom".into(), AMQPValue::LongString("kept".into()));
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    let cases: Vec<(&str, &str, Vec<u8>, BasicProperties, &str)> = vec![
        (
            "bad-json",
            "diag.echo",
            b"{not json".to_vec(),
            props("bad-json"),
            "not_json",
        ),
        (
            "bad-ct",
            "diag.echo",
            b"{}".to_vec(),
            props("bad-ct").with_content_type("text/plain".into()),
            "content_type",
        ),
        (
            "bad-enc",
            "diag.echo",
            b"{}".to_vec(),
            props("bad-enc").with_content_encoding("gzip".into()),
            "content_encoding",
        ),
        (
            "too-big",
            "diag.echo",
            big.into_bytes(),
            props("too-big"),
            "too_large",
        ),
        (
            "no-handler",
            "diag.unknown",
            b"{}".to_vec(),
            props("no-handler"),
            "no_handler",
        ),
        (
            "bad-header",
            "diag.echo",
            b"{}".to_vec(),
            props("bad-header").with_headers(hostile),
            "bad_header",
        ),
    ];
    for (_, rk, body, p, _) in &cases {
        env.publish_raw(&tasks, rk, body, p.clone()).await;
    }
    let ids: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    let got = until_final(&mut watch, &ids, T).await;
    for (id, _, _, _, code) in &cases {
        let ev = final_event(&got[*id]);
        assert_eq!(ev.state, TaskState::Dead, "{id}");
        assert_eq!(ev.reason.as_deref(), Some("invalid"), "{id}");
        assert_eq!(ev.error.as_ref().unwrap().code, *code, "{id}");
        assert_eq!(ev.attempt, 0, "{id}: no attempt started");
        assert_eq!(got[*id].len(), 1, "{id}: only the dead event");
    }
    // Every one is in P.dead with body, properties and headers intact.
    let dead = env.drain(&env.names().dead()).await;
    assert_eq!(dead.len(), cases.len());
    for (id, rk, body, p, _) in &cases {
        let (dp, db) = dead
            .iter()
            .find(|(dp, _)| dp.message_id().as_ref().map(|m| m.as_str()) == Some(*id))
            .unwrap_or_else(|| panic!("{id} in P.dead"));
        assert_eq!(db, body, "{id}: body intact");
        assert_eq!(dp.content_type(), p.content_type(), "{id}");
        assert_eq!(dp.content_encoding(), p.content_encoding(), "{id}");
        assert_eq!(dp.kind().as_ref().unwrap().as_str(), *rk, "{id}: type set");
        let h = dp.headers().clone().unwrap();
        assert_eq!(
            get_str(Some(&h), "x-warren-dead-reason").as_deref(),
            Some("invalid")
        );
        assert!(get_str(Some(&h), "x-warren-dead-detail").is_some());
        if *id == "bad-header" {
            assert_eq!(get_str(Some(&h), "x-custom").as_deref(), Some("kept"));
            assert_eq!(
                get_str(Some(&h), "x-warren-timeout-ms").as_deref(),
                Some("soon")
            );
        }
    }
    // The worker is still working.
    let ev = env
        .call(&TaskRequest::new("diag.echo", json!({"still": "alive"})), T)
        .await;
    assert_eq!(ev.state, TaskState::Succeeded);
    assert_eq!(env.depth(&env.names().work_queue("diag")).await, 0);
}

#[tokio::test]
async fn invalid_arguments_are_a_permanent_failure_not_an_invalid_message() {
    let env = Env::with_up("badargs", &[]).await;
    let ev = env
        .call(&TaskRequest::new("diag.sleep", json!({"ms": "soon"})), T)
        .await;
    assert_eq!(ev.state, TaskState::Dead);
    assert_eq!(ev.reason.as_deref(), Some("permanent_failure"));
    assert_eq!(ev.error.unwrap().code, "invalid_args");
    assert_eq!(ev.attempt, 1);
}
