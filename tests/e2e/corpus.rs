//! A seeded corpus of hostile messages (body, properties, headers, routing
//! keys; to `P.tasks` and `P.delay`) interleaved with valid tasks, against
//! one `warren up`: nothing is lost, nothing stalls, memory stays bounded.

use std::collections::{HashMap, HashSet};

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::BasicProperties;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use warren_core::TaskState;
use warren_e2e::{Env, T_LONG as T};

/// Fixed, so a failure can be replayed; printed on failure.
const SEED: u64 = 0x5741_5252_454e;

/// Hostile messages in the corpus; one valid task follows every fourth.
const HOSTILE: usize = 320;

/// Where a message goes: to a work queue (and so to a final event), or, its
/// type matching no route of the shipped configuration, to `P.unroutable`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lands {
    Queue,
    Unroutable,
}

/// One message of the corpus.
struct Msg {
    exchange_is_delay: bool,
    routing_key: String,
    body: Vec<u8>,
    props: BasicProperties,
    lands: Lands,
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A header table nested `depth` deep.
fn nested(depth: usize) -> AMQPValue {
    let mut v = AMQPValue::LongInt(1);
    for _ in 0..depth {
        let mut t = FieldTable::default();
        t.insert("n".into(), v);
        v = AMQPValue::FieldTable(t);
    }
    v
}

/// A header value of every AMQP field type RabbitMQ accepts, at random.
fn any_value(rng: &mut StdRng) -> AMQPValue {
    match rng.gen_range(0..12) {
        0 => AMQPValue::Boolean(rng.gen()),
        1 => AMQPValue::ShortShortInt(rng.gen()),
        2 => AMQPValue::ShortInt(rng.gen()),
        3 => AMQPValue::LongInt(rng.gen()),
        4 => AMQPValue::LongLongInt(rng.gen()),
        5 => AMQPValue::Float(rng.gen()),
        6 => AMQPValue::Double(rng.gen()),
        7 => AMQPValue::Timestamp(rng.gen()),
        // Not ShortString: RabbitMQ reads its tag as a short integer and
        // closes the publisher's connection; it never reaches a consumer.
        8 => AMQPValue::ShortUInt(rng.gen()),
        9 => long_string("🦀 text \u{0} with a nul"),
        10 => AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::Void,
            AMQPValue::Boolean(true),
        ])),
        _ => AMQPValue::ByteArray(vec![0u8, 255, 7].into()),
    }
}

/// Headers a stranger could send: every Warren header with a wrong type or
/// an absurd value, huge, deep or many headers, forged system headers.
fn hostile_headers(rng: &mut StdRng) -> FieldTable {
    let mut h = FieldTable::default();
    let warren_keys = [
        "x-warren-timeout-ms",
        "x-warren-max-retries",
        "x-warren-attempt",
        "x-warren-republished",
        "x-warren-redeliveries",
        "x-warren-eta",
        "x-delay",
        "x-death",
    ];
    match rng.gen_range(0..7) {
        0 => {
            let k = warren_keys[rng.gen_range(0..warren_keys.len())];
            h.insert(k.into(), any_value(rng));
        }
        1 => {
            let k = warren_keys[rng.gen_range(0..warren_keys.len())];
            let absurd = [
                AMQPValue::LongLongInt(i64::MIN),
                AMQPValue::LongLongInt(i64::MAX),
                long_string("-1"),
                long_string("99999999999999999999999"),
                long_string(""),
            ];
            h.insert(k.into(), absurd[rng.gen_range(0..absurd.len())].clone());
        }
        2 => {
            h.insert(
                "pad".into(),
                long_string(&"x".repeat(rng.gen_range(60_000..110_000))),
            );
        }
        3 => {
            // Deeper than the limit; the test binary's own threads have small
            // stacks (e2e/hostile.rs sends one as deep as a frame allows).
            h.insert("deep".into(), nested(rng.gen_range(30..200)));
        }
        4 => {
            for i in 0..rng.gen_range(100..2_500) {
                h.insert(format!("h-{i}").into(), AMQPValue::LongInt(i));
            }
        }
        5 => {
            for i in 0..20 {
                h.insert(format!("any-{i}").into(), any_value(rng));
            }
        }
        _ => {
            h.insert("x-warren-republished".into(), AMQPValue::Boolean(true));
            h.insert("x-warren-attempt".into(), AMQPValue::LongLongInt(i64::MAX));
        }
    }
    h
}

/// A hostile body: not JSON, not an object, deep, empty, binary, too large.
fn hostile_body(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..8) {
        0 => b"{not json".to_vec(),
        1 => b"[1,2,3]".to_vec(),
        2 => b"null".to_vec(),
        3 => Vec::new(),
        4 => (0..64).map(|_| rng.gen()).collect(),
        5 => "[".repeat(100_000).into_bytes(),
        // Over the 4 KiB body limit this test sets.
        6 => format!("{{\"pad\":\"{}\"}}", "x".repeat(5_000)).into_bytes(),
        _ => br#"{"ok": "but odd \u0000 \ud800"}"#.to_vec(),
    }
}

/// A routing key and where it lands under the shipped routes (`diag.*`,
/// `http.*`, `file.*`; no default queue).
fn hostile_key(rng: &mut StdRng) -> (String, Lands) {
    match rng.gen_range(0..7) {
        0 => ("nope.nothing".into(), Lands::Unroutable),
        1 => ("diag.echo.extra".into(), Lands::Unroutable),
        2 => ("".into(), Lands::Unroutable),
        3 => ("diag.*".into(), Lands::Queue),
        4 => ("diag.ünïcode".into(), Lands::Queue),
        5 => (format!("diag.{}", "x".repeat(250)), Lands::Queue),
        _ => ("diag.unknown".into(), Lands::Queue),
    }
}

fn base_props(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// One hostile message with id `id`: one part of it hostile at a time, so
/// the rest of it decides where it lands.
fn hostile(rng: &mut StdRng, id: &str) -> Msg {
    let mut m = Msg {
        exchange_is_delay: rng.gen_bool(0.25),
        routing_key: "diag.echo".into(),
        body: b"{}".to_vec(),
        props: base_props(id),
        lands: Lands::Queue,
    };
    if m.exchange_is_delay {
        m.props = m.props.with_headers(delay_headers(rng));
    }
    match rng.gen_range(0..4) {
        0 => m.body = hostile_body(rng),
        1 => {
            let mut h = hostile_headers(rng);
            if m.exchange_is_delay && !h.inner().contains_key("x-delay") {
                h.insert("x-delay".into(), AMQPValue::LongInt(50));
            }
            m.props = m.props.with_headers(h);
        }
        2 => {
            let p = m.props.clone();
            m.props = match rng.gen_range(0..6) {
                0 => p.with_content_type("text/plain".into()),
                1 => p.with_content_encoding("gzip".into()),
                2 => p.with_priority(255),
                3 => p.with_type("file.download".into()),
                4 => p.with_reply_to("no-such-queue-anywhere".into()),
                _ => p.with_expiration("0".into()),
            };
        }
        _ => {
            let (key, lands) = hostile_key(rng);
            m.routing_key = key;
            m.lands = lands;
            if m.exchange_is_delay {
                // A valid delay, so the key alone decides where it lands.
                let mut h = FieldTable::default();
                h.insert("x-delay".into(), AMQPValue::LongInt(50));
                m.props = m.props.with_headers(h);
            }
        }
    }
    m
}

/// Delay headers, mostly valid and short, sometimes absurd.
fn delay_headers(rng: &mut StdRng) -> FieldTable {
    let mut h = FieldTable::default();
    let v = match rng.gen_range(0..6) {
        0 => long_string("soon"),
        1 => AMQPValue::LongLongInt(-5),
        2 => AMQPValue::Double(1.5),
        _ => AMQPValue::LongInt(rng.gen_range(10..300)),
    };
    h.insert("x-delay".into(), v);
    h
}

fn valid(id: &str, delayed: bool) -> Msg {
    let mut props = base_props(id);
    if delayed {
        let mut h = FieldTable::default();
        h.insert("x-delay".into(), AMQPValue::LongInt(100));
        props = props.with_headers(h);
    }
    Msg {
        exchange_is_delay: delayed,
        routing_key: "diag.echo".into(),
        body: br#"{"valid": true}"#.to_vec(),
        props,
        lands: Lands::Queue,
    }
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

#[tokio::test]
async fn a_seeded_hostile_corpus_loses_nothing_stalls_nothing_and_memory_stays_bounded() {
    let mut env = Env::new("corpus", &[("WARREN__LIMITS__MAX_BODY_BYTES", "4096")]).await;
    let up = env.up(&[]);
    let mut watch = env.watch(&["#"]).await;
    let (tasks, delay) = (env.names().tasks(), env.names().delay());
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut corpus = Vec::new();
    for i in 0..HOSTILE {
        corpus.push((format!("h-{i}"), hostile(&mut rng, &format!("h-{i}"))));
        if i % 4 == 3 {
            let id = format!("v-{i}");
            let delayed = rng.gen_bool(0.25);
            corpus.push((id.clone(), valid(&id, delayed)));
        }
    }
    // Messages without an id: the worker gives each one.
    let anonymous = 5;
    for _ in 0..anonymous {
        let mut m = valid("", false);
        m.props = BasicProperties::default().with_content_type("application/json".into());
        corpus.push((String::new(), m));
    }
    for (_, m) in &corpus {
        let ex = if m.exchange_is_delay { &delay } else { &tasks };
        env.client
            .publish_raw(ex, &m.routing_key, &m.body, m.props.clone())
            .await
            .unwrap_or_else(|e| panic!("seed {SEED:#x}: publish to {:?}: {e}", m.routing_key));
    }
    let expect: HashSet<&str> = corpus
        .iter()
        .filter(|(id, m)| !id.is_empty() && m.lands == Lands::Queue)
        .map(|(id, _)| id.as_str())
        .collect();
    let unroutable = corpus
        .iter()
        .filter(|(_, m)| m.lands == Lands::Unroutable)
        .count();

    // Every task that reached a queue ends with exactly one final event.
    let mut finals: HashMap<String, Vec<TaskState>> = HashMap::new();
    let mut anonymous_finals = 0;
    let deadline = tokio::time::Instant::now() + T;
    while expect.iter().any(|id| !finals.contains_key(*id)) || anonymous_finals < anonymous {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(got) = watch.next(left).await.expect("watch") else {
            let missing: Vec<_> = expect
                .iter()
                .filter(|id| !finals.contains_key(**id))
                .take(10)
                .collect();
            panic!(
                "seed {SEED:#x}: no final event within {T:?} for {} tasks, e.g. {missing:?}; \
                 {anonymous_finals} of {anonymous} without an id",
                expect
                    .iter()
                    .filter(|id| !finals.contains_key(**id))
                    .count()
            );
        };
        let ev = got.event;
        if !ev.state.is_final() {
            continue;
        }
        if expect.contains(ev.task_id.as_str()) {
            finals.entry(ev.task_id).or_default().push(ev.state);
        } else {
            anonymous_finals += 1;
        }
    }
    for (id, states) in &finals {
        assert_eq!(states.len(), 1, "seed {SEED:#x}: {id} ended {states:?}");
        if id.starts_with("v-") {
            assert_eq!(
                states[0],
                TaskState::Succeeded,
                "seed {SEED:#x}: valid task {id}"
            );
        }
    }
    assert_eq!(anonymous_finals, anonymous, "seed {SEED:#x}");
    // The rest is parked in P.unroutable; the work queues are empty.
    env.wait_depth(&env.names().unroutable(), unroutable as u32, T)
        .await;
    for q in ["diag", "io", "cpu"] {
        env.wait_depth(&env.names().work_queue(q), 0, T).await;
    }
    // Bounded memory: well under what one copy of each hostile message
    // held at once would take.
    let peak = peak_rss(up.pid);
    assert!(
        peak < 400 << 20,
        "seed {SEED:#x}: warren up peaked at {} MB",
        peak >> 20
    );
}
