//! The built-in task types http.request, file.download and file.upload
//! (contract section 6) against a real HTTP server on 127.0.0.1 started by
//! each test (e2e/builtin_server.rs), through a real `warren up`.

#[path = "builtin_server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use warren_client::TaskRequest;
use warren_core::event::ErrorKind;
use warren_core::{Event, TaskState};
use warren_e2e::{
    failure_of, final_event, free_port, result_of, unix_ms, until_final, Env, T_LONG,
};

use server::{content, content_sha256, TestServer};
const MB: u64 = 1024 * 1024;

/// A fresh data directory for one test's worker.
fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "warren-builtin-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An env whose worker keeps files in `data` and may reach loopback (the
/// test server) when `loopback` is true.
async fn env(name: &str, data: &Path, loopback: bool, extra: &[(&str, &str)]) -> Env {
    let data = data.to_str().unwrap().to_owned();
    let mut vars = vec![
        ("WARREN__WORKER__DATA_DIR", data.as_str()),
        (
            "WARREN__HTTP__ALLOW_LOOPBACK",
            if loopback { "true" } else { "false" },
        ),
    ];
    vars.extend_from_slice(extra);
    Env::new(name, &vars).await
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc status");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Files in `dir` (recursively), as paths relative to it.
fn files_in(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn write_generated(path: &Path, len: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    for c in content(0, len) {
        f.write_all(&c).unwrap();
    }
}

#[tokio::test]
async fn http_request_returns_status_headers_and_body_as_json_text_or_base64() {
    let srv = TestServer::start().await;
    let data = data_dir("http-ok");
    let mut env = env("http-ok", &data, true, &[]).await;
    env.up(&[]);
    let got = env.run_named(
         0,
        vec![
            ("json", "http.request", json!({"method": "GET", "url": srv.url("/json")})),
            ("text", "http.request", json!({"method": "get", "url": srv.url("/text")})),
            ("binary", "http.request", json!({"method": "GET", "url": srv.url("/binary")})),
            ("large", "http.request", json!({"method": "GET", "url": srv.url("/large")})),
            (
                "headers",
                "http.request",
                json!({"method": "POST", "url": srv.url("/headers"),
                       "headers": {"Authorization": "Bearer s3cret-token", "X-Trace": "t1"},
                       "body": {"k": "v"}}),
            ),
            (
                "expected-404",
                "http.request",
                json!({"method": "GET", "url": srv.url("/status/404"), "expect_status": [404, 410]}),
            ),
        ],
    )
    .await;

    let r = result_of(&got["json"]);
    assert_eq!(r["status"], 200);
    assert_eq!(r["body"], json!({"hello": "world", "n": [1, 2]}));
    assert_eq!(r["body_encoding"], "json");
    assert_eq!(r["truncated"], false);
    assert_eq!(r["headers"]["content-type"], "application/json");
    assert!(r["elapsed_ms"].as_u64().is_some());

    let r = result_of(&got["text"]);
    assert_eq!(
        (&r["body"], &r["body_encoding"]),
        (&json!("héllo wörld"), &json!("text"))
    );

    let r = result_of(&got["binary"]);
    assert_eq!(
        (&r["body"], &r["body_encoding"]),
        (&json!("AJ+Slv8="), &json!("base64"))
    );

    let r = result_of(&got["large"]);
    assert_eq!(r["truncated"], true);
    assert_eq!(r["bytes"], 32768, "cut at http.max_response_bytes");
    assert_eq!(r["body"].as_str().unwrap().len(), 32768);

    let r = result_of(&got["headers"]);
    assert_eq!(r["body"]["authorization"], "Bearer s3cret-token");
    assert_eq!(r["body"]["x-trace"], "t1");
    assert_eq!(r["body"]["content-type"], "application/json");

    assert_eq!(result_of(&got["expected-404"])["status"], 404);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn http_request_failure_classes() {
    let srv = TestServer::start().await;
    // A port nothing listens on.
    let closed = free_port();
    let data = data_dir("http-fail");
    let mut env = env("http-fail", &data, true, &[]).await;
    env.up(&[]);
    let get = |path: &str| json!({"method": "GET", "url": srv.url(path)});
    let got = env
        .run_named(
            0,
            vec![
                ("404", "http.request", get("/status/404")),
                ("503", "http.request", get("/status/503")),
                ("429", "http.request", get("/status/429")),
                (
                    "refused",
                    "http.request",
                    json!({"method": "GET", "url": format!("http://127.0.0.1:{closed}/")}),
                ),
                (
                    "timeout",
                    "http.request",
                    json!({"method": "GET", "url": srv.url("/slow"), "timeout_ms": 300}),
                ),
                (
                    "unexpected",
                    "http.request",
                    json!({"method": "GET", "url": srv.url("/json"), "expect_status": 201}),
                ),
                ("loop", "http.request", get("/loop")),
                (
                    "bad-method",
                    "http.request",
                    json!({"method": "GE T", "url": srv.url("/json")}),
                ),
                ("no-url", "http.request", json!({"method": "GET"})),
                ("not-object", "http.request", json!(["GET"])),
                (
                    "bad-url",
                    "http.request",
                    json!({"method": "GET", "url": "not a url"}),
                ),
                (
                    "ftp",
                    "http.request",
                    json!({"method": "GET", "url": "ftp://127.0.0.1/x"}),
                ),
            ],
        )
        .await;
    let expect = [
        ("404", ErrorKind::Permanent, "http_404", "permanent_failure"),
        ("503", ErrorKind::Retryable, "http_503", "retries_exhausted"),
        ("429", ErrorKind::Retryable, "http_429", "retries_exhausted"),
        (
            "refused",
            ErrorKind::Retryable,
            "connect",
            "retries_exhausted",
        ),
        (
            "timeout",
            ErrorKind::Retryable,
            "timeout",
            "retries_exhausted",
        ),
        (
            "unexpected",
            ErrorKind::Permanent,
            "http_200",
            "permanent_failure",
        ),
        (
            "loop",
            ErrorKind::Permanent,
            "too_many_redirects",
            "permanent_failure",
        ),
        (
            "bad-method",
            ErrorKind::Permanent,
            "invalid_args",
            "permanent_failure",
        ),
        (
            "no-url",
            ErrorKind::Permanent,
            "invalid_args",
            "permanent_failure",
        ),
        (
            "not-object",
            ErrorKind::Permanent,
            "invalid_args",
            "permanent_failure",
        ),
        (
            "bad-url",
            ErrorKind::Permanent,
            "invalid_args",
            "permanent_failure",
        ),
        (
            "ftp",
            ErrorKind::Permanent,
            "invalid_args",
            "permanent_failure",
        ),
    ];
    for (name, kind, code, reason) in expect {
        let (k, c, m) = failure_of(&got[name]);
        assert_eq!((k, c.as_str()), (kind, code), "{name}: {m}");
        assert_eq!(
            final_event(&got[name]).reason.as_deref(),
            Some(reason),
            "{name}"
        );
        println!("{name}: {code}: {m}");
    }
    assert!(failure_of(&got["404"]).2.contains("status 404 body"));
    // 5 redirects followed (http.max_redirects), then refused: 6 requests.
    assert_eq!(srv.seen("/loop").len(), 6);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn retry_after_sets_the_earliest_retry() {
    let srv = TestServer::start().await;
    let data = data_dir("retry-after");
    // Backoff alone would retry within 20 ms; Retry-After: 1 asks for 1 s.
    let mut env = env(
        "retry-after",
        &data,
        true,
        &[
            ("WARREN__RETRY__DEFAULT__BASE_MS", "20"),
            ("WARREN__RETRY__DEFAULT__CAP_MS", "20"),
        ],
    )
    .await;
    env.up(&[]);
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(
            &TaskRequest::new(
                "http.request",
                json!({"method": "GET", "url": srv.url("/status/503")}),
            )
            .header_int("x-warren-max-retries", 1),
        )
        .await;
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    let evs: Vec<&Event> = got[&id].iter().map(|e| &e.event).collect();
    let failed = evs.iter().find(|e| e.state == TaskState::Failed).unwrap();
    assert_eq!(failed.retry, Some(true));
    let started: Vec<&&Event> = evs
        .iter()
        .filter(|e| e.state == TaskState::Started)
        .collect();
    assert_eq!(started.len(), 2, "{evs:?}");
    let gap = unix_ms(&started[1].at) - unix_ms(&failed.at);
    assert!(
        gap >= 950,
        "retried {gap} ms after the 503, Retry-After said 1 s"
    );
    assert_eq!(
        final_event(&got[&id]).reason.as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(srv.seen("/status/503").len(), 2);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn loopback_is_denied_unless_configured_and_credentials_stay_out_of_events_and_logs() {
    let srv = TestServer::start().await;
    let data = data_dir("loopback");
    let mut env = env("loopback", &data, false, &[]).await;
    let up = env.up(&[]);
    let port = srv.addr.port();
    let got = env
        .run_named(
            0,
            vec![
                (
                    "ip",
                    "http.request",
                    json!({"method": "GET", "url": srv.url("/json")}),
                ),
                (
                    "name",
                    "http.request",
                    json!({"method": "GET", "url": format!("http://localhost:{port}/json")}),
                ),
                (
                    "zero",
                    "http.request",
                    json!({"method": "GET", "url": format!("http://0.0.0.0:{port}/json")}),
                ),
                (
                    "creds",
                    "http.request",
                    json!({"method": "GET",
                       "url": format!("http://alice:pa55word@localhost:{port}/json?api_key=k3y"),
                       "headers": {"Authorization": "Bearer s3cret-token"}}),
                ),
                (
                    "download",
                    "file.download",
                    json!({"url": srv.url("/gen/100"), "path": "x.bin"}),
                ),
            ],
        )
        .await;
    for name in ["ip", "name", "zero", "creds", "download"] {
        let (kind, code, message) = failure_of(&got[name]);
        assert_eq!(
            (kind, code.as_str()),
            (ErrorKind::Permanent, "denied"),
            "{name}: {message}"
        );
        assert!(message.contains("http.allow_loopback"), "{name}: {message}");
    }
    assert!(srv.seen("/").is_empty(), "no request reached the server");
    assert!(files_in(&data).is_empty(), "{:?}", files_in(&data));
    for events in got.values() {
        for e in events {
            let body = String::from_utf8(e.event.to_json()).unwrap();
            for secret in ["pa55word", "k3y", "s3cret-token"] {
                assert!(!body.contains(secret), "{secret} in event {body}");
            }
        }
    }
    let log = env.log_of(&up);
    for secret in ["pa55word", "k3y", "s3cret-token"] {
        assert!(!log.contains(secret), "{secret} in the worker log");
    }
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn metadata_addresses_are_denied_directly_and_after_a_redirect() {
    let srv = TestServer::start().await;
    let data = data_dir("metadata");
    // Loopback allowed and everything in allow: metadata is refused anyway.
    let mut env = env(
        "metadata",
        &data,
        true,
        &[("WARREN__HTTP__ALLOW", "0.0.0.0/0,::/0")],
    )
    .await;
    env.up(&[]);
    let redirect =
        |to: &str| json!({"method": "GET", "url": format!("{}?to={to}", srv.url("/redirect"))});
    let got = env.run_named(
         0,
        vec![
            (
                "direct",
                "http.request",
                json!({"method": "GET", "url": "http://169.254.169.254/latest/meta-data/"}),
            ),
            ("v6", "http.request", json!({"method": "GET", "url": "http://[fd00:ec2::254]/"})),
            (
                "mapped",
                "http.request",
                json!({"method": "GET", "url": "http://[::ffff:169.254.169.254]/"}),
            ),
            (
                "redirect",
                "http.request",
                redirect("http%3A%2F%2F169.254.169.254%2Flatest%2Fmeta-data%2F"),
            ),
            ("redirect-v6", "http.request", redirect("http%3A%2F%2F%5Bfd00%3Aec2%3A%3A254%5D%2F")),
            (
                "download-redirect",
                "file.download",
                json!({"url": format!("{}?to=http%3A%2F%2F169.254.169.254%2F", srv.url("/redirect")),
                       "path": "meta.txt"}),
            ),
            ("ok", "http.request", json!({"method": "GET", "url": srv.url("/json")})),
        ],
    )
    .await;
    for name in [
        "direct",
        "v6",
        "mapped",
        "redirect",
        "redirect-v6",
        "download-redirect",
    ] {
        let (kind, code, message) = failure_of(&got[name]);
        assert_eq!(
            (kind, code.as_str()),
            (ErrorKind::Permanent, "denied"),
            "{name}: {message}"
        );
        assert!(message.contains("always refused"), "{name}: {message}");
    }
    assert_eq!(
        srv.seen("/redirect").len(),
        3,
        "each redirect was asked once"
    );
    assert_eq!(result_of(&got["ok"])["status"], 200);
    assert!(files_in(&data).is_empty(), "{:?}", files_in(&data));
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_300_mb_download_streams_with_bounded_memory_and_a_verified_sha256() {
    const LEN: u64 = 300 * MB;
    let srv = TestServer::start().await;
    let data = data_dir("big");
    let mut env = env("big", &data, true, &[]).await;
    let up = env.up(&[]);
    let expected = tokio::task::spawn_blocking(|| content_sha256(LEN));

    // A small download with the sha256 given is verified; a wrong one
    // leaves no file. These also bring the worker to its working size.
    let small = 3 * MB + 17;
    let got = env
        .run_named(
            0,
            vec![
                (
                    "verified",
                    "file.download",
                    json!({"url": srv.url(&format!("/gen/{small}")), "path": "ok.bin",
                       "sha256": content_sha256(small).to_uppercase()}),
                ),
                (
                    "mismatch",
                    "file.download",
                    json!({"url": srv.url(&format!("/gen/{small}")), "path": "bad.bin",
                       "sha256": content_sha256(small - 1)}),
                ),
            ],
        )
        .await;
    assert_eq!(result_of(&got["verified"])["sha256"], content_sha256(small));
    let (kind, code, message) = failure_of(&got["mismatch"]);
    assert_eq!(
        (kind, code.as_str()),
        (ErrorKind::Permanent, "sha256_mismatch"),
        "{message}"
    );
    assert_eq!(
        files_in(&data),
        ["ok.bin"],
        "no file, no partial file after a mismatch"
    );
    std::fs::remove_file(data.join("ok.bin")).unwrap();
    let before = peak_rss(up.pid);

    let started = std::time::Instant::now();
    let ev = env
        .call(
            &TaskRequest::new(
                "file.download",
                json!({"url": srv.url(&format!("/gen/{LEN}")), "path": "big/file.bin"}),
            ),
            Duration::from_secs(240),
        )
        .await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(ev.state, TaskState::Succeeded, "{ev:?}");
    let rss = peak_rss(up.pid);
    println!(
        "300 MB download in {secs:.1} s; worker peak RSS (VmHWM) {:.1} MB after, {:.1} MB before",
        rss as f64 / MB as f64,
        before as f64 / MB as f64
    );
    let r = ev.result.unwrap();
    let expected = expected.await.unwrap();
    assert_eq!(r["bytes"], LEN);
    assert_eq!(r["sha256"], expected);
    assert_eq!(r["path"], "big/file.bin");
    assert_eq!(
        std::fs::metadata(data.join("big/file.bin")).unwrap().len(),
        LEN
    );
    assert_eq!(files_in(&data), ["big/file.bin"], "no partial file left");
    assert!(rss < 150 * MB, "worker peak RSS {rss} bytes");
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_download_killed_mid_transfer_leaves_no_file_and_resumes_with_range() {
    const LEN: u64 = 16 * MB;
    let srv = TestServer::start().await;
    let data = data_dir("resume");
    let mut env = env("resume", &data, true, &[]).await;
    let first = env.up(&[]);
    let mut watch = env.watch(&["#"]).await;
    let id = env
        .publish(&TaskRequest::new(
            "file.download",
            // 2 MB/s for a full response: about 8 s, so the kill lands mid-way.
            json!({"url": srv.url(&format!("/gen/{LEN}?rate=2000000")), "path": "dl/file.bin",
                   "sha256": content_sha256(LEN)}),
        ))
        .await;
    // Progress events: at most one a second, growing, with the total.
    let mut progress: Vec<Event> = Vec::new();
    while progress.len() < 3 {
        let e = watch.next(T_LONG).await.unwrap().expect("an event");
        assert!(!e.event.state.is_final(), "{:?}", e.event);
        if e.event.state == TaskState::Progress {
            assert_eq!(e.routing_key, "progress.file.download");
            progress.push(e.event);
        }
    }
    for pair in progress.windows(2) {
        let (a, b) = (pair[0].progress.unwrap(), pair[1].progress.unwrap());
        assert!(b.bytes > a.bytes, "{a:?} then {b:?}");
        assert_eq!(b.total, Some(LEN));
        let gap = unix_ms(&pair[1].at) - unix_ms(&pair[0].at);
        assert!(gap >= 900, "progress events {gap} ms apart");
    }
    env.kill(&first, T_LONG).await;
    let sent_before = srv.sent();
    assert!(sent_before < LEN, "killed mid-transfer");
    assert!(
        !data.join("dl/file.bin").exists(),
        "no partial file at the target path"
    );
    let partial = files_in(&data);
    assert!(
        partial
            .iter()
            .any(|f| f.starts_with("dl/.file.bin.warren-") && f.ends_with(".part")),
        "{partial:?}"
    );

    env.up(&[]);
    let got = until_final(&mut watch, &[&id], T_LONG).await;
    let ev = final_event(&got[&id]);
    assert_eq!(ev.state, TaskState::Succeeded, "{ev:?}");
    let r = ev.result.as_ref().unwrap();
    let resumed_from = r["resumed_from"].as_u64().unwrap();
    println!("killed after {sent_before} bytes sent; resumed from {resumed_from}");
    assert!(resumed_from > 0 && resumed_from <= sent_before, "{r}");
    assert_eq!(r["sha256"], content_sha256(LEN));
    assert_eq!(r["status"], 206);
    let ranged: Vec<_> = srv
        .seen("/gen/")
        .into_iter()
        .filter(|s| s.headers.contains_key("range"))
        .collect();
    assert_eq!(ranged.len(), 1, "{ranged:?}");
    assert_eq!(ranged[0].headers["range"], format!("bytes={resumed_from}-"));
    assert_eq!(ranged[0].headers["if-range"], format!("\"gen-{LEN}\""));
    assert_eq!(files_in(&data), ["dl/file.bin"]);
    assert_eq!(
        std::fs::metadata(data.join("dl/file.bin")).unwrap().len(),
        LEN
    );
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn download_limits_and_paths_that_leave_the_data_directory_are_refused() {
    let srv = TestServer::start().await;
    let base = data_dir("paths");
    let data = base.join("data");
    let outside = base.join("outside");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, data.join("escape")).unwrap();
    std::fs::write(outside.join("secret.txt"), b"secret").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), data.join("secret-link")).unwrap();
    let mut env = env("paths", &data, true, &[]).await;
    env.up(&[]);
    let dl = |path: &str| json!({"url": srv.url("/gen/1000"), "path": path});
    let up = |path: &str| json!({"path": path, "url": srv.url("/upload")});
    let got = env
        .run_named(
            0,
            vec![
                ("dotdot", "file.download", dl("../x.bin")),
                ("nested-dotdot", "file.download", dl("a/../../x.bin")),
                (
                    "absolute",
                    "file.download",
                    dl(outside.join("abs.bin").to_str().unwrap()),
                ),
                ("symlink-dir", "file.download", dl("escape/x.bin")),
                ("symlink-new-dir", "file.download", dl("escape/new/x.bin")),
                ("symlink-file", "file.download", dl("secret-link")),
                ("upload-dotdot", "file.upload", up("../outside/secret.txt")),
                (
                    "upload-absolute",
                    "file.upload",
                    up(outside.join("secret.txt").to_str().unwrap()),
                ),
                ("upload-symlink", "file.upload", up("secret-link")),
                ("upload-symlink-dir", "file.upload", up("escape/secret.txt")),
                (
                    "too-large",
                    "file.download",
                    json!({"url": srv.url("/gen/5000"), "path": "big.bin", "max_bytes": 4999}),
                ),
                ("missing", "file.upload", up("nothing-here.bin")),
                (
                    "http-404",
                    "file.download",
                    json!({"url": srv.url("/status/404"), "path": "n.bin"}),
                ),
            ],
        )
        .await;
    for name in [
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink-dir",
        "symlink-new-dir",
        "symlink-file",
        "upload-dotdot",
        "upload-absolute",
        "upload-symlink",
        "upload-symlink-dir",
    ] {
        let (kind, code, message) = failure_of(&got[name]);
        assert_eq!(
            (kind, code.as_str()),
            (ErrorKind::Permanent, "invalid_args"),
            "{name}: {message}"
        );
    }
    let (_, code, message) = failure_of(&got["too-large"]);
    assert_eq!(code, "too_large", "{message}");
    assert_eq!(failure_of(&got["missing"]).1, "not_found");
    assert_eq!(failure_of(&got["http-404"]).1, "http_404");
    assert!(srv.seen("/upload").is_empty(), "no upload was sent");
    assert_eq!(
        files_in(&outside),
        ["secret.txt"],
        "nothing written outside"
    );
    assert_eq!(
        files_in(&data),
        ["escape", "secret-link"],
        "no file or partial file left"
    );
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn uploads_put_raw_and_post_multipart_with_matching_checksums() {
    const LEN: u64 = 5 * MB + 3;
    let srv = TestServer::start().await;
    let data = data_dir("upload");
    std::fs::create_dir_all(data.join("out")).unwrap();
    write_generated(&data.join("out/report.bin"), LEN);
    let expected = content_sha256(LEN);
    let mut env = env("upload", &data, true, &[]).await;
    env.up(&[]);
    let got = env
        .run_named(
            0,
            vec![
                (
                    "put",
                    "file.upload",
                    json!({"path": "out/report.bin", "url": srv.url("/upload")}),
                ),
                (
                    "multipart",
                    "file.upload",
                    json!({"path": "out/report.bin", "url": srv.url("/upload"), "method": "POST",
                       "field": "file"}),
                ),
                (
                    "unhashed",
                    "file.upload",
                    json!({"path": "out/report.bin", "url": srv.url("/upload"), "checksum": false}),
                ),
                (
                    "bad-method",
                    "file.upload",
                    json!({"path": "out/report.bin", "url": srv.url("/upload"), "method": "PATCH"}),
                ),
                (
                    "rejected",
                    "file.upload",
                    json!({"path": "out/report.bin", "url": srv.url("/status/403")}),
                ),
            ],
        )
        .await;
    let put = result_of(&got["put"]);
    assert_eq!(put["status"], 201);
    assert_eq!(put["bytes"], LEN);
    assert_eq!(put["sha256"], expected);
    let mp = result_of(&got["multipart"]);
    assert_eq!(mp["sha256"], expected);
    assert_eq!(mp["bytes"], LEN);
    let unhashed = result_of(&got["unhashed"]);
    assert_eq!(unhashed["bytes"], LEN);
    assert_eq!(unhashed["sha256"], Value::Null);
    assert_eq!(failure_of(&got["bad-method"]).1, "invalid_args");
    let (_, code, message) = failure_of(&got["rejected"]);
    assert_eq!(code, "http_403", "{message}");

    // What the server received, and the checksum it computed.
    let seen = srv.seen("/upload");
    let put_seen = seen.iter().find(|s| s.method == "PUT").unwrap();
    assert_eq!(seen.iter().filter(|s| s.method == "PUT").count(), 2);
    assert_eq!(put_seen.headers["content-length"], LEN.to_string());
    assert!(!put_seen.headers.contains_key("transfer-encoding"));
    let post_seen = seen.iter().find(|s| s.method == "POST").unwrap();
    assert!(post_seen.headers["content-type"].starts_with("multipart/form-data; boundary="));
    let uploads = srv.uploads();
    assert_eq!(uploads.len(), 3, "{uploads:?}");
    for raw in uploads.iter().filter(|u| u["multipart"] == false) {
        assert_eq!(
            (&raw["sha256"], &raw["bytes"]),
            (&json!(expected), &json!(LEN))
        );
        assert_eq!(raw["chunked"], false);
    }
    let form = uploads.iter().find(|u| u["multipart"] == true).unwrap();
    assert_eq!(
        (&form["sha256"], &form["bytes"]),
        (&json!(expected), &json!(LEN))
    );
    assert_eq!(
        (&form["field"], &form["filename"]),
        (&json!("file"), &json!("report.bin"))
    );
    assert_eq!(
        form["chunked"], false,
        "multipart bodies carry a Content-Length"
    );
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_type_concurrency_cap_holds_back_that_type_only() {
    let srv = TestServer::start().await;
    let data = data_dir("cap");
    let mut env = env("cap", &data, true, &[("WARREN__WORKER__CONCURRENCY", "4")]).await;
    let cfg = env.config_file("[worker.type_concurrency]\n\"file.download\" = 1\n");
    env.spawn(&["--config", &cfg, "up"], &[]);
    let slow = |p: &str| json!({"url": srv.url("/gen/1500000?rate=1500000"), "path": p});
    let got = env
        .run_named(
            0,
            vec![
                ("d1", "file.download", slow("d1.bin")),
                ("d2", "file.download", slow("d2.bin")),
                ("echo", "diag.echo", json!({"hi": 1})),
            ],
        )
        .await;
    let at = |name: &str, state: TaskState| {
        let e = got[name]
            .iter()
            .find(|e| e.event.state == state)
            .unwrap_or_else(|| panic!("{name} has no {state:?} event"));
        unix_ms(&e.event.at)
    };
    let (d1s, d1e) = (at("d1", TaskState::Started), at("d1", TaskState::Succeeded));
    let (d2s, d2e) = (at("d2", TaskState::Started), at("d2", TaskState::Succeeded));
    assert!(
        d2s >= d1e || d1s >= d2e,
        "downloads overlapped: {d1s}-{d1e} and {d2s}-{d2e}"
    );
    let echo_done = at("echo", TaskState::Succeeded);
    assert!(
        echo_done < d1e.max(d2e),
        "the echo waited for the downloads"
    );
    let _ = std::fs::remove_dir_all(&data);
}
