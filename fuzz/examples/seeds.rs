//! Writes the seed corpus, `fuzz/corpus/<target>/<name>`: a few real
//! inputs for each target, valid and invalid. The corpus is committed; run
//! this after changing it (or a target's input layout):
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::fs;
use std::path::Path;

use amq_protocol_types::{AMQPValue, FieldArray, FieldTable, LongString};
use warren_core::config::CRON_SAMPLES;
use warren_fuzz::{encode_table, FieldWriter};

fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(k.into(), v);
    }
    t
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Flag bits of the `task_envelope` input.
const VIA_TASKS: u8 = 1;
const CT: u8 = 1 << 1;
const ENC: u8 = 1 << 2;
const TYPE: u8 = 1 << 3;
const ID: u8 = 1 << 4;
const HEADERS: u8 = 1 << 5;

struct Delivery<'a> {
    flags: u8,
    max_body_log2: u8,
    pad: u32,
    routing_key: &'a str,
    content_type: &'a str,
    encoding: &'a str,
    type_: &'a str,
    id: &'a str,
    headers: Option<FieldTable>,
    body: &'a [u8],
}

impl Default for Delivery<'_> {
    fn default() -> Self {
        Delivery {
            flags: VIA_TASKS | CT | ID,
            max_body_log2: 20,
            pad: 0,
            routing_key: "diag.echo",
            content_type: "application/json",
            encoding: "",
            type_: "",
            id: "0193a5b2-7c1e-7000-8000-000000000001",
            headers: None,
            body: br#"{"hello":"world"}"#,
        }
    }
}

impl Delivery<'_> {
    fn encode(&self) -> Vec<u8> {
        let flags = self.flags | if self.headers.is_some() { HEADERS } else { 0 };
        let headers = self.headers.as_ref().map(encode_table).unwrap_or_default();
        FieldWriter::new()
            .byte(flags)
            .byte(self.max_body_log2)
            .u32(self.pad)
            .field(self.routing_key.as_bytes())
            .field(self.content_type.as_bytes())
            .field(self.encoding.as_bytes())
            .field(self.type_.as_bytes())
            .field(self.id.as_bytes())
            .field(&headers)
            .finish(self.body)
    }
}

fn task_envelope() -> Vec<(&'static str, Vec<u8>)> {
    let mut deep = table(vec![("leaf", long("v"))]);
    for _ in 0..32 {
        deep = table(vec![("n", AMQPValue::FieldTable(deep))]);
    }
    let x_death =
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(table(vec![
            ("count", AMQPValue::LongLongInt(2)),
            ("queue", long("warren.wait.4s")),
            ("reason", long("expired")),
            ("time", AMQPValue::Timestamp(1_800_000_000)),
        ]))]));
    let d = Delivery::default;
    vec![
        ("valid-echo", d().encode()),
        (
            "republished-attempt-3",
            Delivery {
                headers: Some(table(vec![
                    ("x-warren-republished", AMQPValue::Boolean(true)),
                    ("x-warren-attempt", AMQPValue::LongLongInt(3)),
                    ("x-warren-max-retries", long("2")),
                    ("x-warren-timeout-ms", AMQPValue::LongInt(500)),
                    ("x-death", x_death),
                    ("x-warren-original-expiration", long("60000")),
                ])),
                ..d()
            }
            .encode(),
        ),
        (
            "attempt-0-and-negative-retries",
            Delivery {
                headers: Some(table(vec![
                    ("x-warren-republished", AMQPValue::Boolean(true)),
                    ("x-warren-attempt", AMQPValue::ShortShortInt(0)),
                    ("x-warren-max-retries", long("-1")),
                    ("x-warren-original-expiration", long(&"0".repeat(300))),
                ])),
                ..d()
            }
            .encode(),
        ),
        (
            "text-plain",
            Delivery {
                content_type: "text/plain",
                ..d()
            }
            .encode(),
        ),
        (
            "gzip",
            Delivery {
                flags: VIA_TASKS | CT | ENC | ID,
                encoding: "gzip",
                ..d()
            }
            .encode(),
        ),
        (
            "not-json",
            Delivery {
                body: b"{not json",
                ..d()
            }
            .encode(),
        ),
        (
            "type-property-bad",
            Delivery {
                flags: TYPE,
                routing_key: "warren.q.diag",
                type_: "bad..type",
                ..d()
            }
            .encode(),
        ),
        (
            "body-over-16-bytes",
            Delivery {
                max_body_log2: 4,
                body: br#"{"a":"0123456789abcdef"}"#,
                ..d()
            }
            .encode(),
        ),
        (
            "headers-33-deep",
            Delivery {
                headers: Some(deep),
                ..d()
            }
            .encode(),
        ),
        (
            "headers-exactly-64k",
            Delivery { pad: 65_521, ..d() }.encode(),
        ),
        (
            "headers-one-byte-over",
            Delivery { pad: 65_522, ..d() }.encode(),
        ),
        (
            "headers-too-large",
            Delivery { pad: 65_600, ..d() }.encode(),
        ),
    ]
}

/// Kinds of the `delay_headers` values.
const ABSENT: u8 = 0;
const LONGSTR: u8 = 2;
const I64: u8 = 3;
const I32: u8 = 4;
const DOUBLE: u8 = 6;

const NOW: u64 = 1_800_000_000_000;

fn delay(eta: (u8, &[u8]), delay: (u8, &[u8]), max_delay_ms: u64) -> Vec<u8> {
    FieldWriter::new()
        .byte(eta.0)
        .byte(delay.0)
        .u64(NOW)
        .u64(max_delay_ms)
        .field(eta.1)
        .field(delay.1)
        .finish(&[])
}

fn delay_headers() -> Vec<(&'static str, Vec<u8>)> {
    let n = |v: i64| v.to_be_bytes().to_vec();
    let none: (u8, &[u8]) = (ABSENT, b"");
    let year2 = n(2 * 365 * 24 * 3600 * 1000);
    let eta_ms = (NOW + 42).to_string();
    vec![
        ("delay-5s", delay(none, (I32, &n(5000)[4..]), 0)),
        ("delay-text-250", delay(none, (LONGSTR, b"250"), 0)),
        ("delay-negative", delay(none, (I64, &n(-5000)), 0)),
        ("delay-soon", delay(none, (LONGSTR, b"soon"), 0)),
        (
            "delay-double",
            delay(none, (DOUBLE, &1.5f64.to_bits().to_be_bytes()), 0),
        ),
        ("delay-2-years", delay(none, (I64, &year2), 0)),
        (
            "eta-rfc3339",
            delay((LONGSTR, b"2027-01-15T10:00:00.250Z"), none, 0),
        ),
        (
            "eta-offset-short-max",
            delay((LONGSTR, b" 2027-01-15T10:00:00+05:30 "), none, 4000),
        ),
        (
            "eta-unix-ms-text",
            delay((LONGSTR, eta_ms.as_bytes()), none, 0),
        ),
        (
            "eta-wins",
            delay((I64, &n(NOW as i64 + 9000)), (I32, &n(5000)[4..]), 0),
        ),
        ("eta-tomorrow", delay((LONGSTR, b"tomorrow"), none, 0)),
        ("no-delay", delay(none, none, 0)),
    ]
}

fn event_decode() -> Vec<(&'static str, Vec<u8>)> {
    let e = |s: &str| s.as_bytes().to_vec();
    vec![
        (
            "succeeded",
            e(
                r#"{"event_id":"0193a5b2-7c1e-7000-8000-0000000000e1","task_id":"t1","type":"diag.echo","state":"succeeded","attempt":1,"queue":"diag","worker":"host-a/4711","at":"2026-11-24T10:00:00.123Z","duration_ms":0,"result":{"hello":"world","n":[1,2.5,-3e7]},"error":null,"reason":null,"due_at":null}"#,
            ),
        ),
        (
            "failed-retry",
            e(
                r#"{"event_id":"e2","task_id":"t1","type":"http.request","state":"failed","attempt":2,"queue":"io","worker":"w/1","at":"2026-11-24T10:00:01.000Z","duration_ms":30000,"result":null,"error":{"kind":"retryable","code":"timeout","message":"timed out after 30000 ms"},"reason":null,"due_at":null,"retry":true}"#,
            ),
        ),
        (
            "progress",
            e(
                r#"{"event_id":"e3","task_id":"t2","type":"file.download","state":"progress","attempt":1,"queue":"io","worker":"w/1","at":"2026-11-24T10:00:02.000Z","duration_ms":null,"result":null,"error":null,"reason":null,"due_at":null,"progress":{"bytes":1048576,"total":null}}"#,
            ),
        ),
        (
            "scheduled",
            e(
                r#"{"event_id":"e4","task_id":"t3","type":"diag.sleep","state":"scheduled","attempt":0,"queue":null,"worker":"s/2","at":"2026-11-24T10:00:03.000Z","duration_ms":null,"result":null,"error":null,"reason":null,"due_at":"2026-11-24T10:05:00.000Z"}"#,
            ),
        ),
        (
            "dead-long-type",
            e(&format!(
                r#"{{"event_id":"e5","task_id":"t4","type":"{}","state":"dead","attempt":0,"queue":null,"worker":null,"at":"x","duration_ms":null,"result":null,"error":{{"kind":"permanent","code":"type_too_long","message":"m"}},"reason":"invalid","due_at":null}}"#,
                "a".repeat(240)
            )),
        ),
        (
            "unknown-state",
            e(
                r#"{"event_id":"e6","task_id":"t5","type":"diag.echo","state":"exploded","attempt":1,"queue":null,"worker":null,"at":"","duration_ms":null,"result":null,"error":null,"reason":null,"due_at":null}"#,
            ),
        ),
        (
            "duplicate",
            e(
                r#"{"event_id":"e7","task_id":"t7","type":"diag.echo","state":"duplicate","attempt":0,"queue":"diag","worker":"w/1","at":"2026-11-24T10:00:04.000Z","duration_ms":null,"result":null,"error":null,"reason":"duplicate of t1","due_at":null,"duplicate_of":"t1"}"#,
            ),
        ),
        ("missing-keys", e(r#"{"task_id":"t6","state":"started"}"#)),
        ("not-json", e("started.diag.echo")),
    ]
}

fn control_message() -> Vec<(&'static str, Vec<u8>)> {
    let e = |s: &str| s.as_bytes().to_vec();
    vec![
        (
            "cancel",
            e(r#"{"cancel":"0193a5b2-7c1e-7000-8000-000000000001"}"#),
        ),
        (
            "marker",
            e(r#"{"marker":"0193a5b2-7c1e-7000-8000-0000000000b0"}"#),
        ),
        ("both", e(r#"{"marker":"m","cancel":"t\u00e9\n"}"#)),
        ("cancel-not-a-string", e(r#"{"cancel":5,"marker":null}"#)),
        ("array", e(r#"["cancel","t"]"#)),
        ("garbage", b"\xff{\"cancel\"".to_vec()),
    ]
}

fn config_toml() -> Vec<(&'static str, Vec<u8>)> {
    let e = |s: &str| s.as_bytes().to_vec();
    vec![
        ("quorum", e(include_str!("../../config/examples/quorum.toml"))),
        ("default-queue", e(include_str!("../../config/examples/with-default-queue.toml"))),
        ("cron", e("[[scheduler.cron]]\nname = \"morning-ping\"\nschedule = \"0 30 7 * * MON-FRI\"\ntimezone = \"Europe/Paris\"\ntask_type = \"diag.echo\"\nargs = { hello = \"world\" }\npriority = 5\nmissed = \"run_once\"\n")),
        ("http-rules", e("[http]\nallow = [\"example.com\", \"10.0.0.0/8\"]\ndeny = [\"fc00::/7\"]\nallow_loopback = true\n\n[retry.types.\"http.request\"]\nmax_retries = 5\n")),
        ("worker", e("prefix = \"w-1\"\n[worker]\nqueues = [\"io\"]\nconcurrency = 4\ntype_concurrency = { \"file.download\" = 2 }\n[limits]\nmax_body_bytes = 1024\n")),
        ("unknown-key", e("[worker]\nconcurency = 4\n")),
        ("bad-values", e("prefix = \"\"\n[broker]\nurl = \"http://x\"\n[scheduler]\nmax_delay_ms = 0\n[[routes]]\npattern = \"a.#.b\"\nqueue = \"missing\"\n")),
        ("not-toml", e("[worker\nconcurrency = = 4\n")),
    ]
}

fn cron_expr() -> Vec<(String, Vec<u8>)> {
    CRON_SAMPLES
        .iter()
        .enumerate()
        .map(|(i, (expr, ok))| {
            let name = format!("{i:02}-{}", if *ok { "valid" } else { "invalid" });
            let mut bytes = vec![b'0' + (i % 6) as u8];
            bytes.extend_from_slice(expr.as_bytes());
            (name, bytes)
        })
        .collect()
}

fn write<N: AsRef<str>>(target: &str, seeds: Vec<(N, Vec<u8>)>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    if dir.exists() {
        fs::remove_dir_all(&dir).expect("clear the old seeds");
    }
    fs::create_dir_all(&dir).expect("create the corpus directory");
    for (name, bytes) in &seeds {
        fs::write(dir.join(name.as_ref()), bytes).expect("write a seed");
    }
    println!("{target}: {} seeds", seeds.len());
}

fn chord_start() -> Vec<(&'static str, Vec<u8>)> {
    let e = |s: &str| s.as_bytes().to_vec();
    vec![
        (
            "start",
            e(r#"{"size":3,"callback":{"type":"diag.echo","args":{"k":1}}}"#),
        ),
        ("huge", e(r#"{"size":1000000,"callback":{"type":"a.b"}}"#)),
        (
            "outcome",
            e(r#"{"index":2,"task_id":"c.2","state":"succeeded","result":{"n":1}}"#),
        ),
        (
            "dead",
            e(
                r#"{"index":1,"task_id":"c.1","state":"dead","reason":"permanent_failure","error":{"code":"x","message":"m"}}"#,
            ),
        ),
    ]
}

fn main() {
    write("task_envelope", task_envelope());
    write("delay_headers", delay_headers());
    write("event_decode", event_decode());
    write("control_message", control_message());
    write("config_toml", config_toml());
    write("cron_expr", cron_expr());
    write("chord_start", chord_start());
}
