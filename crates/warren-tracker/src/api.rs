//! The tracker's HTTP side: the dashboard (static files compiled in), the
//! JSON API (`docs/openapi.yaml`), `/metrics`, `/healthz` and `/readyz`;
//! every route passes [`crate::gate::guard`] first.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use warren_client::dead::{DeadFilter, DeadLetters};

use crate::auth::{Identity, Via};
use crate::store::{NewAction, TaskFilter};
use crate::tracker::Shared;

const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");
const STYLE_CSS: &str = include_str!("../static/style.css");

/// Most tasks one listing returns.
const MAX_LIMIT: i64 = 1000;

/// Most dead tasks one listing returns.
const MAX_DEAD_LIMIT: usize = 500;

/// The routes, over the tracker's shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { static_file("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { static_file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { static_file("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/tasks", get(list_tasks))
        .route("/api/tasks/{id}", get(task))
        .route("/api/tasks/{id}/cancel", post(cancel_task))
        .route("/api/tasks/{id}/priority", post(reprioritize_task))
        .route("/api/tasks/{id}/run-now", post(run_task_now))
        .route("/api/actions", get(actions))
        .route("/api/timeline", get(timeline))
        .route("/api/workflows/{id}", get(workflow))
        .route("/api/stats", get(stats))
        .route("/api/failures", get(failures))
        .route("/api/queues", get(queues))
        .route("/api/paused", get(paused))
        .route("/api/limits", get(limits))
        .route("/api/pause", post(pause))
        .route("/api/dead", get(dead_list))
        .route("/api/dead/replay", post(dead_replay))
        .route("/api/session", get(crate::gate::session_info))
        .route(
            "/login",
            get(crate::gate::login_page).post(crate::gate::login),
        )
        .route("/logout", post(crate::gate::logout))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            crate::gate::guard,
        ))
        .with_state(shared)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// A JSON error `{"error": "..."}` with a status.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// `Query`, with a refused query string answered as a JSON error.
struct ApiQuery<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(error(r.status(), r.body_text())),
        }
    }
}

/// `Path`, with a refused path answered as a JSON error.
struct ApiPath<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(r) => Err(error(r.status(), r.body_text())),
        }
    }
}

/// `Json`, with a refused body (not JSON, not of the expected shape: 400;
/// wrong content type: 415) answered as a JSON error.
struct ApiJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            // A JSON body of the wrong shape is as bad a request as no JSON.
            Err(r) if r.status() == StatusCode::UNPROCESSABLE_ENTITY => {
                Err(error(StatusCode::BAD_REQUEST, r.body_text()))
            }
            Err(r) => Err(error(r.status(), r.body_text())),
        }
    }
}

/// A 400 for text with a NUL character, which no task id, type or state
/// holds and PostgreSQL cannot compare.
fn refuse_nul(text: &str) -> Option<Response> {
    text.contains('\0').then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "a NUL character is in a parameter: no task id, type or state has one",
        )
    })
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "tracker API request failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let broker = s.is_consuming();
    let database = s.store.ping().await.is_ok();
    let body = Json(json!({"ready": broker && database, "broker": broker, "database": database}));
    let status = if broker && database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let counts = s.store.state_counts().await.ok();
    let ready = s.is_consuming() && counts.is_some();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(counts.as_ref(), ready) + &paused_metrics(&s) + &limits_metrics(&s).await,
    )
        .into_response()
}

/// How long a view of the flow limits is reused.
const LIMITS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The flow limits now (or as read within [`LIMITS_TTL`]): the broker's
/// side from the management API (its error kept in the view), the waiting
/// tasks from the database.
async fn limits_view(s: &Shared) -> Result<Arc<crate::limits::LimitsView>, crate::StoreError> {
    let mut cached = s.limits.lock().await;
    if let Some((at, view)) = cached.as_ref() {
        if at.elapsed() < LIMITS_TTL {
            return Ok(view.clone());
        }
    }
    let known = crate::limits::configured(&s.config);
    let prefix = s.config.prefix.as_str();
    let mut view = match crate::limits::read_broker(&s.http, &s.config).await {
        Ok(broker) => crate::limits::assemble(prefix, &known, &broker),
        Err(e) => crate::limits::LimitsView {
            error: Some(e),
            ..crate::limits::assemble(prefix, &known, &Default::default())
        },
    };
    let waiting = s.store.queued_counts(&view.limited_types()).await?;
    view.set_waiting(&waiting);
    view.at = crate::record::format_ms(chrono::Utc::now().timestamp_millis());
    let view = Arc::new(view);
    *cached = Some((std::time::Instant::now(), view.clone()));
    Ok(view)
}

/// `GET /api/limits`: permits held, rate tokens left, unique locks, tenant
/// queues and tasks waiting on a limit.
async fn limits(State(s): State<Arc<Shared>>) -> Response {
    match limits_view(&s).await {
        Ok(view) => Json(&*view).into_response(),
        Err(e) => internal(e),
    }
}

/// The flow gauges for `/metrics` (none when the database fails; those
/// read from the broker are absent while the management API fails).
async fn limits_metrics(s: &Shared) -> String {
    match limits_view(s).await {
        Ok(view) => view.render_metrics(),
        Err(_) => String::new(),
    }
}

/// Query of `GET /api/tasks`.
#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    #[serde(rename = "type")]
    task_type: Option<String>,
    /// Short queue name.
    queue: Option<String>,
    /// RFC 3339 time, Unix ms, or an age such as `15m`.
    since: Option<String>,
    limit: Option<i64>,
}

/// A time filter: RFC 3339, Unix milliseconds, or an age back from now
/// (`30s`, `15m`, `2h`, `7d`). Returns Unix milliseconds.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64, String> {
    let text = text.trim();
    if let Some(ms) = crate::record::parse_time_ms(text) {
        return Ok(ms);
    }
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let unit_ms: i64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => 0,
    };
    match n.parse::<i64>() {
        Ok(n) if unit_ms > 0 => Ok(now_ms.saturating_sub(n.saturating_mul(unit_ms))),
        _ => Err(format!(
            "since {text:?} is not a time: use an age such as 15m, 2h or 7d, an RFC 3339 time \
             (2026-11-24T10:00:00Z) or Unix milliseconds"
        )),
    }
}

async fn list_tasks(State(s): State<Arc<Shared>>, ApiQuery(q): ApiQuery<ListQuery>) -> Response {
    let since_ms = match q.since.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => match parse_since(t, chrono::Utc::now().timestamp_millis()) {
            Ok(ms) => Some(ms),
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
        None => None,
    };
    if let Some(refused) = [&q.state, &q.task_type, &q.queue]
        .into_iter()
        .flatten()
        .find_map(|v| refuse_nul(v))
    {
        return refused;
    }
    let filter = TaskFilter {
        state: q.state.filter(|v| !v.is_empty()),
        task_type: q.task_type.filter(|v| !v.is_empty()),
        queue: q.queue.filter(|v| !v.is_empty()),
        since_ms,
        limit: q.limit.unwrap_or(100).clamp(1, MAX_LIMIT),
    };
    match s.store.list(&filter).await {
        Ok(rows) => {
            let tasks: Vec<_> = rows.iter().map(|r| r.view()).collect();
            Json(json!({"tasks": tasks})).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn task(State(s): State<Arc<Shared>>, ApiPath(id): ApiPath<String>) -> Response {
    if let Some(refused) = refuse_nul(&id) {
        return refused;
    }
    match s.store.task_with_history(&id).await {
        Ok(Some((row, history))) => {
            let events: Vec<Value> = history.into_iter().map(|h| h.event).collect();
            Json(json!({"task": row.view(), "events": events})).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no task {id:?} in the tracker (unknown, not seen yet, or pruned)"),
        ),
        Err(e) => internal(e),
    }
}

/// A workflow's state: its tasks' counts per state and the tasks
/// (contract section 8).
async fn workflow(
    State(s): State<Arc<Shared>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LimitQuery>,
) -> Response {
    if let Some(refused) = refuse_nul(&id) {
        return refused;
    }
    let counts = match s.store.workflow_counts(&id).await {
        Ok(c) if c.is_empty() => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no workflow {id:?} in the tracker (unknown, not seen yet, or pruned)"),
            )
        }
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    let limit = q.limit.unwrap_or(MAX_LIMIT).clamp(1, MAX_LIMIT);
    match s.store.workflow(&id, limit).await {
        Ok(rows) => Json(crate::record::workflow_view(&id, &counts, &rows)).into_response(),
        Err(e) => internal(e),
    }
}

async fn stats(State(s): State<Arc<Shared>>) -> Response {
    match s.store.state_counts().await {
        Ok(states) => {
            let total: i64 = states.values().sum();
            Json(json!({
                "at": crate::record::format_ms(chrono::Utc::now().timestamp_millis()),
                "states": states,
                "tasks": total,
                "events_ingested": s.metrics.ingested_total(),
                "consuming": s.is_consuming(),
            }))
            .into_response()
        }
        Err(e) => internal(e),
    }
}

/// `GET /api/timeline`: the charts' data, per 10 s over the last half hour.
async fn timeline(State(s): State<Arc<Shared>>) -> Response {
    Json(s.timeline.view(chrono::Utc::now().timestamp_millis())).into_response()
}

/// Query of listings that take only a limit.
#[derive(Debug, Deserialize)]
struct LimitQuery {
    limit: Option<i64>,
}

async fn failures(State(s): State<Arc<Shared>>, ApiQuery(q): ApiQuery<LimitQuery>) -> Response {
    match s
        .store
        .recent_failures(q.limit.unwrap_or(20).clamp(1, MAX_LIMIT))
        .await
    {
        Ok(rows) => {
            let tasks: Vec<_> = rows.iter().map(|r| r.view()).collect();
            Json(json!({"tasks": tasks})).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn queues(State(s): State<Arc<Shared>>) -> Response {
    match crate::mgmt::queues(&s.http, &s.config).await {
        Ok(queues) => Json(json!({"queues": queues})).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

/// The gauge of every paused queue and type, for `/metrics`.
fn paused_metrics(s: &Shared) -> String {
    let mut e = warren_ops::Exposition::new();
    e.family(
        "warren_tracker_fleet_paused",
        "gauge",
        "1 for each work queue (kind=queue, short name) or task type (kind=type) paused fleet-wide.",
    );
    for (t, _) in s.pauses.pauses().paused() {
        e.sample(
            "warren_tracker_fleet_paused",
            &[("kind", t.kind.as_str()), ("name", &t.name)],
            1.0,
        );
    }
    e.finish()
}

/// `GET /api/paused`: the paused work queues and task types, with when
/// each was paused.
async fn paused(State(s): State<Arc<Shared>>) -> Response {
    let paused: Vec<Value> = s
        .pauses
        .pauses()
        .paused()
        .into_iter()
        .map(|(t, at)| json!({"kind": t.kind, "name": t.name, "since": crate::record::format_ms(at)}))
        .collect();
    Json(json!({"paused": paused})).into_response()
}

/// Body of `POST /api/pause`.
#[derive(Debug, Deserialize)]
struct PauseRequest {
    /// `queue` or `type`.
    kind: String,
    name: String,
    /// True to pause, false to resume.
    paused: bool,
}

/// `POST /api/pause` (admin): pauses or resumes a work queue or task type
/// fleet-wide, as `warren pause` and `warren resume` do; recorded.
async fn pause(
    State(s): State<Arc<Shared>>,
    Extension(who): Extension<Identity>,
    ApiJson(req): ApiJson<PauseRequest>,
) -> Response {
    use warren_core::pauses::PauseTarget;
    let action = if req.paused { "pause" } else { "resume" };
    let detail = json!({"kind": req.kind, "name": req.name});
    let target_name = format!("{}:{}", req.kind, req.name);
    let target = match req.kind.as_str() {
        "queue" if s.config.queues.iter().any(|q| q.name == req.name) => {
            Ok(PauseTarget::queue(&req.name))
        }
        "queue" => Err(format!("unknown queue {:?}", req.name)),
        "type" if warren_core::routes::is_valid_task_type(&req.name) => {
            Ok(PauseTarget::task_type(&req.name))
        }
        "type" => Err(format!("invalid task type {:?}", req.name)),
        _ => Err("kind must be \"queue\" or \"type\"".to_owned()),
    };
    let outcome = match target {
        Err(e) => Err((StatusCode::BAD_REQUEST, e)),
        Ok(target) => match client(&s).await {
            Err(e) => Err(e),
            Ok(c) => match c.set_paused(&target, req.paused).await {
                Ok(()) => {
                    tracing::info!(user = %who.name, %target, action, "pause record sent through the tracker API");
                    Ok(("sent".to_owned(), json!({"sent": true})))
                }
                Err(e) => Err((StatusCode::BAD_GATEWAY, e.to_string())),
            },
        },
    };
    finish(&s, &who, action, &target_name, detail, outcome).await
}

/// The API's client of the broker (as the CLI's), connected on first use.
async fn client(s: &Shared) -> Result<&warren_client::Client, (StatusCode, String)> {
    s.client
        .get_or_try_init(|| warren_client::Client::connect(&s.config))
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))
}

/// How an action ended: a short outcome for the record and the answer's
/// body, or a status and why.
type Outcome = Result<(String, Value), (StatusCode, String)>;

/// Records an action (who, when, what, how it ended) in the database and
/// answers: the body with `"action"` (the record) added, or the error. An
/// action done but not recorded is answered 500, saying so.
async fn finish(
    s: &Shared,
    who: &Identity,
    action: &str,
    target: &str,
    detail: Value,
    outcome: Outcome,
) -> Response {
    let (text, ok) = match &outcome {
        Ok((text, _)) => (text.clone(), true),
        Err((_, e)) => (e.clone(), false),
    };
    let record = NewAction {
        at_ms: warren_client::runtime::now_ms(),
        actor: who.name.clone(),
        role: who.role.as_str().to_owned(),
        via: match who.via {
            Via::Token => "token",
            Via::Session { .. } => "session",
            Via::Open => "open",
        }
        .to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        detail,
        outcome: text,
        ok,
    };
    let recorded = s.store.record_action(&record).await;
    if let Err(e) = &recorded {
        tracing::warn!(error = %e, user = %who.name, action, target, "an action through the tracker API could not be recorded");
    }
    match (outcome, recorded) {
        (Ok((_, mut body)), Ok(id)) => {
            body["action"] = json!({"id": id, "action": action, "target": target, "by": who.name});
            Json(body).into_response()
        }
        (Ok(_), Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{action} {target} was done but could not be recorded: {e}"),
        ),
        (Err((status, e)), _) => error(status, e),
    }
}

/// The tracker's state of a task an operator acts on: 404 when unknown.
async fn known_task(s: &Shared, id: &str) -> Result<crate::TaskRow, (StatusCode, String)> {
    if id.contains('\0') || id.is_empty() {
        return Err((StatusCode::BAD_REQUEST, "not a task id".to_owned()));
    }
    match s.store.task(id).await {
        Ok(Some(row)) => Ok(row),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            format!("no task {id:?} in the tracker (unknown, not seen yet, or pruned)"),
        )),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// `POST /api/tasks/{id}/cancel` (admin): sends `{"cancel": id}` as
/// `warren cancel` does; refused for a task that has ended. Recorded.
async fn cancel_task(
    State(s): State<Arc<Shared>>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
) -> Response {
    let outcome = async {
        let task = known_task(&s, &id).await?;
        if let Some(why) = crate::record::cancel_refusal(&task) {
            return Err((StatusCode::CONFLICT, why));
        }
        client(&s)
            .await?
            .cancel(&id)
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
        tracing::info!(user = %who.name, task_id = %id, "cancel sent through the tracker API");
        Ok((
            "sent".to_owned(),
            json!({"sent": true, "state": task.state}),
        ))
    }
    .await;
    finish(&s, &who, "cancel", &id, json!({}), outcome).await
}

/// Body of `POST /api/tasks/{id}/priority`.
#[derive(Debug, Deserialize)]
struct PriorityRequest {
    priority: u8,
}

/// Sends a change record for a waiting task, as `warren task` does.
async fn change(
    s: &Shared,
    who: &Identity,
    id: &str,
    priority: Option<u8>,
    due_ms: Option<i64>,
) -> Outcome {
    let task = known_task(s, id).await?;
    if let Some(why) = crate::record::change_refusal(&task) {
        return Err((StatusCode::CONFLICT, why));
    }
    let at = client(s)
        .await?
        .change_task(id, priority, due_ms)
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    tracing::info!(user = %who.name, task_id = %id, ?priority, ?due_ms, "change sent through the tracker API");
    Ok((
        "sent".to_owned(),
        json!({"sent": true, "state": task.state, "at": crate::record::format_ms(at)}),
    ))
}

/// `POST /api/tasks/{id}/priority` (admin): a waiting task's new priority
/// (0..=255), as `warren task reprioritize`. Recorded.
async fn reprioritize_task(
    State(s): State<Arc<Shared>>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<PriorityRequest>,
) -> Response {
    let outcome = change(&s, &who, &id, Some(req.priority), None).await;
    let detail = json!({"priority": req.priority});
    finish(&s, &who, "priority", &id, detail, outcome).await
}

/// `POST /api/tasks/{id}/run-now` (admin): a waiting task due now, as
/// `warren task run-now`. Recorded.
async fn run_task_now(
    State(s): State<Arc<Shared>>,
    Extension(who): Extension<Identity>,
    ApiPath(id): ApiPath<String>,
) -> Response {
    let now = warren_client::runtime::now_ms();
    let outcome = change(&s, &who, &id, None, Some(now)).await;
    let detail = json!({"due": crate::record::format_ms(now)});
    finish(&s, &who, "run_now", &id, detail, outcome).await
}

/// Query of `GET /api/actions`.
#[derive(Debug, Deserialize)]
struct ActionsQuery {
    target: Option<String>,
    limit: Option<i64>,
}

/// `GET /api/actions`: the latest recorded actions, newest first.
async fn actions(State(s): State<Arc<Shared>>, ApiQuery(q): ApiQuery<ActionsQuery>) -> Response {
    if let Some(refused) = q.target.as_deref().and_then(refuse_nul) {
        return refused;
    }
    let target = q.target.as_deref().filter(|t| !t.is_empty());
    match s
        .store
        .actions(target, q.limit.unwrap_or(50).clamp(1, MAX_LIMIT))
        .await
    {
        Ok(actions) => Json(json!({"actions": actions})).into_response(),
        Err(e) => internal(e),
    }
}

/// The API's broker connection, opened (again) when needed.
async fn with_connection<R>(
    s: &Shared,
    f: impl AsyncFnOnce(&lapin::Connection) -> R,
) -> Result<R, String> {
    let mut slot = s.amqp.lock().await;
    if !slot.as_ref().is_some_and(|c| c.status().connected()) {
        let conn = warren_client::runtime::connect(&s.config.broker, "tracker-api")
            .await
            .map_err(|e| e.to_string())?;
        *slot = Some(conn);
    }
    let conn = slot.as_ref().expect("connected just above");
    Ok(f(conn).await)
}

/// Query of `GET /api/dead`.
#[derive(Debug, Deserialize)]
struct DeadQuery {
    #[serde(rename = "type")]
    task_type: Option<String>,
    reason: Option<String>,
    limit: Option<usize>,
}

async fn dead_list(State(s): State<Arc<Shared>>, ApiQuery(q): ApiQuery<DeadQuery>) -> Response {
    let filter = DeadFilter {
        task_type: q.task_type.filter(|v| !v.is_empty()),
        reason: q.reason.filter(|v| !v.is_empty()),
        ids: None,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_DEAD_LIMIT);
    let names = s.config.names();
    let outcome = with_connection(&s, async |conn| {
        let mut tasks = Vec::new();
        let report = DeadLetters::new(conn, &names)
            .list(&filter, Some(limit), |t| {
                tasks.push(t.to_json());
                ControlFlow::Continue(())
            })
            .await;
        report.map(|r| (r, tasks))
    })
    .await;
    match outcome {
        Ok(Ok((report, tasks))) => Json(json!({
            "queue": names.dead(),
            "depth": report.depth,
            "shown": tasks.len(),
            "limited": report.limited,
            "tasks": tasks,
        }))
        .into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

/// Body of `POST /api/dead/replay`.
#[derive(Debug, Deserialize)]
struct ReplayRequest {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
    #[serde(rename = "type")]
    task_type: Option<String>,
    reason: Option<String>,
}

async fn dead_replay(
    State(s): State<Arc<Shared>>,
    Extension(who): Extension<Identity>,
    ApiJson(req): ApiJson<ReplayRequest>,
) -> Response {
    if req.ids.is_empty() && !req.all {
        return error(
            StatusCode::BAD_REQUEST,
            "say which dead tasks to replay: {\"ids\": [\"<task id>\", ...]} or {\"all\": true}",
        );
    }
    let target = match req.ids.as_slice() {
        [one] if !req.all => one.clone(),
        _ => s.config.names().dead(),
    };
    let detail =
        json!({"ids": req.ids, "all": req.all, "type": req.task_type, "reason": req.reason});
    let filter = DeadFilter {
        task_type: req.task_type.filter(|v| !v.is_empty()),
        reason: req.reason.filter(|v| !v.is_empty()),
        ids: (!req.all).then(|| req.ids.iter().cloned().collect::<BTreeSet<_>>()),
    };
    let names = s.config.names();
    let outcome = with_connection(&s, async |conn| {
        DeadLetters::new(conn, &names).replay(&filter).await
    })
    .await;
    let outcome = match outcome {
        Ok(Ok(report)) => {
            let not_found: Vec<&String> = if req.all {
                Vec::new()
            } else {
                req.ids
                    .iter()
                    .filter(|id| !report.found.contains(*id))
                    .collect()
            };
            tracing::info!(
                user = %who.name,
                replayed = report.replayed,
                "dead tasks replayed through the tracker API"
            );
            Ok((
                format!("replayed {}", report.replayed),
                json!({
                    "replayed": report.replayed,
                    "not_found": not_found,
                    "skipped_no_type": report.skipped_no_type,
                }),
            ))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "tracker API request failed");
            Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
        Err(e) => Err((StatusCode::BAD_GATEWAY, e)),
    };
    finish(&s, &who, "replay", &target, detail, outcome).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_in_openapi() {
        let spec = include_str!("../../../docs/openapi.yaml");
        for path in [
            "/",
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/tasks",
            "/api/tasks/{id}",
            "/api/tasks/{id}/cancel",
            "/api/tasks/{id}/priority",
            "/api/tasks/{id}/run-now",
            "/api/actions",
            "/api/timeline",
            "/api/stats",
            "/api/failures",
            "/api/queues",
            "/api/paused",
            "/api/limits",
            "/api/pause",
            "/api/dead",
            "/api/dead/replay",
            "/api/session",
            "/login",
            "/logout",
        ] {
            assert!(
                spec.contains(&format!("\n  {path}:\n")),
                "{path} in docs/openapi.yaml"
            );
        }
    }

    #[test]
    fn since_accepts_ages_times_and_millis() {
        let now = 10_000_000;
        assert_eq!(parse_since("15m", now), Ok(now - 900_000));
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since("1d", now), Ok(now - 86_400_000));
        assert_eq!(parse_since("500ms", now), Ok(now - 500));
        assert_eq!(parse_since("1234", now), Ok(1234));
        assert_eq!(parse_since("1970-01-01T00:00:01Z", now), Ok(1000));
        assert!(parse_since("soon", now).unwrap_err().contains("15m"));
        assert!(parse_since("5w", now).is_err());
    }
}
