//! Sending a request and following its redirects by hand, so that every hop
//! is checked against the policy, the hop count is limited, and the task's
//! own headers (which may carry credentials) reach only the origin the task
//! named.

use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderName, ACCEPT, ACCEPT_LANGUAGE, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
};
use reqwest::{Method, Response, StatusCode, Url};

use super::{denied, redact, transport_error, Outbound};
use crate::TaskError;

/// Task headers that may follow a redirect to another origin; all others
/// (`Authorization`, cookies, API keys under any name) stay behind.
const CROSS_ORIGIN_SAFE: [HeaderName; 3] = [ACCEPT, ACCEPT_LANGUAGE, CONTENT_TYPE];

/// One request as a task describes it.
pub(crate) struct Request {
    /// The method of the first hop.
    pub method: Method,
    /// The first URL, already checked with [`Outbound::url`].
    pub url: Url,
    /// The task's own headers: sent to the first URL's origin only (except
    /// [`CROSS_ORIGIN_SAFE`]).
    pub headers: HeaderMap,
    /// Headers of Warren's own (`Range`, `If-Range`, a multipart content
    /// type), sent on every hop.
    pub extra: HeaderMap,
    /// A body that can be sent again on a 307/308 redirect.
    pub body: Option<Bytes>,
    /// A body that can be sent only once (a streamed upload): redirects are
    /// then not followed, the 3xx response is returned.
    pub stream: Option<reqwest::Body>,
}

/// Sends `req`, following up to `http.max_redirects` redirects (none when
/// it is 0: the 3xx response is returned). Returns the last response and its
/// URL. Every hop's URL is checked against the policy, and the connection
/// of every hop goes through the policy's resolver.
pub(crate) async fn send(out: &Outbound, req: Request) -> Result<(Response, Url), TaskError> {
    let Request {
        mut method,
        mut url,
        mut headers,
        extra,
        mut body,
        mut stream,
    } = req;
    let origin = url.origin();
    let follow = stream.is_none() && out.http.max_redirects > 0;
    let mut hops = 0;
    loop {
        out.policy.check_url(&url).map_err(denied)?;
        let same_origin = url.origin() == origin;
        let mut rb = out.client.request(method.clone(), url.clone());
        for (name, value) in &headers {
            if same_origin || CROSS_ORIGIN_SAFE.contains(name) {
                rb = rb.header(name, value);
            }
        }
        rb = rb.headers(extra.clone());
        if let Some(b) = &body {
            rb = rb.body(b.clone());
        } else if let Some(s) = stream.take() {
            rb = rb.body(s);
        }
        let resp = rb.send().await.map_err(|e| transport_error(e, &url))?;
        let status = resp.status();
        if !follow || !status.is_redirection() {
            return Ok((resp, url));
        }
        let Some(next) = location(&resp, &url) else {
            return Ok((resp, url));
        };
        let keep_body = match status {
            StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND if method == Method::POST => {
                method = Method::GET;
                false
            }
            StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND => true,
            StatusCode::SEE_OTHER => {
                if method != Method::HEAD {
                    method = Method::GET;
                }
                false
            }
            StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT => true,
            _ => return Ok((resp, url)),
        };
        if hops >= out.http.max_redirects {
            return Err(TaskError::permanent(
                "too_many_redirects",
                format!(
                    "{} redirected more than http.max_redirects = {} times (last to {})",
                    redact(&url),
                    out.http.max_redirects,
                    redact(&next)
                ),
            ));
        }
        hops += 1;
        if !keep_body {
            body = None;
            headers.remove(CONTENT_TYPE);
            headers.remove(CONTENT_LENGTH);
        }
        url = next;
    }
}

/// The redirect target, resolved against the current URL.
fn location(resp: &Response, base: &Url) -> Option<Url> {
    let loc = resp.headers().get(LOCATION)?.to_str().ok()?;
    base.join(loc).ok()
}
