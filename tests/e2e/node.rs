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

#[tokio::test]
async fn three_test_nodes_form_one_cluster_that_replicates_a_quorum_queue() {
    let cluster = warren_e2e::TestCluster::start("trio", 3, NodeOptions::default()).await;
    let mut names: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.name().to_owned())
        .collect();
    names.sort();
    assert_eq!(
        cluster.running_nodes(),
        names,
        "every node runs in one cluster"
    );

    // A quorum queue declared through the first node, a message published
    // there with a confirm, and taken through the third.
    let q = "trio-quorum";
    let first = lapin::Connection::connect(&cluster.nodes()[0].amqp_url(), Default::default())
        .await
        .expect("AMQP on the first node");
    let ch = first.create_channel().await.expect("channel");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        q.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare a quorum queue");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let confirm = ch
        .basic_publish(
            "".into(),
            q.into(),
            Default::default(),
            b"replicated",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let third = lapin::Connection::connect(&cluster.nodes()[2].amqp_url(), Default::default())
        .await
        .expect("AMQP on the third node");
    let ch3 = third.create_channel().await.expect("channel");
    let deadline = tokio::time::Instant::now() + T;
    let got = loop {
        if let Some(m) = ch3
            .basic_get(q.into(), lapin::options::BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message never reached the third node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(got.delivery.data, b"replicated");
    // Its members: one replica on each node.
    let out =
        cluster.nodes()[2].rabbitmqctl(&["list_queues", "name", "members", "--formatter", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for name in &names {
        assert!(
            text.contains(name.as_str()),
            "{name} holds a replica: {text}"
        );
    }
    let _ = third.close(200, "done".into()).await;
    let _ = first.close(200, "done".into()).await;

    let dirs: Vec<_> = cluster.nodes().iter().map(|n| n.dir().to_owned()).collect();
    drop(cluster);
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}
