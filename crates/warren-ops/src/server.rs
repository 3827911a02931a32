//! The `/metrics`, `/healthz` and `/readyz` endpoint of one process.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

/// What a process reports about itself.
pub trait Probe: Send + Sync + 'static {
    /// Its metrics, in the Prometheus text format.
    fn metrics(&self) -> String;

    /// Its readiness checks by name, each true when passing; the process is
    /// ready when every one passes.
    fn checks(&self) -> Vec<(&'static str, bool)>;
}

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The address is malformed, taken or not ours.
    #[error("cannot listen on {key} = {addr}: {source}: set {key} (or {env}) to a free address, or \"\" to turn it off")]
    Bind {
        /// The configuration key of the address.
        key: String,
        /// Its environment variable.
        env: String,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Serves `probe` on `listen` until `shutdown`: `/metrics` (its text),
/// `/healthz` (always 200 while the process runs) and `/readyz` (200 when
/// every check passes, else 503, with the checks as JSON). `key` names the
/// configuration key of `listen` for errors. An empty `listen` serves
/// nothing and returns `None`; otherwise the bound address.
pub async fn serve(
    key: &str,
    listen: &str,
    probe: Arc<dyn Probe>,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, OpsError> {
    if listen.trim().is_empty() {
        return Ok(None);
    }
    let bind_error = |source| OpsError::Bind {
        key: key.to_owned(),
        env: format!("WARREN__{}", key.replace('.', "__").to_uppercase()),
        addr: listen.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probe);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics and health endpoint stopped");
        }
    });
    Ok(Some(addr))
}

async fn metrics(State(probe): State<Arc<dyn Probe>>) -> Response {
    let text = probe.metrics();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn readyz(State(probe): State<Arc<dyn Probe>>) -> Response {
    let mut checks = Map::new();
    let mut ready = true;
    for (name, ok) in probe.checks() {
        ready &= ok;
        checks.insert(name.to_owned(), Value::Bool(ok));
    }
    let mut body = Map::new();
    body.insert("ready".into(), Value::Bool(ready));
    body.insert("checks".into(), Value::Object(checks));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Value::Object(body))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fake(AtomicBool);

    impl Probe for Fake {
        fn metrics(&self) -> String {
            "fake_up 1\n".into()
        }
        fn checks(&self) -> Vec<(&'static str, bool)> {
            vec![("broker", self.0.load(Ordering::SeqCst))]
        }
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness_that_follows_the_checks() {
        let probe = Arc::new(Fake(AtomicBool::new(false)));
        let stop = CancellationToken::new();
        let addr = serve("worker.listen", "127.0.0.1:0", probe.clone(), stop.clone())
            .await
            .expect("binds")
            .expect("an address");
        let base = format!("http://{addr}");
        let get = |path: &str| reqwest::get(format!("{base}{path}"));
        assert_eq!(get("/healthz").await.unwrap().status(), 200);
        let m = get("/metrics").await.unwrap();
        assert!(m.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert_eq!(m.text().await.unwrap(), "fake_up 1\n");
        let r = get("/readyz").await.unwrap();
        assert_eq!(r.status(), 503);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["checks"]["broker"], false);
        probe.0.store(true, Ordering::SeqCst);
        assert_eq!(get("/readyz").await.unwrap().status(), 200);
        stop.cancel();
    }

    #[tokio::test]
    async fn an_empty_address_serves_nothing_and_a_taken_one_names_the_key() {
        let stop = CancellationToken::new();
        let probe = || -> Arc<dyn Probe> { Arc::new(Fake(AtomicBool::new(true))) };
        assert!(serve("worker.listen", "", probe(), stop.clone())
            .await
            .unwrap()
            .is_none());
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap().to_string();
        let err = serve("scheduler.listen", &taken, probe(), stop.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("scheduler.listen"), "{err}");
        assert!(err.contains("WARREN__SCHEDULER__LISTEN"), "{err}");
        assert!(err.contains(&taken), "{err}");
    }
}
