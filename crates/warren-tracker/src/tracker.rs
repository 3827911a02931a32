//! The tracker process: ingestion, pruning and the HTTP server, under one
//! shutdown token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_core::{Config, Names};

use crate::metrics::Metrics;
use crate::store::{OpenMode, Store, StoreError};

/// `P.tracker.events`: the tracker's durable queue, bound to `P.events` with `#`.
pub fn tracker_queue(names: &Names) -> String {
    format!("{}.tracker.events", names.prefix())
}

/// Why the tracker stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP address could not be bound.
    #[error(
        "cannot listen on tracker.listen = {addr}: {source}: is another tracker running? \
         Set tracker.listen (WARREN__TRACKER__LISTEN) to a free address"
    )]
    Bind {
        /// The address from configuration.
        addr: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The HTTP side has no usable credentials (one line naming the key).
    #[error("{0}")]
    Auth(String),
    /// The HTTP server failed.
    #[error("tracker HTTP server: {0}")]
    Serve(std::io::Error),
    /// A broker operation failed.
    #[error("{what}: {source}")]
    Amqp {
        /// What was being done.
        what: String,
        /// What lapin said.
        source: lapin::Error,
    },
    /// Connecting to the broker failed.
    #[error(transparent)]
    Client(#[from] warren_client::ClientError),
    /// The broker closed the consumer.
    #[error("the broker closed the tracker's consumer on {0}")]
    ConsumerClosed(String),
}

/// Wraps a lapin error with what was being done.
pub(crate) fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> TrackerError {
    let what = what.into();
    move |source| TrackerError::Amqp { what, source }
}

/// What every part of a running tracker shares.
pub(crate) struct Shared {
    pub config: Config,
    pub store: Store,
    pub metrics: Metrics,
    /// Whether the consumer is attached to the broker right now.
    pub consuming: AtomicBool,
    /// For the management API.
    pub http: reqwest::Client,
    /// For the dead-letter operations of the API, opened on first use.
    pub amqp: tokio::sync::Mutex<Option<lapin::Connection>>,
    /// Credentials, sessions and failed-attempt counts of the HTTP side.
    pub auth: crate::auth::Auth,
    /// What the fleet has paused, read from the cancels stream.
    pub pauses: warren_client::runtime::CancelSet,
    /// The API's client of the broker, for the control commands operators
    /// send (cancel, change, pause), connected on first use.
    pub client: tokio::sync::OnceCell<warren_client::Client>,
    /// The last half hour of outcomes and waits, for the dashboard's charts.
    pub timeline: crate::timeline::Timeline,
    /// The last view of the flow limits and when it was read, so the
    /// dashboard's polling and metric scrapes share one read per second.
    pub limits: tokio::sync::Mutex<Option<(std::time::Instant, Arc<crate::limits::LimitsView>)>>,
}

impl Shared {
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }
}

/// A tracker process (`warren tracker`, or part of `warren up`).
#[derive(Debug)]
pub struct Tracker {
    config: Config,
    http_optional: bool,
}

impl Tracker {
    /// A tracker for a validated configuration.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            http_optional: false,
        }
    }

    /// When the HTTP address is taken or no credentials are usable, log it
    /// and track without serving HTTP instead of failing (for `warren up`,
    /// where tracking matters more).
    pub fn http_optional(mut self, optional: bool) -> Self {
        self.http_optional = optional;
        self
    }

    /// Runs until `shutdown` is cancelled: the current batch is written and
    /// acknowledged, then everything stops. Fails only at start (credentials,
    /// database, HTTP address); broker outages are waited out with reconnects.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), TrackerError> {
        let t = &self.config.tracker;
        let auth = match crate::auth::Auth::from_config(&self.config) {
            Ok(auth) => Some(auth),
            Err(e) if self.http_optional => {
                warn!(error = %e, "tracker runs without its HTTP API and dashboard");
                None
            }
            Err(e) => return Err(TrackerError::Auth(e)),
        };
        let store = Store::open(&t.database_url, OpenMode::Create).await?;
        info!(database = %store.url(), backend = ?store.backend(), "tracker database open");
        let bound = match &auth {
            Some(_) => Some(tokio::net::TcpListener::bind(&t.listen).await),
            None => None,
        };
        let listener = match bound {
            None => None,
            Some(Ok(l)) => Some(l),
            Some(Err(source)) => {
                let e = TrackerError::Bind {
                    addr: t.listen.clone(),
                    source,
                };
                if !self.http_optional {
                    store.close().await;
                    return Err(e);
                }
                warn!(error = %e, "tracker runs without its HTTP API and dashboard");
                None
            }
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a TLS backend is compiled in");
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            store,
            metrics: Metrics::default(),
            consuming: AtomicBool::new(false),
            http,
            amqp: tokio::sync::Mutex::new(None),
            // Without credentials nothing is served; closed ones stand in.
            auth: auth.unwrap_or_else(crate::auth::Auth::closed),
            pauses: warren_client::runtime::CancelSet::new(),
            client: tokio::sync::OnceCell::new(),
            timeline: crate::timeline::Timeline::default(),
            limits: tokio::sync::Mutex::new(None),
        });
        let follow_pauses = {
            let (ready, _) = tokio::sync::oneshot::channel();
            shared.pauses.follow(
                self.config.broker.clone(),
                self.config.names(),
                Duration::from_millis(self.config.broker.reconnect_max_ms),
                shutdown.clone(),
                ready,
            )
        };
        let serve = async {
            let Some(listener) = listener else {
                return Ok(());
            };
            if let Ok(addr) = listener.local_addr() {
                info!(
                    url = %format!("http://{addr}/"),
                    "tracker dashboard and API listening"
                );
                if shared.auth.is_open() {
                    warn!(
                        listen = %addr,
                        "tracker.open = true: the API and dashboard answer anyone who reaches \
                         this address, without authentication, and can replay dead tasks"
                    );
                }
            }
            let app = crate::api::router(shared.clone())
                .into_make_service_with_connect_info::<std::net::SocketAddr>();
            let stop = shutdown.clone();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .map_err(TrackerError::Serve)
        };
        let published = async {
            if shared.config.tracker.track_published {
                crate::ingest::consume(
                    shared.clone(),
                    crate::ingest::Source::Published,
                    shutdown.clone(),
                )
                .await;
            }
        };
        let (served, (), (), (), ()) = tokio::join!(
            serve,
            follow_pauses,
            published,
            crate::ingest::consume(
                shared.clone(),
                crate::ingest::Source::Events,
                shutdown.clone(),
            ),
            crate::ingest::prune(shared.clone(), shutdown.clone()),
        );
        if let Some(conn) = shared.amqp.lock().await.take() {
            let _ = conn.close(200, "tracker stopping".into()).await;
        }
        shared.store.close().await;
        info!("tracker stopped");
        served
    }
}
