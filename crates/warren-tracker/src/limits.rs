//! What the fleet's flow limits look like right now (contract section 9):
//! permits held, rate tokens left, unique locks, tenant queues, and tasks
//! waiting on a limit, for `GET /api/limits`, `/metrics` and the dashboard.
//!
//! Everything but the waiting tasks is read from the broker, through the
//! management API's queue list, by name: the broker is the only shared
//! state of these limits, so their queues are the truth.
//!
//! | queues | what they say |
//! |---|---|
//! | `P.permits.<type>.<k>`, `P.permits.<type>.<hash32>.<k>` | a permit held (exclusive queue; its owner's connection) |
//! | `P.rate.<type>`, `P.rate.<type>.<hash32>` | a rate window: `x-max-length-bytes` = burst, one byte of its markers per token taken (`x-max-length`, one message per token, in a window declared without bytes) |
//! | `P.unique.<hash>` | a unique lock (held while its marker is there) |
//! | `P.q.<name>.tenant.<hash32>`, `P.q.<name>.tenant.overflow` | one tenant's tasks in work queue `<name>`; those of the tenants past `tenants_max` |
//!
//! Each family is one request for one page of at most [`PAGE_SIZE`] queues,
//! filtered by a regular expression on the name (the broker filters), so a
//! broker with millions of queues costs four bounded requests; a family with
//! more is marked in `truncated`. Tasks waiting on a limit are the tracker's
//! own: tasks of a limited type recorded `queued` (published or released,
//! not started; with `tracker.track_published`, the default).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::Value;
use warren_core::config::ConcurrencyLimit;
use warren_core::Config;

use crate::mgmt::MgmtTarget;

/// Queues read per family: one page (the management API's largest).
pub const PAGE_SIZE: usize = 500;

/// Most rows of each list returned (permit groups, rate windows, tenant
/// queues); totals cover everything read.
const MAX_ROWS: usize = 200;

/// Most task types reported.
const MAX_TYPES: usize = 200;

/// Tenants named per tenant-queued work queue (the deepest).
const TOP_TENANTS: usize = 5;

// ---------------------------------------------------------------------------
// The shape of `[flow]` in the configuration: nothing else in this module
// reads `config.flow`.
// ---------------------------------------------------------------------------

/// A rate limit as configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConfiguredRate {
    /// Tasks per period.
    pub limit: u64,
    /// The period, in ms.
    pub per_ms: u64,
    /// Tasks that may start at once after a quiet period.
    pub burst: u64,
    /// The header the key is read from, for a limit per key.
    pub key: Option<String>,
}

/// What the configuration says of one task type's limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Configured {
    /// Global concurrency (per key when `concurrency_key` is set).
    pub concurrency: Option<u32>,
    /// The header a per-key concurrency limit reads its key from.
    pub concurrency_key: Option<String>,
    /// The rate limit.
    pub rate: Option<ConfiguredRate>,
}

/// The limits of the configuration, by task type.
pub fn configured(config: &Config) -> BTreeMap<String, Configured> {
    let mut out: BTreeMap<String, Configured> = BTreeMap::new();
    for (task_type, c) in &config.flow.concurrency {
        let e = out.entry(task_type.clone()).or_default();
        e.concurrency = Some(c.limit());
        if let ConcurrencyLimit::Keyed { key: Some(k), .. } = c {
            e.concurrency_key = Some(key_name(k, warren_core::flow::CONCURRENCY_KEY));
        }
    }
    for (task_type, r) in &config.flow.rate {
        out.entry(task_type.clone()).or_default().rate = Some(ConfiguredRate {
            limit: u64::from(r.limit),
            per_ms: r.per_ms,
            burst: u64::from(r.burst()),
            key: r
                .key
                .as_deref()
                .map(|k| key_name(k, warren_core::flow::RATE_KEY)),
        });
    }
    out
}

/// Where a key comes from, as a reader knows it: the header's name for
/// `"header"`, else the spec (`"arg:<name>"`).
fn key_name(spec: &str, header: &str) -> String {
    if spec == "header" {
        header.to_owned()
    } else {
        spec.to_owned()
    }
}

// --------------------------------------------------------------------------- end of adapter

/// One task type with a limit (configured, or found in the broker).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeView {
    /// The task type.
    #[serde(rename = "type")]
    pub task_type: String,
    /// Its global concurrency limit, if this tracker's configuration has one
    /// (per key when `concurrency_key` is set).
    pub concurrency_limit: Option<u32>,
    /// The header of a per-key concurrency limit.
    pub concurrency_key: Option<String>,
    /// Permits held now, all keys together.
    pub permits_held: u64,
    /// Keys with at least one permit held (per-key limits).
    pub permit_keys: u64,
    /// Its rate limit, if configured.
    pub rate: Option<ConfiguredRate>,
    /// Rate windows found (the type's own, and one per key).
    pub rate_windows: u64,
    /// Tokens left: of the type's window, else the lowest of its keys'.
    pub rate_tokens_left: Option<u64>,
    /// Tasks of the type the tracker has seen queued and not started.
    pub waiting: i64,
}

/// A permit holder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Holder {
    /// `k` of `P.permits.<type>[.<hash>].<k>`.
    pub permit: u32,
    /// The holder's connection, where the management API reports the
    /// queue's owner (`owner_pid_details`; RabbitMQ 3.10's queue list does
    /// not): the name it gave itself, else the broker's; else null.
    pub connection: Option<String>,
}

/// The permits of one type (or one key of it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PermitGroup {
    /// The task type.
    #[serde(rename = "type")]
    pub task_type: String,
    /// The key's hash (32 hex digits), for a per-key limit.
    pub key: Option<String>,
    /// The limit from this tracker's configuration.
    pub limit: Option<u32>,
    /// Permits held.
    pub held: u64,
    /// Each permit held, by number.
    pub permits: Vec<Holder>,
}

/// One rate window (`P.rate.<type>[.<hash>]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateWindow {
    /// The task type.
    #[serde(rename = "type")]
    pub task_type: String,
    /// The key's hash, for a per-key limit.
    pub key: Option<String>,
    /// The queue's `x-max-length-bytes`, else its `x-max-length` (else
    /// the configured burst).
    pub burst: Option<u64>,
    /// Tokens taken within the window: the bytes of its markers (their
    /// number in a window that does not count bytes).
    pub used: u64,
    /// `burst - used`.
    pub tokens_left: Option<u64>,
}

/// Unique locks (`P.unique.<hash>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UniqueView {
    /// Locks whose marker is there.
    pub held: u64,
    /// Lock queues, held or not yet expired.
    pub queues: u64,
}

/// A tenant and its depth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantDepth {
    /// The tenant's hash (32 hex digits), or `overflow`: the queue the
    /// tenants past `tenants_max` share.
    pub tenant: String,
    /// Messages in its queue.
    pub depth: u64,
}

/// The tenant queues of one work queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantQueue {
    /// The work queue's short name.
    pub queue: String,
    /// Tenant queues found.
    pub tenants: u64,
    /// Messages in them all.
    pub depth: u64,
    /// The deepest few.
    pub top: Vec<TenantDepth>,
}

/// The whole view.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LimitsView {
    /// When it was read (RFC 3339).
    pub at: String,
    /// Each limited type.
    pub types: Vec<TypeView>,
    /// Permits held, per type and key.
    pub permits: Vec<PermitGroup>,
    /// Rate windows.
    pub rate: Vec<RateWindow>,
    /// Unique locks.
    pub unique: UniqueView,
    /// Tenant queues per work queue.
    pub tenants: Vec<TenantQueue>,
    /// Families of which more queues exist than were read, or rows cut.
    pub truncated: Vec<String>,
    /// Why the broker's side could not be read (the rest is still given).
    pub error: Option<String>,
}

fn is_hash32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `<type>` or `<type>.<hash32>`: a configured type is taken whole.
fn split_key<'a>(
    rest: &'a str,
    known: &BTreeMap<String, Configured>,
) -> (&'a str, Option<&'a str>) {
    if known.contains_key(rest) {
        return (rest, None);
    }
    match rest.rsplit_once('.') {
        Some((t, h)) if !t.is_empty() && is_hash32(h) => (t, Some(h)),
        _ => (rest, None),
    }
}

fn family<'a>(prefix: &str, name: &'a str, family: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)?
        .strip_prefix('.')?
        .strip_prefix(family)?
        .strip_prefix('.')
        .filter(|r| !r.is_empty())
}

/// `P.permits.<type>[.<hash32>].<k>` → type, key, k.
pub fn parse_permit<'a>(
    prefix: &str,
    name: &'a str,
    known: &BTreeMap<String, Configured>,
) -> Option<(&'a str, Option<&'a str>, u32)> {
    let rest = family(prefix, name, "permits")?;
    let (head, k) = rest.rsplit_once('.')?;
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) || head.is_empty() {
        return None;
    }
    let (t, key) = split_key(head, known);
    Some((t, key, k.parse().ok()?))
}

/// `P.rate.<type>[.<hash32>]` → type, key.
pub fn parse_rate<'a>(
    prefix: &str,
    name: &'a str,
    known: &BTreeMap<String, Configured>,
) -> Option<(&'a str, Option<&'a str>)> {
    Some(split_key(family(prefix, name, "rate")?, known))
}

/// `P.unique.<hash>` (not its `.first`) → hash.
pub fn parse_unique<'a>(prefix: &str, name: &'a str) -> Option<&'a str> {
    family(prefix, name, "unique").filter(|h| !h.contains('.'))
}

/// `P.q.<name>.tenant.<hash32>` (or `.tenant.overflow`) → work queue,
/// tenant.
pub fn parse_tenant<'a>(prefix: &str, name: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = family(prefix, name, "q")?;
    let (queue, tail) = rest.split_once('.')?;
    let tenant = tail.strip_prefix("tenant.")?;
    (is_hash32(tenant) || tenant == "overflow").then_some((queue, tenant))
}

/// A regular expression matching `s` literally.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if !c.is_ascii_alphanumeric() && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One page of queues read from the management API.
#[derive(Debug, Default, Clone)]
pub struct QueuePage {
    /// The queues (name, messages, arguments, owner as asked).
    pub items: Vec<Value>,
    /// How many matched in all.
    pub matched: u64,
}

impl QueuePage {
    fn truncated(&self) -> bool {
        self.matched > self.items.len() as u64
    }
}

/// What the broker holds, as read.
#[derive(Debug, Default, Clone)]
pub struct BrokerState {
    /// `P.permits.…`, by name.
    pub permits: QueuePage,
    /// `P.rate.…`, by name.
    pub rate: QueuePage,
    /// `P.unique.<hash>`, fullest first.
    pub unique: QueuePage,
    /// `P.q.<name>.tenant.<hash>`, deepest first.
    pub tenants: QueuePage,
    /// Broker connection name → the name the connection gave itself.
    pub connections: HashMap<String, String>,
}

async fn page(
    http: &reqwest::Client,
    target: &MgmtTarget,
    regex: &str,
    columns: &str,
    by_messages: bool,
) -> Result<QueuePage, String> {
    let mut url = target.queues_url.clone();
    {
        let size = PAGE_SIZE.to_string();
        let mut q = url.query_pairs_mut();
        q.append_pair("page", "1")
            .append_pair("page_size", &size)
            .append_pair("name", regex)
            .append_pair("use_regex", "true")
            .append_pair("columns", columns);
        if by_messages {
            q.append_pair("sort", "messages")
                .append_pair("sort_reverse", "true");
        } else {
            q.append_pair("sort", "name");
        }
    }
    let body = target.get(http, url).await?;
    let items = body["items"].as_array().cloned().unwrap_or_default();
    let matched = body["filtered_count"]
        .as_u64()
        .unwrap_or(items.len() as u64);
    Ok(QueuePage { items, matched })
}

/// Reads the four families (and, when permits are held, the connections).
pub async fn read_broker(http: &reqwest::Client, config: &Config) -> Result<BrokerState, String> {
    let target = MgmtTarget::from_config(config)?;
    let p = regex_escape(config.prefix.as_str());
    let permits_re = format!("^{p}\\.permits\\.");
    let rate_re = format!("^{p}\\.rate\\.");
    let unique_re = format!("^{p}\\.unique\\.[0-9a-fA-F]+$");
    let tenants_re = format!("^{p}\\.q\\.[^.]+\\.tenant\\.([0-9a-fA-F]{{32}}|overflow)$");
    let (permits, rate, unique, tenants) = tokio::try_join!(
        page(http, &target, &permits_re, "name,owner_pid_details", false),
        page(
            http,
            &target,
            &rate_re,
            "name,messages,message_bytes,arguments",
            false
        ),
        page(http, &target, &unique_re, "name,messages", true),
        page(http, &target, &tenants_re, "name,messages", true),
    )?;
    let connections = if permits.items.is_empty() {
        HashMap::new()
    } else {
        crate::mgmt::connection_names(http, &target).await
    };
    Ok(BrokerState {
        permits,
        rate,
        unique,
        tenants,
        connections,
    })
}

fn messages(q: &Value) -> u64 {
    q["messages"].as_u64().unwrap_or(0)
}

/// The view of what the broker holds (waiting counts left at 0: see
/// [`LimitsView::limited_types`]).
pub fn assemble(
    prefix: &str,
    known: &BTreeMap<String, Configured>,
    broker: &BrokerState,
) -> LimitsView {
    let mut truncated = Vec::new();
    for (name, p) in [
        ("permits", &broker.permits),
        ("rate", &broker.rate),
        ("unique", &broker.unique),
        ("tenants", &broker.tenants),
    ] {
        if p.truncated() {
            truncated.push(name.to_owned());
        }
    }

    // Permits, grouped by type and key.
    let mut groups: BTreeMap<(String, Option<String>), Vec<Holder>> = BTreeMap::new();
    for q in &broker.permits.items {
        let Some(name) = q["name"].as_str() else {
            continue;
        };
        let Some((t, key, k)) = parse_permit(prefix, name, known) else {
            continue;
        };
        let conn = q["owner_pid_details"]["name"].as_str();
        let connection = conn.map(|c| {
            broker
                .connections
                .get(c)
                .cloned()
                .unwrap_or_else(|| c.to_owned())
        });
        groups
            .entry((t.to_owned(), key.map(str::to_owned)))
            .or_default()
            .push(Holder {
                permit: k,
                connection,
            });
    }
    let mut permits: Vec<PermitGroup> = groups
        .into_iter()
        .map(|((t, key), mut holders)| {
            holders.sort_by_key(|h| h.permit);
            PermitGroup {
                limit: known.get(&t).and_then(|c| c.concurrency),
                held: holders.len() as u64,
                task_type: t,
                key,
                permits: holders,
            }
        })
        .collect();

    // Rate windows.
    let mut rate: Vec<RateWindow> = broker
        .rate
        .items
        .iter()
        .filter_map(|q| {
            let (t, key) = parse_rate(prefix, q["name"].as_str()?, known)?;
            let args = &q["arguments"];
            let by_bytes = args["x-max-length-bytes"].as_u64();
            let burst = by_bytes
                .or_else(|| args["x-max-length"].as_u64())
                .or_else(|| known.get(t).and_then(|c| c.rate.as_ref()).map(|r| r.burst));
            let used = match by_bytes {
                Some(_) => q["message_bytes"].as_u64().unwrap_or(0),
                None => messages(q),
            };
            Some(RateWindow {
                task_type: t.to_owned(),
                key: key.map(str::to_owned),
                burst,
                used,
                tokens_left: burst.map(|b| b.saturating_sub(used)),
            })
        })
        .collect();
    rate.sort_by(|a, b| (&a.task_type, &a.key).cmp(&(&b.task_type, &b.key)));

    // Unique locks.
    let locks: Vec<&Value> = broker
        .unique
        .items
        .iter()
        .filter(|q| {
            q["name"]
                .as_str()
                .is_some_and(|n| parse_unique(prefix, n).is_some())
        })
        .collect();
    let unique = UniqueView {
        held: locks.iter().filter(|q| messages(q) > 0).count() as u64,
        queues: broker.unique.matched.max(locks.len() as u64),
    };

    // Tenant queues, deepest first as read.
    let mut per_queue: BTreeMap<String, TenantQueue> = BTreeMap::new();
    for q in &broker.tenants.items {
        let Some((queue, tenant)) = q["name"].as_str().and_then(|n| parse_tenant(prefix, n)) else {
            continue;
        };
        let depth = messages(q);
        let e = per_queue
            .entry(queue.to_owned())
            .or_insert_with(|| TenantQueue {
                queue: queue.to_owned(),
                tenants: 0,
                depth: 0,
                top: Vec::new(),
            });
        e.tenants += 1;
        e.depth += depth;
        e.top.push(TenantDepth {
            tenant: tenant.to_owned(),
            depth,
        });
    }
    let mut tenants: Vec<TenantQueue> = per_queue.into_values().collect();
    for t in &mut tenants {
        t.top
            .sort_by(|a, b| b.depth.cmp(&a.depth).then(a.tenant.cmp(&b.tenant)));
        t.top.truncate(TOP_TENANTS);
    }

    // Per type.
    let mut names: BTreeSet<String> = known
        .iter()
        .filter(|(_, c)| c.concurrency.is_some() || c.rate.is_some())
        .map(|(t, _)| t.clone())
        .collect();
    names.extend(permits.iter().map(|p| p.task_type.clone()));
    names.extend(rate.iter().map(|r| r.task_type.clone()));
    if names.len() > MAX_TYPES {
        truncated.push("types".to_owned());
    }
    let types = names
        .into_iter()
        .take(MAX_TYPES)
        .map(|t| {
            let c = known.get(&t).cloned().unwrap_or_default();
            let mine: Vec<&PermitGroup> = permits.iter().filter(|p| p.task_type == t).collect();
            let windows: Vec<&RateWindow> = rate.iter().filter(|r| r.task_type == t).collect();
            let own = windows.iter().find(|w| w.key.is_none());
            let rate_tokens_left = match own {
                Some(w) => w.tokens_left,
                None => windows.iter().filter_map(|w| w.tokens_left).min(),
            };
            TypeView {
                concurrency_limit: c.concurrency,
                concurrency_key: c.concurrency_key,
                permits_held: mine.iter().map(|p| p.held).sum(),
                permit_keys: mine.iter().filter(|p| p.key.is_some()).count() as u64,
                rate: c.rate,
                rate_windows: windows.len() as u64,
                rate_tokens_left,
                waiting: 0,
                task_type: t,
            }
        })
        .collect();

    for (name, len) in [
        ("permits", permits.len()),
        ("rate", rate.len()),
        ("tenants", tenants.len()),
    ] {
        if len > MAX_ROWS && !truncated.iter().any(|t| t == name) {
            truncated.push(name.to_owned());
        }
    }
    permits.truncate(MAX_ROWS);
    rate.truncate(MAX_ROWS);
    tenants.truncate(MAX_ROWS);
    LimitsView {
        at: String::new(),
        types,
        permits,
        rate,
        unique,
        tenants,
        truncated,
        error: None,
    }
}

impl LimitsView {
    /// The types whose waiting tasks are counted.
    pub fn limited_types(&self) -> Vec<String> {
        self.types.iter().map(|t| t.task_type.clone()).collect()
    }

    /// Sets the waiting counts (types not in `waiting` wait for none).
    pub fn set_waiting(&mut self, waiting: &BTreeMap<String, i64>) {
        for t in &mut self.types {
            t.waiting = waiting.get(&t.task_type).copied().unwrap_or(0);
        }
    }

    /// The gauges for `/metrics`, labelled by task type or work queue only
    /// (never a key or a tenant). While the broker's side could not be read,
    /// only the configured limits and the waiting tasks are given (no
    /// made-up zeros).
    pub fn render_metrics(&self) -> String {
        let mut e = warren_ops::Exposition::new();
        let read = self.error.is_none();
        let per_type = |e: &mut warren_ops::Exposition,
                        name: &str,
                        help: &str,
                        value: &dyn Fn(&TypeView) -> Option<f64>| {
            e.family(name, "gauge", help);
            for t in &self.types {
                if let Some(v) = value(t) {
                    e.sample(name, &[("type", &t.task_type)], v);
                }
            }
        };
        per_type(
            &mut e,
            "warren_flow_concurrency_limit",
            "Global concurrency limit per task type (per key for a per-key limit), from the tracker's configuration.",
            &|t| t.concurrency_limit.map(f64::from),
        );
        per_type(
            &mut e,
            "warren_flow_permits_held",
            "Global concurrency permits held across the fleet (P.permits queues), per task type, all keys together.",
            &|t| read.then_some(t.permits_held as f64),
        );
        per_type(
            &mut e,
            "warren_flow_rate_tokens_left",
            "Rate tokens left (burst - tokens taken in the window) of the type's window, else the lowest of its keys'.",
            &|t| t.rate_tokens_left.filter(|_| read).map(|v| v as f64),
        );
        per_type(
            &mut e,
            "warren_flow_tasks_waiting",
            "Tasks of a limited type the tracker has seen queued and not started.",
            &|t| Some(t.waiting as f64),
        );
        if !read {
            return e.finish();
        }
        e.single(
            "warren_flow_unique_locks_held",
            "gauge",
            "Unique-task locks whose marker is in the broker (P.unique queues).",
            self.unique.held as f64,
        );
        e.family(
            "warren_tenant_queue_depth",
            "gauge",
            "Messages in the tenant queues of a work queue, all tenants together.",
        );
        for t in &self.tenants {
            e.sample(
                "warren_tenant_queue_depth",
                &[("queue", &t.queue)],
                t.depth as f64,
            );
        }
        e.family(
            "warren_tenant_queues",
            "gauge",
            "Tenant queues of a work queue (tenants with a queue).",
        );
        for t in &self.tenants {
            e.sample(
                "warren_tenant_queues",
                &[("queue", &t.queue)],
                t.tenants as f64,
            );
        }
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const H1: &str = "0123456789abcdef0123456789abcdef";
    const H2: &str = "fedcba9876543210fedcba9876543210";

    fn known() -> BTreeMap<String, Configured> {
        let mut k = BTreeMap::new();
        k.insert(
            "http.request".to_owned(),
            Configured {
                concurrency: Some(3),
                ..Configured::default()
            },
        );
        k
    }

    #[test]
    fn names_are_parsed_by_family() {
        let k = known();
        assert_eq!(
            parse_permit("w", "w.permits.http.request.2", &k),
            Some(("http.request", None, 2))
        );
        assert_eq!(
            parse_permit("w", &format!("w.permits.api.call.{H1}.0"), &k),
            Some(("api.call", Some(H1), 0))
        );
        assert_eq!(parse_permit("w", "w.permits.x.+1", &k), None);
        assert_eq!(parse_permit("w", "w.permits.7", &k), None);
        assert_eq!(parse_permit("w", "v.permits.a.1", &k), None);
        assert_eq!(
            parse_rate("w", "w.rate.api.call", &k),
            Some(("api.call", None))
        );
        assert_eq!(
            parse_rate("w", &format!("w.rate.api.call.{H2}"), &k),
            Some(("api.call", Some(H2)))
        );
        assert_eq!(parse_unique("w", &format!("w.unique.{H1}")), Some(H1));
        assert_eq!(parse_unique("w", &format!("w.unique.{H1}.first")), None);
        assert_eq!(
            parse_tenant("w", &format!("w.q.io.tenant.{H1}")),
            Some(("io", H1))
        );
        assert_eq!(
            parse_tenant("w", "w.q.io.tenant.overflow"),
            Some(("io", "overflow"))
        );
        assert_eq!(parse_tenant("w", "w.q.io.tenant.other"), None);
        assert_eq!(parse_tenant("w", "w.q.io.tenants"), None);
        assert_eq!(parse_tenant("w", "w.q.io.lane.2"), None);
        assert_eq!(regex_escape("wt.a-b_c"), "wt\\.a\\-b_c");
    }

    fn page(items: Vec<Value>) -> QueuePage {
        QueuePage {
            matched: items.len() as u64,
            items,
        }
    }

    #[test]
    fn assembles_every_family_and_renders_bounded_gauges() {
        let mut broker = BrokerState {
            permits: page(vec![
                json!({"name": "w.permits.http.request.1", "owner_pid_details": {"name": "a -> b"}}),
                json!({"name": "w.permits.http.request.0", "owner_pid_details": {"name": "c -> d"}}),
                json!({"name": format!("w.permits.api.call.{H1}.0")}),
            ]),
            rate: page(vec![
                json!({"name": "w.rate.api.call", "messages": 2, "arguments": {"x-max-length": 5}}),
                json!({"name": format!("w.rate.api.call.{H1}"), "messages": 3, "arguments": {"x-max-length": 3}}),
                // Counting bytes: 1 marker of 2 tokens, burst 5.
                json!({"name": format!("w.rate.mail.{H2}"), "messages": 1, "message_bytes": 2,
                       "arguments": {"x-max-length": 5, "x-max-length-bytes": 5}}),
            ]),
            unique: page(vec![
                json!({"name": format!("w.unique.{H1}"), "messages": 1}),
                json!({"name": format!("w.unique.{H2}"), "messages": 0}),
            ]),
            tenants: page(vec![
                json!({"name": format!("w.q.io.tenant.{H1}"), "messages": 100}),
                json!({"name": format!("w.q.io.tenant.{H2}"), "messages": 7}),
                json!({"name": "w.q.io.tenant.overflow", "messages": 5}),
            ]),
            connections: HashMap::new(),
        };
        broker.tenants.matched = 9;
        broker
            .connections
            .insert("a -> b".to_owned(), "warren worker h/1".to_owned());
        let mut v = assemble("w", &known(), &broker);
        let mut waiting = BTreeMap::new();
        waiting.insert("http.request".to_owned(), 4);
        v.set_waiting(&waiting);
        assert_eq!(v.truncated, vec!["tenants".to_owned()]);
        let http = v
            .types
            .iter()
            .find(|t| t.task_type == "http.request")
            .unwrap();
        assert_eq!(
            (http.concurrency_limit, http.permits_held, http.waiting),
            (Some(3), 2, 4)
        );
        let g = v
            .permits
            .iter()
            .find(|p| p.task_type == "http.request")
            .unwrap();
        assert_eq!(
            g.permits,
            vec![
                Holder {
                    permit: 0,
                    connection: Some("c -> d".to_owned())
                },
                Holder {
                    permit: 1,
                    connection: Some("warren worker h/1".to_owned())
                },
            ]
        );
        let api = v.types.iter().find(|t| t.task_type == "api.call").unwrap();
        assert_eq!(
            (
                api.permits_held,
                api.permit_keys,
                api.rate_windows,
                api.rate_tokens_left
            ),
            (1, 1, 2, Some(3))
        );
        let mail = v.types.iter().find(|t| t.task_type == "mail").unwrap();
        assert_eq!(mail.rate_tokens_left, Some(3));
        let keyed = v
            .rate
            .iter()
            .find(|r| r.key.as_deref() == Some(H1))
            .unwrap();
        assert_eq!(
            (keyed.burst, keyed.used, keyed.tokens_left),
            (Some(3), 3, Some(0))
        );
        assert_eq!(v.unique, UniqueView { held: 1, queues: 2 });
        assert_eq!(v.tenants.len(), 1);
        assert_eq!((v.tenants[0].tenants, v.tenants[0].depth), (3, 112));
        assert_eq!(v.tenants[0].top[0].tenant, H1);

        let text = v.render_metrics();
        assert!(
            text.contains("warren_flow_permits_held{type=\"http.request\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("warren_flow_concurrency_limit{type=\"http.request\"} 3\n"));
        assert!(text.contains("warren_flow_tasks_waiting{type=\"http.request\"} 4\n"));
        assert!(text.contains("warren_flow_rate_tokens_left{type=\"api.call\"} 3\n"));
        assert!(text.contains("warren_flow_unique_locks_held 1\n"));
        assert!(text.contains("warren_tenant_queue_depth{queue=\"io\"} 112\n"));
        assert!(text.contains("warren_tenant_queues{queue=\"io\"} 3\n"));
        assert!(
            !text.contains(H1) && !text.contains(H2),
            "no key in a label"
        );
    }
}
