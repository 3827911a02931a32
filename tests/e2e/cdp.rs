//! Headless Chromium driven over the DevTools protocol: open a page, run
//! script in it, wait for what it shows, take a screenshot. Debian's
//! `chromium` (scripts/test.sh installs it; `WARREN_CHROMIUM` overrides).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use warren_e2e::T;

/// The dashboard users of the dashboard tests, as `tracker.users` and the
/// environment variables their passwords are read from: an admin and a
/// reader.
pub const USERS: &[(&str, &str)] = &[
    (
        "WARREN__TRACKER__USERS",
        "alice:admin:env:WARREN_E2E_ALICE_PW,rita:read:env:WARREN_E2E_RITA_PW",
    ),
    ("WARREN_E2E_ALICE_PW", ALICE_PW),
    ("WARREN_E2E_RITA_PW", RITA_PW),
];
/// `alice`'s password (role admin).
pub const ALICE_PW: &str = "alice-pw-4f2a9c";
/// `rita`'s password (role read).
pub const RITA_PW: &str = "rita-pw-81d3e7";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The Chromium binary: `WARREN_CHROMIUM`, else `chromium` on the PATH.
pub fn chromium() -> PathBuf {
    if let Ok(p) = std::env::var("WARREN_CHROMIUM") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in ["chromium", "chromium-browser"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("chromium not found: install Debian's chromium package (scripts/test.sh does), or set WARREN_CHROMIUM");
}

/// One headless Chromium with one page; killed, its profile removed, on drop.
pub struct Browser {
    child: Child,
    socket: Socket,
    session: String,
    next_id: u64,
    profile: PathBuf,
}

impl Browser {
    /// Starts Chromium with a fresh profile named after `name` and opens a
    /// blank page of `width` x `height`.
    pub async fn launch(name: &str, width: u32, height: u32) -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "warren-chromium-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // Chromium names its DevTools socket on stderr; the rest is drained.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_owned());
                    }
                }
            }
        });
        let url = tokio::time::timeout(T, rx)
            .await
            .expect("chromium printed its DevTools address in time")
            .expect("chromium's DevTools address");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to chromium's DevTools socket");
        let mut b = Browser {
            child,
            socket,
            session: String::new(),
            next_id: 0,
            profile,
        };
        let target = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target_id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        b.page("Page.enable", json!({})).await;
        b
    }

    async fn send(&mut self, method: &str, params: Value, session: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if session {
            msg["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(msg.to_string()))
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer from chromium within {T:?}"));
            let Some(Ok(Message::Text(text))) = next else {
                match next {
                    Some(Ok(_)) => continue,
                    other => panic!("{method}: chromium's socket ended: {other:?}"),
                }
            };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// A browser-level command.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, false).await
    }

    /// A command to the page.
    pub async fn page(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, true).await
    }

    /// Starts loading `url` in the page.
    pub async fn goto(&mut self, url: &str) {
        self.page("Page.navigate", json!({"url": url})).await;
    }

    /// Runs `expression` in the page (awaiting a promise); its JSON value,
    /// or null while the page is between documents.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .page(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if r.get("exceptionDetails").is_some() {
            return Value::Null;
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy in the page; returns its value.
    pub async fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let v = self
                .eval(&format!(
                    "(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
                ))
                .await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                let url = self.eval("location.href").await;
                let body = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!("{what}: not seen within {T:?} at {url}; the page says:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens the dashboard at `base`, which sends a browser without a
    /// session to the login page, and logs in there as `user`.
    pub async fn log_in(&mut self, base: &str, user: &str, password: &str) {
        self.goto(&format!("{base}/")).await;
        self.wait_for(
            "the login page",
            "location.pathname === '/login' && document.getElementById('login-submit')",
        )
        .await;
        self.eval(&format!(
            "document.getElementById('login-user').value = {user:?}; \
             document.getElementById('login-password').value = {password:?}; \
             document.getElementById('login-submit').click(); true"
        ))
        .await;
        self.wait_for(
            "the dashboard after logging in",
            &format!(
                "location.pathname === '/' && document.getElementById('user').textContent.startsWith({user:?})"
            ),
        )
        .await;
    }

    /// Clicks the first element `selector` matches, then the page's
    /// confirmation dialog's Confirm button once the dialog is open.
    pub async fn click_and_confirm(&mut self, selector: &str) {
        self.wait_for(selector, &format!("document.querySelector({selector:?})"))
            .await;
        self.eval(&format!(
            "document.querySelector({selector:?}).click(); true"
        ))
        .await;
        self.wait_for(
            "the confirmation dialog",
            "document.getElementById('confirm-dialog').open",
        )
        .await;
        self.eval("document.getElementById('confirm-ok').click(); true")
            .await;
        self.wait_for(
            "the confirmation dialog closed",
            "!document.getElementById('confirm-dialog').open",
        )
        .await;
    }

    /// The page's current HTML.
    pub async fn html(&mut self) -> String {
        self.eval("document.documentElement.outerHTML")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        let r = self
            .page(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
