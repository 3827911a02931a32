//! The test-node harness itself (`tests/support/node.rs`): an extra node
//! with a plugin and start arguments answers on its own ports, and nothing
//! of it is left once dropped.

use std::time::Duration;

use warren_e2e::{NodeOptions, TestNode, T};

#[tokio::test]
async fn a_test_node_answers_on_its_own_ports_and_is_gone_after_drop() {
    let node = TestNode::start(
        "node",
        NodeOptions {
            plugins: vec!["rabbitmq_management".into()],
            start_args: "-rabbit consumer_timeout 12345".into(),
            ..NodeOptions::default()
        },
    )
    .await;
    assert_ne!(node.amqp_port(), 5672);

    // AMQP on its own port.
    let conn = lapin::Connection::connect(&node.amqp_url(), Default::default())
        .await
        .expect("AMQP on the node's port");
    conn.close(200, "done".into()).await.expect("close");

    // The management API on its own port, naming this node.
    let port = node.management_port().expect("management enabled");
    let url = format!("http://127.0.0.1:{port}/api/overview");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + T;
    let overview: serde_json::Value = loop {
        let got = http
            .get(&url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
        if let Ok(r) = got.and_then(|r| r.error_for_status()) {
            break r.json().await.expect("JSON overview");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no management API on {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(overview["node"], node.name());

    // The start arguments reached the node.
    let out = node.rabbitmqctl(&["eval", "application:get_env(rabbit, consumer_timeout)."]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{ok,12345}");

    let (dir, amqp_port) = (node.dir().to_owned(), node.amqp_port());
    drop(node);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", amqp_port)).is_err(),
        "the node still listens on {amqp_port}"
    );
}
