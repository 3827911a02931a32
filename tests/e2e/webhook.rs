//! `[[webhook]]` task types through a real `warren up`: signed POSTs to a
//! small HTTP server of the test's on 127.0.0.1, which checks each
//! signature with an HMAC-SHA256 of its own (written here from SHA-256, not
//! the worker's crate), and to the Python receiver of examples/webhook.
//! Failure classes, Retry-After, response caps, the `[http]` rules, abort
//! on a time limit and a cancel, start-up errors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use warren_client::{ReceivedEvent, TaskRequest};
use warren_core::event::ErrorKind;
use warren_core::{Event, TaskState};
use warren_e2e::{failure_of, final_event, result_of, unix_ms, until_final, Env, T, T_LONG};

const SECRET: &str = "e2e-webhook-secret-5d1c";

/// HMAC-SHA256 (RFC 2104), computed here independently of the worker.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Why a request's signature does not hold, or `None` when it does.
fn signature_problem(headers: &BTreeMap<String, String>, body: &[u8]) -> Option<&'static str> {
    let Some(ts) = headers.get("x-warren-timestamp") else {
        return Some("no timestamp");
    };
    let Ok(at) = ts.parse::<i64>() else {
        return Some("bad timestamp");
    };
    if (chrono::Utc::now().timestamp() - at).abs() > 300 {
        return Some("stale timestamp");
    }
    let mut msg = format!("{ts}.").into_bytes();
    msg.extend_from_slice(body);
    let expected = format!("v1={}", hex::encode(hmac_sha256(SECRET.as_bytes(), &msg)));
    (headers.get("x-warren-signature") != Some(&expected)).then_some("signature mismatch")
}

/// One request the server read.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<Seen>>,
    /// Paths of `/hang` requests whose client closed the connection.
    closed: Mutex<Vec<String>>,
}

/// An HTTP/1.1 server of one request per connection, on 127.0.0.1.
///
/// Every path but `/hang` checks the signature first (401 `signature
/// mismatch` when it does not hold). Then: `/ok` answers 200 with the
/// request body as JSON; `/text` 200 text; `/flaky` 503 with `Retry-After:
/// 2` the first time, then 200; `/busy-date` 429 with a `Retry-After` HTTP
/// date 3 s ahead the first time, then 200; `/429` always 429; `/gone`
/// 404; `/big` 100 000 bytes; `/to-meta` and `/to-localhost` redirect
/// (307) to the metadata address and to `localhost`; `/hang` never answers
/// and records when the client hangs up.
struct HookServer {
    port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HookServer {
    async fn start() -> HookServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, port, shared.clone()));
            }
        });
        HookServer { port, state, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn seen(&self, path: &str) -> Vec<Seen> {
        let seen = self.state.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }

    /// Waits (bounded) until `n` requests to `path` arrived.
    async fn wait_seen(&self, path: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + T;
        while self.seen(path).len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} requests to {path} not seen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until `n` `/hang` connections were closed by the worker.
    async fn wait_closed(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + T;
        while self.state.closed.lock().unwrap().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker did not hang up {n} requests"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn serve(stream: TcpStream, port: u16, state: Arc<State>) {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).await.is_err() {
        return;
    }
    let count = {
        let mut seen = state.seen.lock().unwrap();
        seen.push(Seen {
            path: path.clone(),
            headers: headers.clone(),
            body: body.clone(),
        });
        seen.iter().filter(|s| s.path == path).count()
    };
    if path == "/hang" {
        let mut rest = [0u8; 64];
        while let Ok(n) = r.read(&mut rest).await {
            if n == 0 {
                break;
            }
        }
        state.closed.lock().unwrap().push(path);
        return;
    }
    let json = "application/json";
    let (status, ctype, extra, content): (&str, &str, String, Vec<u8>) =
        if let Some(why) = signature_problem(&headers, &body) {
            ("401 Unauthorized", "text/plain", String::new(), why.into())
        } else {
            match (path.as_str(), count) {
                ("/ok", _) => {
                    let task: Value = serde_json::from_slice(&body).unwrap();
                    let echo = json!({"verified": true, "task": task});
                    ("200 OK", json, String::new(), echo.to_string().into())
                }
                ("/text", _) => ("200 OK", "text/plain", String::new(), b"done".to_vec()),
                ("/flaky", 1) => (
                    "503 Service Unavailable",
                    "text/plain",
                    "Retry-After: 2\r\n".into(),
                    b"warming up".to_vec(),
                ),
                ("/busy-date", 1) => {
                    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
                    let date = at.format("%a, %d %b %Y %H:%M:%S GMT");
                    (
                        "429 Too Many Requests",
                        "text/plain",
                        format!("Retry-After: {date}\r\n"),
                        b"slow down".to_vec(),
                    )
                }
                ("/flaky" | "/busy-date", n) => (
                    "200 OK",
                    json,
                    String::new(),
                    json!({"request": n}).to_string().into(),
                ),
                ("/429", _) => (
                    "429 Too Many Requests",
                    "text/plain",
                    String::new(),
                    b"quota".to_vec(),
                ),
                ("/gone", _) => (
                    "404 Not Found",
                    "text/plain",
                    String::new(),
                    b"no such hook".to_vec(),
                ),
                ("/big", _) => ("200 OK", "text/plain", String::new(), vec![b'x'; 100_000]),
                ("/to-meta", _) => (
                    "307 Temporary Redirect",
                    "text/plain",
                    "Location: http://169.254.169.254/latest/meta-data/\r\n".into(),
                    Vec::new(),
                ),
                ("/to-localhost", _) => (
                    "307 Temporary Redirect",
                    "text/plain",
                    format!("Location: http://localhost:{port}/ok\r\n"),
                    Vec::new(),
                ),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    String::new(),
                    b"no route".to_vec(),
                ),
            }
        };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n",
        content.len()
    );
    let mut stream = r.into_inner();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&content).await;
    let _ = stream.shutdown().await;
}

/// A TOML string literal.
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// One `[[webhook]]` entry signed with the environment variable `secret_env`.
fn hook(task_type: &str, url: &str, secret_env: &str, extra: &str) -> String {
    format!(
        "[[webhook]]\ntype = {}\nurl = {}\nsecret_env = {}\n{extra}\n",
        lit(task_type),
        lit(url),
        lit(secret_env)
    )
}

/// A configuration file with these entries and a route of every `wh.#`
/// type to the io queue; the topology is applied with it.
fn configure(env: &Env, entries: &str) -> String {
    let cfg = env.config_file(&format!(
        "{entries}\n[[routes]]\npattern = \"wh.#\"\nqueue = \"io\"\n"
    ));
    env.cli_ok(&["--config", &cfg, "topology", "apply"]);
    cfg
}

/// Milliseconds from the first `failed` event to the second `started`.
fn retry_gap(events: &[ReceivedEvent]) -> (i64, &Event) {
    let evs: Vec<&Event> = events.iter().map(|e| &e.event).collect();
    let failed = evs
        .iter()
        .find(|e| e.state == TaskState::Failed)
        .expect("a failed event");
    let started: Vec<&&Event> = evs
        .iter()
        .filter(|e| e.state == TaskState::Started)
        .collect();
    assert_eq!(started.len(), 2, "{evs:?}");
    (unix_ms(&started[1].at) - unix_ms(&failed.at), failed)
}

#[tokio::test]
async fn signed_posts_succeed_and_each_failure_is_classed() {
    let srv = HookServer::start().await;
    let mut env = Env::new("webhook-classes", &[]).await;
    let var = "WARREN_E2E_WEBHOOK_SECRET";
    let wrong = "WARREN_E2E_WEBHOOK_WRONG";
    let entries = [
        hook("wh.ok", &srv.url("/ok"), var, ""),
        hook("wh.text", &srv.url("/text"), var, ""),
        hook("wh.flaky", &srv.url("/flaky"), var, ""),
        hook("wh.date", &srv.url("/busy-date"), var, ""),
        hook("wh.quota", &srv.url("/429"), var, ""),
        hook("wh.gone", &srv.url("/gone"), var, ""),
        hook("wh.big", &srv.url("/big"), var, "max_response_bytes = 1000"),
        hook("wh.tampered", &srv.url("/ok"), wrong, ""),
    ]
    .concat();
    let cfg = configure(&env, &entries);
    // Backoff alone would retry within 20 ms; Retry-After asks for more.
    let up = env.spawn(
        &["--config", &cfg, "up"],
        &[
            (var, SECRET),
            (wrong, "not-the-secret"),
            ("WARREN__RETRY__DEFAULT__BASE_MS", "20"),
            ("WARREN__RETRY__DEFAULT__CAP_MS", "20"),
        ],
    );
    let got = env
        .run_named(
            1,
            vec![
                ("ok", "wh.ok", json!({"n": [1, 2], "s": "héllo"})),
                ("text", "wh.text", json!({})),
                ("flaky", "wh.flaky", json!({})),
                ("date", "wh.date", json!({})),
                ("quota", "wh.quota", json!({})),
                ("gone", "wh.gone", json!({})),
                ("big", "wh.big", json!({})),
                ("tampered", "wh.tampered", json!({"x": 1})),
            ],
        )
        .await;

    // The server checked the signature; the body is {id, type, attempt, args}.
    let r = result_of(&got["ok"]);
    assert_eq!(r["verified"], true);
    let id = final_event(&got["ok"]).task_id.clone();
    assert_eq!(
        r["task"],
        json!({"id": id, "type": "wh.ok", "attempt": 1, "args": {"n": [1, 2], "s": "héllo"}})
    );
    // The tampered task posts to /ok too: pick this task's request.
    let seen = srv
        .seen("/ok")
        .into_iter()
        .find(|s| s.headers.get("x-warren-task-id") == Some(&id))
        .expect("the request of wh.ok, with its task id header");
    assert_eq!(seen.headers["content-type"], "application/json");
    assert!(seen.headers["x-warren-signature"].starts_with("v1="));
    assert_eq!(result_of(&got["text"]), &json!("done"));

    // 503, Retry-After: 2 (seconds), then success on the next attempt.
    let flaky = &got["flaky"];
    assert_eq!(result_of(flaky), &json!({"request": 2}));
    let (gap, failed) = retry_gap(flaky);
    let e = failed.error.as_ref().unwrap();
    assert_eq!(
        (e.kind, e.code.as_str()),
        (ErrorKind::Retryable, "http_503")
    );
    assert!(e.message.contains("warming up"), "{}", e.message);
    assert!(
        gap >= 1950,
        "retried {gap} ms after the 503; Retry-After said 2 s"
    );
    // 429 with an HTTP date 3 s ahead (whole seconds: at least 2 s left).
    let date = &got["date"];
    assert_eq!(result_of(date), &json!({"request": 2}));
    let (gap, failed) = retry_gap(date);
    assert_eq!(failed.error.as_ref().unwrap().code, "http_429");
    assert!(
        gap >= 1900,
        "retried {gap} ms after the 429; Retry-After named a date 2-3 s ahead"
    );
    // 429 every time: retryable, so dead only once the retries ran out.
    let (kind, code, _) = failure_of(&got["quota"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Retryable, "http_429"));
    assert_eq!(final_event(&got["quota"]).attempt, 2);
    assert_eq!(
        final_event(&got["quota"]).reason.as_deref(),
        Some("retries_exhausted")
    );
    // Other statuses: permanent, at once, with the start of the body.
    let (kind, code, message) = failure_of(&got["gone"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "http_404"));
    assert!(
        message.ends_with("answered 404 Not Found: no such hook"),
        "{message}"
    );
    assert_eq!(srv.seen("/gone").len(), 1);

    // Beyond max_response_bytes the body is cut.
    assert_eq!(
        result_of(&got["big"]),
        &json!({"output": "x".repeat(1000), "truncated": true})
    );

    // A request signed with another secret is told apart by the receiver.
    let (kind, code, message) = failure_of(&got["tampered"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "http_401"));
    assert!(message.contains("signature mismatch"), "{message}");

    // The secret reaches neither events nor the log.
    for events in got.values() {
        for e in events {
            let body = String::from_utf8(e.event.to_json()).unwrap();
            assert!(!body.contains(SECRET), "secret in event {body}");
        }
    }
    assert!(
        !env.log_of(&up).contains(SECRET),
        "secret in the worker log"
    );
}

#[tokio::test]
async fn only_the_configured_endpoint_is_allowed() {
    let srv = HookServer::start().await;
    // No http.allow_loopback: the endpoint on 127.0.0.1 is allowed as
    // configured; redirects leave it and are checked.
    let mut env = Env::new("webhook-rules", &[]).await;
    let var = "WARREN_E2E_WEBHOOK_SECRET";
    let entries = [
        hook("wh.ok", &srv.url("/ok"), var, ""),
        hook("wh.meta", &srv.url("/to-meta"), var, ""),
        hook("wh.local", &srv.url("/to-localhost"), var, ""),
    ]
    .concat();
    let cfg = configure(&env, &entries);
    env.spawn(&["--config", &cfg, "up"], &[(var, SECRET)]);
    let got = env
        .run_named(
            0,
            vec![
                ("ok", "wh.ok", json!({})),
                ("meta", "wh.meta", json!({})),
                ("local", "wh.local", json!({})),
            ],
        )
        .await;
    assert_eq!(result_of(&got["ok"])["verified"], true);
    let (kind, code, message) = failure_of(&got["meta"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "denied"));
    assert!(message.contains("always refused"), "{message}");
    let (kind, code, message) = failure_of(&got["local"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "denied"));
    assert!(message.contains("http.allow_loopback"), "{message}");
    // Neither redirect was followed.
    assert_eq!(srv.seen("/ok").len(), 1);
}

#[tokio::test]
async fn a_time_limit_and_a_cancel_abort_the_request() {
    let srv = HookServer::start().await;
    let mut env = Env::new("webhook-abort", &[]).await;
    let var = "WARREN_E2E_WEBHOOK_SECRET";
    let entries = [
        hook("wh.hang", &srv.url("/hang"), var, ""),
        hook("wh.short", &srv.url("/hang"), var, "timeout_ms = 500"),
    ]
    .concat();
    let cfg = configure(&env, &entries);
    env.spawn(&["--config", &cfg, "up"], &[(var, SECRET)]);
    let mut watch = env.watch(&["#"]).await;

    // The task's own time limit.
    let limited = env
        .publish(
            &TaskRequest::new("wh.hang", json!({}))
                .header_int("x-warren-max-retries", 0)
                .header_int("x-warren-timeout-ms", 1000),
        )
        .await;
    // The webhook's timeout_ms.
    let short = env
        .publish(&TaskRequest::new("wh.short", json!({})).header_int("x-warren-max-retries", 0))
        .await;
    let got = until_final(&mut watch, &[&limited, &short], T_LONG).await;
    for id in [&limited, &short] {
        let (kind, code, message) = failure_of(&got[id]);
        assert_eq!(
            (kind, code.as_str()),
            (ErrorKind::Retryable, "timeout"),
            "{message}"
        );
    }
    srv.wait_closed(2).await;

    // A cancel while the endpoint holds the request.
    let cancelled = env
        .publish(&TaskRequest::new("wh.hang", json!({})).header_int("x-warren-max-retries", 0))
        .await;
    srv.wait_seen("/hang", 3).await;
    env.client.cancel(&cancelled).await.unwrap();
    let got = until_final(&mut watch, &[&cancelled], T_LONG).await;
    assert_eq!(final_event(&got[&cancelled]).state, TaskState::Cancelled);
    srv.wait_closed(3).await;
    // Each request was signed as any other.
    for s in srv.seen("/hang") {
        assert_eq!(signature_problem(&s.headers, &s.body), None);
    }
}

/// The repository's examples/webhook/receiver.py.
fn receiver_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("webhook")
        .join("receiver.py")
}

/// The Python receiver on a free port; killed when dropped.
struct Receiver {
    child: tokio::process::Child,
    url: String,
}

impl Receiver {
    async fn start(secret: &str) -> Receiver {
        let mut child = tokio::process::Command::new("python3")
            .arg(receiver_script())
            .args(["--port", "0"])
            .env("WARREN_WEBHOOK_SECRET", secret)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start python3 receiver.py");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(T, lines.next_line())
            .await
            .expect("the receiver did not start in time")
            .unwrap()
            .expect("a line from the receiver");
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Receiver { child, url }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn the_python_receiver_verifies_signatures() {
    let receiver = Receiver::start(SECRET).await;
    let mut env = Env::new("webhook-python", &[]).await;
    let var = "WARREN_E2E_WEBHOOK_SECRET";
    let wrong = "WARREN_E2E_WEBHOOK_WRONG";
    let url = format!("{}/hook", receiver.url);
    let entries = [
        hook("wh.report", &url, var, ""),
        hook("wh.forged", &url, wrong, ""),
    ]
    .concat();
    let cfg = configure(&env, &entries);
    env.spawn(
        &["--config", &cfg, "up"],
        &[(var, SECRET), (wrong, "guessed")],
    );
    let got = env
        .run_named(
            0,
            vec![
                ("report", "wh.report", json!({"items": [1, 2, 3.5]})),
                ("bad", "wh.report", json!({"items": [1, "two"]})),
                ("forged", "wh.forged", json!({"items": [1]})),
            ],
        )
        .await;
    let r = result_of(&got["report"]);
    assert_eq!(r["count"], 3);
    assert_eq!(r["sum"], 6.5);
    assert_eq!(r["attempt"], 1);
    assert_eq!(r["task_id"], final_event(&got["report"]).task_id.as_str());
    let (kind, code, message) = failure_of(&got["bad"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "http_422"));
    assert!(message.contains("item 2 is not a number"), "{message}");
    let (kind, code, message) = failure_of(&got["forged"]);
    assert_eq!((kind, code.as_str()), (ErrorKind::Permanent, "http_401"));
    assert!(message.contains("signature mismatch"), "{message}");

    // A correctly signed request whose timestamp is old is refused too.
    let body = br#"{"id":"x","type":"wh.report","attempt":1,"args":{"items":[1]}}"#;
    let post = |ts: i64| {
        let mut msg = format!("{ts}.").into_bytes();
        msg.extend_from_slice(body);
        reqwest::Client::new()
            .post(&url)
            .header("X-Warren-Timestamp", ts.to_string())
            .header(
                "X-Warren-Signature",
                format!("v1={}", hex::encode(hmac_sha256(SECRET.as_bytes(), &msg))),
            )
            .body(body.to_vec())
            .send()
    };
    let now = chrono::Utc::now().timestamp();
    let fresh = post(now).await.unwrap();
    assert_eq!(fresh.status(), 200);
    let stale = post(now - 3600).await.unwrap();
    assert_eq!(stale.status(), 401);
    assert!(stale.text().await.unwrap().contains("stale"));
}

#[tokio::test]
async fn bad_webhook_settings_stop_the_worker_at_start_up() {
    let env = Env::new("webhook-setup", &[]).await;
    let error_line = |stderr: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line: {stderr}"))
            .to_owned()
    };
    // A URL that is not http(s): refused by validation, naming the key.
    let cfg = env.config_file(&hook("wh.a", "ftp://files.example/x", "S", ""));
    let line = error_line(&env.cli_err(&["--config", &cfg, "worker"]));
    assert!(
        line.contains("config key webhook[0].url: has scheme \"ftp\": use http or https"),
        "{line}"
    );
    // No secret at all.
    let cfg = env.config_file("[[webhook]]\ntype = \"wh.a\"\nurl = \"https://h.example/\"\n");
    let line = error_line(&env.cli_err(&["--config", &cfg, "worker"]));
    assert!(
        line.contains("config key webhook[0].secret_env: no signing secret"),
        "{line}"
    );
    // A secret variable that is not set, at start-up rather than at the first task.
    let cfg = env.config_file(&hook(
        "wh.a",
        "https://h.example/",
        "WARREN_E2E_UNSET_SECRET_9C2",
        "",
    ));
    let line = error_line(&env.cli_err(&["--config", &cfg, "worker"]));
    assert_eq!(
        line,
        "error: config key webhook[0].secret_env (webhook type \"wh.a\"): variable \
         WARREN_E2E_UNSET_SECRET_9C2 is not set in the worker's environment (or not UTF-8): \
         set it, or use secret_file"
    );
    // The metadata address as the endpoint: refused without a request.
    let cfg = env.config_file(&hook(
        "wh.a",
        "http://169.254.169.254/latest/meta-data/",
        "S",
        "",
    ));
    let stderr = env
        .warren(&["--config", &cfg, "worker"])
        .env("S", "x")
        .output()
        .unwrap();
    assert!(!stderr.status.success());
    let line = error_line(&String::from_utf8_lossy(&stderr.stderr));
    assert_eq!(
        line,
        "error: config key webhook[0].url (webhook type \"wh.a\"): \
         http://169.254.169.254/latest/meta-data/ is refused: address 169.254.169.254 is \
         link-local (cloud metadata): such addresses are always refused"
    );
}
