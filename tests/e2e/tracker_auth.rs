//! The tracker's authentication over HTTP: bearer tokens and their roles,
//! dashboard sessions with CSRF tokens, the limit on failed logins (and
//! what is logged of them), open mode, refusing to start without
//! credentials, and schemathesis run against docs/openapi.yaml.

#[path = "tracker_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use reqwest::header::{HeaderMap, COOKIE, LOCATION, RETRY_AFTER, SET_COOKIE, WWW_AUTHENTICATE};
use reqwest::Method;
use serde_json::{json, Value};
use support::{tracker_env, Api, TestDb};
use warren_client::TaskRequest;
use warren_e2e::{until_final, CommandExt, T, TRACKER_ADMIN_TOKEN, TRACKER_READ_TOKEN};

const ALICE_PW: &str = "alice-pw-0e7d51b2";

/// `tracker.users` with alice (admin), and her password's variable.
const USERS: &[(&str, &str)] = &[
    (
        "WARREN__TRACKER__USERS",
        "alice:admin:env:WARREN_E2E_ALICE_PW",
    ),
    ("WARREN_E2E_ALICE_PW", ALICE_PW),
];

/// The `name=value` pairs of a response's `Set-Cookie` headers, with
/// their attributes.
fn set_cookies(headers: &HeaderMap) -> BTreeMap<String, (String, String)> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=')?;
            Some((name.to_owned(), (value.to_owned(), attrs.trim().to_owned())))
        })
        .collect()
}

/// A login form: its CSRF cookie and the same token from the page.
async fn login_form(api: &Api) -> (String, String) {
    let r = api
        .with_token(None)
        .request(Method::GET, "/login")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookies = set_cookies(r.headers());
    let (cookie, attrs) = cookies.get("warren_login_csrf").expect("login CSRF cookie");
    assert!(
        attrs.contains("HttpOnly") && attrs.contains("SameSite=Strict"),
        "{attrs}"
    );
    let page = r.text().await.unwrap();
    let field = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("CSRF field in the login form")
        .to_owned();
    (cookie.clone(), field)
}

/// Posts the login form: status, headers, body.
async fn post_login(
    api: &Api,
    csrf: &(String, String),
    user: &str,
    pw: &str,
) -> (u16, HeaderMap, String) {
    let r = api
        .with_token(None)
        .request(Method::POST, "/login")
        .header(COOKIE, format!("warren_login_csrf={}", csrf.0))
        .form(&[("user", user), ("password", pw), ("csrf", csrf.1.as_str())])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap_or_default())
}

/// Tokens: none or an unknown one is 401 with a challenge; a read token
/// reads and is refused (403) what changes something; an admin token acts.
/// Health, metrics and the static files need no credential.
#[tokio::test]
async fn tokens_authenticate_and_roles_authorise() {
    let db = TestDb::sqlite("auth-tokens");
    let (mut env, api) = tracker_env("auth-tok", &db, &[]).await;
    env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let anonymous = api.with_token(None);
    let reader = api.with_token(Some(TRACKER_READ_TOKEN));

    for path in ["/api/stats", "/api/tasks", "/api/dead", "/api/session"] {
        let r = anonymous.request(Method::GET, path).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let challenge = r.headers()[WWW_AUTHENTICATE].to_str().unwrap().to_owned();
        assert_eq!(challenge, "Bearer realm=\"warren-tracker\"", "{path}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    }
    let r = api
        .with_token(Some("not-a-token-of-this-tracker"))
        .request(Method::GET, "/api/stats")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()[WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .contains("error=\"invalid_token\""));
    let (status, _) = anonymous
        .post("/api/dead/replay", &json!({"ids": ["ghost"]}))
        .await;
    assert_eq!(status, 401);
    // The dashboard sends a browser without a session to the login page.
    let r = anonymous.request(Method::GET, "/").send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[LOCATION], "/login");

    // Read: every GET; 403 for replaying.
    assert_eq!(reader.ok("/api/stats").await["tasks"], 0);
    let me = reader.ok("/api/session").await;
    assert_eq!(
        me,
        json!({"user": "e2e-read", "role": "read", "auth": "token", "csrf": null})
    );
    let (status, page) = reader.get_text("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<script src=\"app.js\">"));
    let (status, body) = reader
        .post("/api/dead/replay", &json!({"ids": ["ghost"]}))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("admin"), "{body}");

    // Admin: acts.
    let (status, body) = api
        .post("/api/dead/replay", &json!({"ids": ["ghost"]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["not_found"], json!(["ghost"]));
    assert_eq!(api.ok("/api/session").await["role"], "admin");

    // Open to all: health, metrics, static files, the login page.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/style.css",
        "/app.js",
        "/login",
    ] {
        let (status, _) = anonymous.get_text(path).await;
        assert_eq!(status, 200, "{path}");
    }
}

/// A dashboard session: the cookie's attributes, the CSRF token a
/// state-changing request must carry, the login form's own CSRF token, and
/// logout.
#[tokio::test]
async fn sessions_need_their_csrf_token_to_act() {
    let db = TestDb::sqlite("auth-csrf");
    let (mut env, api) = tracker_env("auth-csrf", &db, USERS).await;
    env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let browser = api.with_token(None);

    // A login form posted without its cookie (as from another site) is refused.
    let (_, field) = login_form(&api).await;
    let r = browser
        .request(Method::POST, "/login")
        .form(&[
            ("user", "alice"),
            ("password", ALICE_PW),
            ("csrf", field.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(!set_cookies(r.headers()).contains_key("warren_session"));

    let form = login_form(&api).await;
    let (status, headers, _) = post_login(&api, &form, "alice", ALICE_PW).await;
    assert_eq!(status, 303);
    assert_eq!(headers[LOCATION], "/");
    let cookies = set_cookies(&headers);
    let (session, attrs) = cookies.get("warren_session").expect("session cookie");
    assert_eq!(session.len(), 64, "256 random bits in hex");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(attrs.contains(attr), "{attr} in {attrs}");
    }
    let cookie = format!("warren_session={session}");

    let r = browser
        .request(Method::GET, "/api/session")
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let me: Value = r.json().await.unwrap();
    assert_eq!(me["user"], "alice");
    assert_eq!(me["auth"], "session");
    let csrf = me["csrf"].as_str().unwrap().to_owned();
    assert_eq!(csrf.len(), 64);

    // Without the CSRF token, or with another, the session may not act.
    for header in [None, Some("0".repeat(64))] {
        let mut req = browser
            .request(Method::POST, "/api/dead/replay")
            .header(COOKIE, &cookie)
            .json(&json!({"ids": ["ghost"]}));
        if let Some(h) = &header {
            req = req.header("x-csrf-token", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403, "CSRF header {header:?}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("CSRF"), "{body}");
    }
    let r = browser
        .request(Method::POST, "/api/dead/replay")
        .header(COOKIE, &cookie)
        .header("x-csrf-token", &csrf)
        .json(&json!({"ids": ["ghost"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Logout needs the token too; then the session is gone.
    let r = browser
        .request(Method::POST, "/logout")
        .header(COOKIE, &cookie)
        .form(&[("csrf", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = browser
        .request(Method::POST, "/logout")
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[LOCATION], "/login");
    assert!(set_cookies(r.headers())["warren_session"]
        .1
        .contains("Max-Age=0"));
    let r = browser
        .request(Method::GET, "/api/stats")
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Six bad logins from one address: five are 401, the sixth 429 with
/// Retry-After, and so is a bad token after them; the log names the user
/// and the address, never the password.
#[tokio::test]
async fn failed_logins_are_limited_and_logged_without_the_secret() {
    const GUESS: &str = "guessed-Pa55word-xyz";
    let db = TestDb::sqlite("auth-limit");
    let (mut env, api) = tracker_env("auth-limit", &db, USERS).await;
    let tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;

    let form = login_form(&api).await;
    for attempt in 1..=5 {
        let (status, _, page) = post_login(&api, &form, "alice", GUESS).await;
        assert_eq!(status, 401, "attempt {attempt}");
        assert!(page.contains("Wrong user name or password"), "{page}");
    }
    let (status, headers, page) = post_login(&api, &form, "alice", ALICE_PW).await;
    assert_eq!(
        status, 429,
        "the sixth attempt, even with the right password"
    );
    let wait: u64 = headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(page.contains("Too many failed logins"), "{page}");
    let r = api
        .with_token(Some("yet-another-guessed-token"))
        .request(Method::GET, "/api/stats")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key(RETRY_AFTER));

    env.wait_log(&tracker, "tracker login failed", T).await;
    let log = env.log_of(&tracker);
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tracker login failed"))
        .collect();
    assert_eq!(failed.len(), 5, "{log}");
    assert!(
        failed
            .iter()
            .all(|l| l.contains("alice") && l.contains("127.0.0.1")),
        "{log}"
    );
    assert!(log.contains("too many failed tracker logins"), "{log}");
    for secret in [GUESS, ALICE_PW] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// `tracker.open = true`: no credential asked, a warning at start.
/// Neither credentials nor open: `warren tracker` refuses to start in one
/// line naming the keys; `warren up` tracks without serving HTTP.
#[tokio::test]
async fn open_mode_and_no_credentials() {
    let db = TestDb::sqlite("auth-open");
    let (mut env, api) = tracker_env(
        "auth-open",
        &db,
        &[
            ("WARREN__TRACKER__TOKENS", ""),
            ("WARREN__TRACKER__OPEN", "true"),
        ],
    )
    .await;
    let tracker = env.spawn(&["tracker"], &[]);
    api.wait_ready().await;
    let anonymous = api.with_token(None);
    assert_eq!(anonymous.ok("/api/stats").await["tasks"], 0);
    assert_eq!(anonymous.ok("/api/session").await["auth"], "open");
    let (status, body) = anonymous
        .post("/api/dead/replay", &json!({"ids": ["ghost"]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, page) = anonymous.get_text("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("app.js"));
    env.wait_log(&tracker, "tracker.open = true", T).await;
    assert!(
        env.log_of(&tracker).contains("WARN"),
        "{}",
        env.log_of(&tracker)
    );

    let err = env
        .warren(&["tracker"])
        .env("WARREN__TRACKER__OPEN", "false")
        .fails();
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    for key in ["tracker.tokens", "tracker.users", "tracker.open"] {
        assert!(lines[0].contains(key), "{key}: {err}");
    }
    // Inside `warren up` the tracker keeps tracking, without HTTP, and says why.
    let up = env.up(&[("WARREN__TRACKER__OPEN", "false")]);
    env.wait_log(&up, "tracker runs without its HTTP API and dashboard", T)
        .await;
    assert!(
        env.log_of(&up).contains("tracker.tokens"),
        "{}",
        env.log_of(&up)
    );
    env.wait_log(&up, "tracker database open", T).await;
    env.signal(&up, "TERM");
    assert_eq!(env.wait_exit(&up, T).await, Some(0));
    // A secret that cannot be read names its key, not a value.
    let err = env
        .warren(&["tracker"])
        .env("WARREN__TRACKER__OPEN", "false")
        .env(
            "WARREN__TRACKER__TOKENS",
            "ops:admin:env:WARREN_E2E_NOT_SET",
        )
        .fails();
    assert!(
        err.contains("tracker.tokens[0]") && err.contains("WARREN_E2E_NOT_SET"),
        "{err}"
    );
}

/// schemathesis (tests/interop/requirements.txt) against docs/openapi.yaml
/// with the admin token, over a tracker that has recorded tasks and holds a
/// dead one: no 5xx, and every answer matches the spec (status, content
/// type, schema).
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let st = root.join("tests/interop/.venv/bin/st");
    assert!(
        st.is_file(),
        "{} missing: run scripts/test.sh once (it installs tests/interop/requirements.txt)",
        st.display()
    );
    let db = TestDb::sqlite("auth-st");
    let (mut env, api) = tracker_env("auth-st", &db, USERS).await;
    env.up(&[]);
    api.wait_ready().await;
    let mut watch = env.watch(&["#"]).await;
    let mut reqs: Vec<TaskRequest> = (0..5)
        .map(|i| TaskRequest::new("diag.echo", json!({"n": i})).id(format!("st-ok-{i}")))
        .collect();
    reqs.push(
        TaskRequest::new("diag.fail", json!({"kind": "permanent", "message": "st"})).id("st-bad"),
    );
    let ids = env.client.publish_batch(&reqs, 8, |_| {}).await.unwrap();
    until_final(&mut watch, &ids, T).await;
    api.wait_for("/api/stats", "the batch tracked", |v| v["tasks"] == 6)
        .await;

    // Run from a scratch directory: schemathesis keeps a cache in its
    // working directory (.schemathesis/) and writes its report there.
    let scratch = root.join(format!("target/schemathesis/{}", env.prefix));
    std::fs::create_dir_all(&scratch).unwrap();
    let spec = root.join("docs/openapi.yaml");
    let base = api.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .current_dir(&scratch)
            .arg("run")
            .arg(&spec)
            .args(["--url", &base])
            .args([
                "--header",
                &format!("Authorization: Bearer {TRACKER_ADMIN_TOKEN}"),
            ])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_schema_conformance",
                "--max-examples",
                "25",
                "--seed",
                "17",
                "--max-redirects",
                "0",
                "--request-timeout",
                "10",
                "--workers",
                "1",
                "--report",
                "junit",
            ])
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert!(text.contains("passed"), "{text}");
}
