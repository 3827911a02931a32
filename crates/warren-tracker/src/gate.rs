//! The door of the tracker's HTTP side: every request but the health
//! checks, `/metrics`, the login page and the static files must carry a
//! bearer token or a dashboard session ([`guard`]); what changes something
//! needs the `admin` role, and through a session also the session's CSRF
//! token in `X-CSRF-Token`. The login form has a CSRF token of its own (a
//! cookie repeated in the form), so another site cannot log a browser in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Form, Json};
use serde::Deserialize;
use serde_json::json;
use tracing::{debug, info, warn};
use warren_core::config::TrackerRole;

use crate::auth::{loggable, random_token, same_token, Identity, Via};
use crate::tracker::Shared;

const LOGIN_HTML: &str = include_str!("../static/login.html");

/// The session cookie.
pub(crate) const SESSION_COOKIE: &str = "warren_session";

/// The login form's CSRF cookie.
const LOGIN_CSRF_COOKIE: &str = "warren_login_csrf";

/// The header a session's state-changing request carries its CSRF token in.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";

/// How long a login form stays usable.
const LOGIN_FORM_SECS: u64 = 3600;

/// Paths anyone may reach: health, metrics (as on every Warren process),
/// the login and logout forms (checked by their handlers) and static files
/// that hold no data.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/login" | "/logout" | "/style.css" | "/app.js"
    )
}

/// Authenticates and authorises every request that is not public; puts the
/// [`Identity`] in the request's extensions for the handlers.
pub(crate) async fn guard(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let auth = &s.auth;
    let client = peer.ip();
    let identity = if auth.is_open() {
        Identity {
            name: "anonymous".into(),
            role: TrackerRole::Admin,
            via: Via::Open,
        }
    } else if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        if let Some(wait) = auth.blocked_for(client) {
            debug!(client = %client, "tracker request refused: too many failed attempts");
            return too_many_json(wait);
        }
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        match token.and_then(|t| auth.token(t)) {
            Some(identity) => identity,
            None => {
                let used_up = auth.record_failure(client);
                warn!(
                    client = %client,
                    path = %req.uri().path(),
                    "tracker request with an unknown bearer token (or not Authorization: Bearer)"
                );
                if used_up {
                    warn!(client = %client, "too many failed tracker logins from this address: answered 429 for a minute");
                }
                return unauthorized(true);
            }
        }
    } else if let Some(identity) =
        cookie(req.headers(), SESSION_COOKIE).and_then(|id| auth.session(&id))
    {
        identity
    } else if req.uri().path() == "/" {
        return see_other("/login");
    } else {
        return unauthorized(false);
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        if identity.role != TrackerRole::Admin {
            return json_error(
                StatusCode::FORBIDDEN,
                format!(
                    "{} has the read role: {} {} needs an admin credential",
                    identity.name,
                    req.method(),
                    req.uri().path()
                ),
            );
        }
        if let Via::Session { csrf } = &identity.via {
            let sent = req
                .headers()
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !same_token(sent, csrf) {
                warn!(user = %identity.name, client = %client, path = %req.uri().path(), "tracker request refused: missing or wrong CSRF token");
                return json_error(
                    StatusCode::FORBIDDEN,
                    "missing or wrong X-CSRF-Token header: reload the dashboard \
                     (GET /api/session gives the session's token)",
                );
            }
        }
    }
    req.extensions_mut().insert(identity);
    next.run(req).await
}

/// `GET /api/session`: who is asking, and the CSRF token of a session.
pub(crate) async fn session_info(Extension(who): Extension<Identity>) -> Response {
    let (auth, csrf) = match &who.via {
        Via::Token => ("token", None),
        Via::Session { csrf } => ("session", Some(csrf.clone())),
        Via::Open => ("open", None),
    };
    Json(json!({
        "user": who.name,
        "role": who.role.as_str(),
        "auth": auth,
        "csrf": csrf,
    }))
    .into_response()
}

/// Fields of the login form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

/// `GET /login`: the form, with a fresh CSRF token.
pub(crate) async fn login_page(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if s.auth.is_open()
        || cookie(&headers, SESSION_COOKIE).is_some_and(|id| s.auth.session(&id).is_some())
    {
        return see_other("/");
    }
    login_form(StatusCode::OK, "", &headers)
}

/// `POST /login`: checks the form's CSRF token, then the password; opens a
/// session and goes to the dashboard, or shows the form again.
pub(crate) async fn login(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    if s.auth.is_open() {
        return see_other("/");
    }
    let client = peer.ip();
    if let Some(wait) = s.auth.blocked_for(client) {
        debug!(client = %client, "tracker login refused: too many failed attempts");
        let mut r = login_form(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "Too many failed logins from your address: try again in {} s.",
                retry_secs(wait)
            ),
            &headers,
        );
        set_retry_after(&mut r, wait);
        return r;
    }
    let Ok(Form(form)) = form else {
        return login_form(
            StatusCode::BAD_REQUEST,
            "The login form was not sent as a form: log in again.",
            &headers,
        );
    };
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if expected.is_empty() || !same_token(&form.csrf, &expected) {
        return login_form(
            StatusCode::FORBIDDEN,
            "The login form expired or came from elsewhere: log in again.",
            &headers,
        );
    }
    let Some(role) = s.auth.login(&form.user, &form.password) else {
        let used_up = s.auth.record_failure(client);
        warn!(user = ?loggable(&form.user), client = %client, "tracker login failed: unknown user or wrong password");
        if used_up {
            warn!(client = %client, "too many failed tracker logins from this address: answered 429 for a minute");
        }
        return login_form(
            StatusCode::UNAUTHORIZED,
            "Wrong user name or password.",
            &headers,
        );
    };
    let (id, ttl) = s.auth.open_session(&form.user, role);
    info!(user = %form.user, role = %role, client = %client, "tracker dashboard login");
    let mut r = see_other("/");
    let secure = secure_suffix(&headers);
    append_cookie(
        &mut r,
        &format!(
            "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            ttl.as_secs().max(1)
        ),
    );
    append_cookie(
        &mut r,
        &format!("{LOGIN_CSRF_COOKIE}=; Path=/login; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    );
    r
}

/// Fields of the logout form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /logout`: ends the session (its CSRF token in the form) and goes
/// to the login page.
pub(crate) async fn logout(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<LogoutForm>, FormRejection>,
) -> Response {
    let id = cookie(&headers, SESSION_COOKIE);
    let Some((id, who)) = id.and_then(|id| s.auth.session(&id).map(|who| (id, who))) else {
        return see_other("/login");
    };
    let csrf_ok = match (&who.via, &form) {
        (Via::Session { csrf }, Ok(Form(f))) => same_token(&f.csrf, csrf),
        _ => false,
    };
    if !csrf_ok {
        return json_error(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token in the logout form: reload the dashboard",
        );
    }
    s.auth.close_session(&id);
    info!(user = %who.name, "tracker dashboard logout");
    let mut r = see_other("/login");
    append_cookie(
        &mut r,
        &format!(
            "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            secure_suffix(&headers)
        ),
    );
    r
}

/// The login page with a message and a fresh CSRF token (also set as its cookie).
fn login_form(status: StatusCode, message: &str, headers: &HeaderMap) -> Response {
    let csrf = random_token();
    let page = LOGIN_HTML
        .replace("{{message}}", &html_escape(message))
        .replace("{{csrf}}", &csrf);
    let mut r = (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response();
    append_cookie(
        &mut r,
        &format!(
            "{LOGIN_CSRF_COOKIE}={csrf}; Path=/login; HttpOnly; SameSite=Strict; \
             Max-Age={LOGIN_FORM_SECS}{}",
            secure_suffix(headers)
        ),
    );
    r
}

/// `; Secure` behind a TLS proxy that says so (`X-Forwarded-Proto: https`).
fn secure_suffix(headers: &HeaderMap) -> &'static str {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    if https {
        "; Secure"
    } else {
        ""
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.to_owned())
}

fn append_cookie(r: &mut Response, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn see_other(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// 401 with `WWW-Authenticate`; `invalid` when a credential was sent.
fn unauthorized(invalid: bool) -> Response {
    let (challenge, message) = if invalid {
        (
            "Bearer realm=\"warren-tracker\", error=\"invalid_token\"",
            "unknown bearer token: send Authorization: Bearer <token> with a token of \
             tracker.tokens",
        )
    } else {
        (
            "Bearer realm=\"warren-tracker\"",
            "authentication required: send Authorization: Bearer <token> (tracker.tokens), \
             or log in to the dashboard at /login (tracker.users)",
        )
    };
    let mut r = json_error(StatusCode::UNAUTHORIZED, message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    r
}

fn retry_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

fn set_retry_after(r: &mut Response, wait: Duration) {
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_secs(wait).max(1)),
    );
}

fn too_many_json(wait: Duration) -> Response {
    let mut r = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "too many failed logins or bad tokens from this address: try again in {} s",
            retry_secs(wait)
        ),
    );
    set_retry_after(&mut r, wait);
    r
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; warren_session=abc"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "b").as_deref(), Some("2"));
        assert_eq!(cookie(&h, "warren"), None);
    }

    #[test]
    fn public_paths_hold_no_data() {
        for p in ["/healthz", "/readyz", "/metrics", "/login", "/style.css"] {
            assert!(is_public(p), "{p}");
        }
        for p in [
            "/",
            "/api/tasks",
            "/api/session",
            "/api/dead/replay",
            "/loginx",
        ] {
            assert!(!is_public(p), "{p}");
        }
    }

    #[test]
    fn the_login_page_escapes_its_message() {
        let r = login_form(StatusCode::OK, "<b>", &HeaderMap::new());
        assert!(r.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("HttpOnly; SameSite=Strict"));
        assert_eq!(
            html_escape("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
        assert_eq!(retry_secs(Duration::from_millis(1500)), 2);
    }
}
