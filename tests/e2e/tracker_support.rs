//! What the tracker and dashboard tests share: a database of their own
//! (a SQLite file under target/, or a PostgreSQL database that is dropped
//! afterwards), a free HTTP port, crafted events, and the tracker's API.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use warren_core::event::{format_time, EventErrorInfo};
use warren_core::{Event, TaskState};
use warren_e2e::{free_port, Env, T, TRACKER_ADMIN_TOKEN};

/// PostgreSQL server URL (a database this role may create databases in).
pub fn postgres_admin_url() -> String {
    std::env::var("WARREN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".to_owned())
}

/// A database of one test: created here, removed on drop.
pub enum TestDb {
    /// A SQLite file under target/e2e-tracker/.
    Sqlite { dir: PathBuf, url: String },
    /// A PostgreSQL database of its own.
    Postgres { name: String, url: String },
}

impl TestDb {
    /// A fresh SQLite file (its directory is created by the tracker).
    pub fn sqlite(name: &str) -> TestDb {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/e2e-tracker")
            .join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
        let url = format!("sqlite://{}/tracker.db", dir.display());
        TestDb::Sqlite { dir, url }
    }

    /// A fresh PostgreSQL database; `password` is put in the URL (trust
    /// auth ignores it) to check it never shows.
    pub async fn postgres(password: Option<&str>) -> TestDb {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let admin = postgres_admin_url();
        let name = format!(
            "wt_tracker_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut conn = sqlx::AnyConnection::connect(&admin)
            .await
            .expect("PostgreSQL answers on 127.0.0.1:5432 (or set WARREN_TEST_POSTGRES)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let base = admin.rsplit_once('/').expect("URL with a database").0;
        let base = match password {
            Some(p) => base.replacen("@", &format!(":{p}@"), 1),
            None => base.to_owned(),
        };
        TestDb::Postgres {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// `tracker.database_url`.
    pub fn url(&self) -> &str {
        match self {
            TestDb::Sqlite { url, .. } | TestDb::Postgres { url, .. } => url,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match self {
            TestDb::Sqlite { dir, .. } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            TestDb::Postgres { name, .. } => {
                let name = name.clone();
                // Its own thread and runtime: drop may run inside the test's runtime.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async {
                        use sqlx::Connection;
                        if let Ok(mut c) = sqlx::AnyConnection::connect(&postgres_admin_url()).await
                        {
                            let _ = sqlx::query(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .execute(&mut c)
                            .await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

/// A new env whose tracker keeps its tasks in `db` and answers on a free
/// port, with `overrides` on top, and a client of that tracker's API.
/// Nothing is started: run `warren up` or `warren tracker`, then
/// [`Api::wait_ready`].
pub async fn tracker_env(name: &str, db: &TestDb, overrides: &[(&str, &str)]) -> (Env, Api) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut vars = vec![
        ("WARREN__TRACKER__DATABASE_URL", db.url()),
        ("WARREN__TRACKER__LISTEN", listen.as_str()),
    ];
    vars.extend_from_slice(overrides);
    (Env::new(name, &vars).await, Api::new(port))
}

/// The tracker's HTTP API.
#[derive(Clone)]
pub struct Api {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The HTTP client (10 s timeout per request, redirects not followed).
    pub http: reqwest::Client,
    /// The bearer token sent with every request, if any.
    pub token: Option<String>,
}

impl Api {
    /// A client of the tracker API on `port` of 127.0.0.1, with the tests'
    /// admin token.
    pub fn new(port: u16) -> Api {
        Api {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("http client"),
            token: Some(TRACKER_ADMIN_TOKEN.to_owned()),
        }
    }

    /// The same tracker with another bearer token, or none.
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// A request to `path` with the bearer token, if any.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// GET a path: status and body text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    }

    /// GET a path as JSON (any status).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.get_text(path).await;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// GET a path that must answer 200, as JSON.
    pub async fn ok(&self, path: &str) -> Value {
        let (status, v) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// POST JSON: status and JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until `/readyz` answers 200 (consuming, database up).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tracker at {} not ready within {T:?}",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `check` holds for the JSON of `path`; returns that JSON.
    pub async fn wait_for(&self, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let (status, v) = self.get(path).await;
            if status == 200 && check(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: GET {path} still answers {status} {v} after {T:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the tracker has stored `n` status events of a task (the
    /// `queued` entries it records from published copies not counted: a
    /// task published through `P.tasks` has one, read at any moment).
    pub async fn wait_events(&self, task_id: &str, n: usize) -> Value {
        self.wait_for(
            &format!("/api/tasks/{task_id}"),
            &format!("{n} events of {task_id}"),
            // The task's row and its events are read one after the other:
            // an ingest between the two reads shows the events ahead of the
            // row, so both must have caught up.
            |v| {
                v["events"]
                    .as_array()
                    .is_some_and(|es| es.iter().filter(|e| e["state"] != "queued").count() == n)
                    && v["task"]["events"].as_u64().is_some_and(|k| k >= n as u64)
            },
        )
        .await
    }
}

/// A crafted event of `task_id`, stamped `at_ms` (Unix ms).
pub fn event(task_id: &str, event_id: &str, state: TaskState, attempt: i64, at_ms: i64) -> Event {
    let mut e = Event::new(task_id, "test.crafted", state, attempt);
    e.event_id = event_id.to_owned();
    e.at = format_time(chrono::DateTime::from_timestamp_millis(at_ms).expect("valid time"));
    e.queue = Some("diag".into());
    e.worker = Some(format!("crafted/{attempt}"));
    match state {
        TaskState::Failed => {
            e.duration_ms = Some(3);
            e.retry = Some(false);
            e.error = Some(EventErrorInfo {
                kind: warren_core::event::ErrorKind::Permanent,
                code: "crafted".into(),
                message: format!("crafted failure of {task_id}"),
            });
        }
        TaskState::Dead => {
            e.reason = Some("permanent_failure".into());
            e.error = Some(EventErrorInfo {
                kind: warren_core::event::ErrorKind::Permanent,
                code: "crafted".into(),
                message: format!("crafted failure of {task_id}"),
            });
        }
        TaskState::Succeeded => {
            e.duration_ms = Some(4);
            e.result = Some(serde_json::json!({"task": task_id}));
        }
        _ => {}
    }
    e
}

/// Publishes an event to `P.events` as a worker would (with confirms).
pub async fn publish_event(env: &Env, e: &Event) {
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(e.event_id.as_str().into())
        .with_correlation_id(e.task_id.as_str().into())
        .with_delivery_mode(2);
    env.publish_raw(&env.names().events(), &e.routing_key(), &e.to_json(), props)
        .await;
}
