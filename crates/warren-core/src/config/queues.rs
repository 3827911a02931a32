//! `[[queues]]` and `[[routes]]`: the work queues and the routes to them.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use super::{is_short_name, Config, Issues};
use crate::lanes::{Bands, DEFAULT_LANES, MAX_LANES};
use crate::routes;

/// AMQP limits queue and exchange names to 255 bytes.
const MAX_NAME_BYTES: usize = 255;

/// One work queue, declared as `P.q.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Short name (`io`): lowercase letters, digits, `_` and `-`; unique.
    #[serde(default)]
    pub name: String,
    /// Highest priority the queue honours (`x-max-priority`), 1..=255.
    /// Quorum queues ignore it on RabbitMQ before 4.0 and know only two
    /// levels from 4.0 on; Warren declares no priority for them.
    #[serde(
        default = "default_max_priority",
        deserialize_with = "deserialize_priority"
    )]
    pub max_priority: u8,
    /// Classic (the default) or quorum (replicated) queue, as written;
    /// [`Config::queue_kind`] is the type declared (`topology.replicated`
    /// makes every queue quorum).
    #[serde(rename = "type", default)]
    pub kind: Option<QueueKind>,
    /// Priority lanes of a quorum queue (see [`crate::lanes`]): unset means
    /// [`crate::lanes::DEFAULT_LANES`], 1 means none (no priorities).
    /// Classic queues sort by broker priority and ignore it.
    #[serde(default, deserialize_with = "deserialize_lanes")]
    pub lanes: Option<u8>,
    /// Whether task types that no route matches go to this queue.
    #[serde(default)]
    pub default: bool,
    /// Tenant fairness (see [`crate::tenants`]): tasks carrying
    /// `x-warren-tenant` are moved to a queue per tenant and served
    /// round-robin across tenants.
    #[serde(default)]
    pub tenants: bool,
    /// The most tenant queues the queue gets (1..=100000); tenants past it
    /// share the overflow queue.
    #[serde(default = "default_tenants_max")]
    pub tenants_max: u32,
}

fn default_tenants_max() -> u32 {
    crate::tenants::DEFAULT_TENANTS_MAX
}

fn default_max_priority() -> u8 {
    10
}

/// Reads a priority as any integer so an out-of-range value gets a message
/// that says the range, not only "expected u8".
fn deserialize_priority<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let value = i64::deserialize(d)?;
    u8::try_from(value).map_err(|_| {
        serde::de::Error::custom(format!(
            "{value} is out of range: must be 1..=255 (RabbitMQ limit)"
        ))
    })
}

/// Reads a lane count as any integer, so a wrong one gets the range.
fn deserialize_lanes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let value = i64::deserialize(d)?;
    match u8::try_from(value) {
        Ok(n) if (1..=MAX_LANES).contains(&n) => Ok(Some(n)),
        _ => Err(serde::de::Error::custom(format!(
            "{value} is out of range: must be 1..={MAX_LANES} (1 = no lanes)"
        ))),
    }
}

impl QueueConfig {
    /// The priority bands of the queue declared as `kind`, when it sorts by
    /// lanes: a quorum queue with more than one lane (and a priority range
    /// to split). `None` for a classic queue (the broker sorts) or a single
    /// lane. [`Config::queue_bands`] passes the type declared.
    pub fn bands_as(&self, kind: QueueKind) -> Option<Bands> {
        if kind != QueueKind::Quorum {
            return None;
        }
        let lanes = self
            .lanes
            .unwrap_or(DEFAULT_LANES)
            .min(self.max_priority.saturating_add(1));
        (lanes > 1).then(|| Bands::new(lanes, self.max_priority))
    }
}

/// The RabbitMQ queue type of a work queue, written `"classic"` or `"quorum"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// A classic queue, with message priorities.
    #[default]
    Classic,
    /// A quorum queue: replicated across the cluster; no priorities before
    /// RabbitMQ 4.0.
    Quorum,
}

impl<'de> Deserialize<'de> for QueueKind {
    /// Read by hand so an unknown type gets a message that lists the choices.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        match word.as_str() {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            _ => Err(serde::de::Error::custom(format!(
                "{word:?} is not a queue type: use \"classic\" or \"quorum\""
            ))),
        }
    }
}

impl QueueKind {
    /// The value as written in the configuration (`classic`, `quorum`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// A topic binding from task types to one queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Topic pattern matched against the task type (`*` one word, `#` any).
    #[serde(default)]
    pub pattern: String,
    /// Short name of the `[[queues]]` entry the matching tasks go to.
    #[serde(default)]
    pub queue: String,
}

/// The longest queue name a `[[queues]]` entry declares: its last lane, or
/// the work queue itself.
fn longest_name(c: &Config, names: &crate::Names, q: &QueueConfig) -> String {
    if q.tenants {
        return crate::tenants::longest_tenant_queue(names, &q.name);
    }
    match c.queue_bands(q) {
        Some(b) => names.lane_queue(&q.name, b.lanes() - 1),
        None => names.work_queue(&q.name),
    }
}

impl Config {
    /// The priority lanes of a work queue, as declared and consumed: `None`
    /// when the queue has none (see [`QueueConfig::bands_as`]). Everything
    /// that declares, consumes or permits lanes asks here.
    pub fn queue_bands(&self, q: &QueueConfig) -> Option<Bands> {
        q.bands_as(self.queue_kind(q))
    }

    pub(super) fn queue_names_hint(&self) -> String {
        if self.queues.is_empty() {
            return "no queues are configured".into();
        }
        let names: Vec<String> = self
            .queues
            .iter()
            .map(|q| format!("{:?}", q.name))
            .collect();
        format!("configured queues are {}", names.join(", "))
    }

    pub(super) fn check_queues(&self, issues: &mut Issues) {
        if self.queues.is_empty() {
            issues.add(
                "queues",
                "no queues are configured: add at least one [[queues]] entry",
            );
        }
        let names = self.names();
        let mut first_with_name: BTreeMap<&str, usize> = BTreeMap::new();
        let mut first_default: Option<usize> = None;
        for (i, q) in self.queues.iter().enumerate() {
            let key = format!("queues[{i}].name");
            if q.name.is_empty() {
                issues.add(
                    &key,
                    "is missing or empty: name the queue with lowercase letters, digits, '_' or '-'",
                );
            } else if !is_short_name(&q.name) {
                issues.add(
                    &key,
                    format!(
                        "{:?} is not a valid queue name: use lowercase letters, digits, '_' and '-' only",
                        q.name
                    ),
                );
            } else if longest_name(self, &names, q).len() > MAX_NAME_BYTES {
                issues.add(
                    &key,
                    format!(
                        "{:?} makes the queue name {} bytes long: AMQP allows {MAX_NAME_BYTES}; shorten it",
                        q.name,
                        longest_name(self, &names, q).len()
                    ),
                );
            } else if let Some(&first) = first_with_name.get(q.name.as_str()) {
                issues.add(
                    &key,
                    format!(
                        "{:?} is also the name of queues[{first}]: queue names must be unique; \
                         rename or remove one",
                        q.name
                    ),
                );
            } else {
                first_with_name.insert(&q.name, i);
            }
            let priority_ok = issues.above_zero(
                format!("queues[{i}].max_priority"),
                q.max_priority,
                "0 is out of range: must be 1..=255 (RabbitMQ limit)",
            );
            match q.lanes {
                Some(lanes) if priority_ok && u16::from(lanes) > u16::from(q.max_priority) + 1 => {
                    issues.add(
                        format!("queues[{i}].lanes"),
                        format!(
                            "{lanes} lanes for priorities 0..={} leaves a lane without a \
                             priority: use at most {} lanes or raise max_priority",
                            q.max_priority,
                            u16::from(q.max_priority) + 1
                        ),
                    )
                }
                _ => {}
            }
            if q.tenants_max == 0 || q.tenants_max > crate::tenants::MAX_TENANTS_MAX {
                issues.add(
                    format!("queues[{i}].tenants_max"),
                    format!(
                        "{} is out of range: must be 1..={}",
                        q.tenants_max,
                        crate::tenants::MAX_TENANTS_MAX
                    ),
                );
            }
            if q.default {
                match first_default {
                    Some(first) => issues.add(
                        format!("queues[{i}].default"),
                        format!(
                            "true, but queues[{first}] ({:?}) is already the default: \
                             mark at most one queue default = true",
                            self.queues[first].name
                        ),
                    ),
                    None => first_default = Some(i),
                }
            }
        }
    }

    pub(super) fn check_routes(&self, issues: &mut Issues) {
        let mut valid: Vec<usize> = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            match routes::is_valid_pattern(&r.pattern) {
                Ok(()) => valid.push(i),
                Err(why) => issues.add(
                    format!("routes[{i}].pattern"),
                    format!("{:?} is not a valid topic pattern: {why}", r.pattern),
                ),
            }
            if self.queue(&r.queue).is_none() {
                issues.add(
                    format!("routes[{i}].queue"),
                    format!(
                        "{:?} is not a configured queue: {}; use one of them or add a \
                         [[queues]] entry with that name",
                        r.queue,
                        self.queue_names_hint()
                    ),
                );
            }
        }
        for (n, &j) in valid.iter().enumerate() {
            for &i in &valid[..n] {
                let (a, b) = (&self.routes[i], &self.routes[j]);
                if let Some(example) = routes::overlap_example(&a.pattern, &b.pattern) {
                    let consequence = if a.queue == b.queue {
                        "every task type must have exactly one route: merge them or make the \
                         patterns disjoint"
                    } else {
                        "a task would run twice: make the patterns disjoint"
                    };
                    issues.add(
                        format!("routes[{j}].pattern"),
                        format!(
                            "{:?} overlaps routes[{i}].pattern = {:?} (both match task type \
                             {example:?}); {consequence}",
                            b.pattern, a.pattern
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use crate::routes;

    #[test]
    fn every_built_in_type_is_routed_once() {
        let c = Config::from_toml("").unwrap();
        for t in [
            "diag.echo",
            "diag.sleep",
            "diag.fail",
            "http.request",
            "file.download",
            "file.upload",
        ] {
            let hits: Vec<&str> = c
                .routes
                .iter()
                .filter(|r| routes::matches(&r.pattern, t))
                .map(|r| r.queue.as_str())
                .collect();
            assert_eq!(hits.len(), 1, "{t}: {hits:?}");
        }
    }

    const ONE_QUEUE_ROUTE: &str = "[[routes]]\npattern = \"#\"\nqueue = \"a\"\n";

    #[test]
    fn queue_name_rules() {
        one_issue(
            &format!("[[queues]]\nname = \"a\"\n[[queues]]\nname = \"\"\n{ONE_QUEUE_ROUTE}"),
            "config key queues[1].name: is missing or empty: name the queue with lowercase \
             letters, digits, '_' or '-'",
        );
        one_issue(
            &format!("[[queues]]\nname = \"a\"\n[[queues]]\nname = \"IO\"\n{ONE_QUEUE_ROUTE}"),
            "config key queues[1].name: \"IO\" is not a valid queue name: use lowercase \
             letters, digits, '_' and '-' only",
        );
        one_issue(
            &format!("[[queues]]\nname = \"a\"\n[[queues]]\nname = \"a\"\n{ONE_QUEUE_ROUTE}"),
            "config key queues[1].name: \"a\" is also the name of queues[0]: queue names must \
             be unique; rename or remove one",
        );
        let long = "a".repeat(250);
        one_issue(
            &format!("[[queues]]\nname = \"a\"\n[[queues]]\nname = \"{long}\"\n{ONE_QUEUE_ROUTE}"),
            &format!(
                "config key queues[1].name: \"{long}\" makes the queue name 259 bytes long: \
                 AMQP allows 255; shorten it"
            ),
        );
        one_issue(
            "queues = []\nroutes = []",
            "config key queues: no queues are configured: add at least one [[queues]] entry",
        );
    }

    #[test]
    fn queue_priority_and_default_rules() {
        one_issue(
            &format!("[[queues]]\nname = \"a\"\nmax_priority = 0\n{ONE_QUEUE_ROUTE}"),
            "config key queues[0].max_priority: 0 is out of range: must be 1..=255 (RabbitMQ \
             limit)",
        );
        one_issue(
            &format!(
                "[[queues]]\nname = \"a\"\ndefault = true\n\
                 [[queues]]\nname = \"b\"\ndefault = true\n{ONE_QUEUE_ROUTE}"
            ),
            "config key queues[1].default: true, but queues[0] (\"a\") is already the \
             default: mark at most one queue default = true",
        );
        // A quorum queue with a priority other than the default is accepted.
        let c = Config::from_toml(&format!(
            "[[queues]]\nname = \"a\"\ntype = \"quorum\"\nmax_priority = 3\n{ONE_QUEUE_ROUTE}"
        ))
        .unwrap();
        assert_eq!(c.queues[0].kind, Some(QueueKind::Quorum));
        assert_eq!(c.queues[0].max_priority, 3);
    }

    #[test]
    fn tenant_rules() {
        let c = Config::from_toml(&format!(
            "[[queues]]\nname = \"a\"\ntenants = true\n{ONE_QUEUE_ROUTE}"
        ))
        .unwrap();
        assert!(c.queues[0].tenants);
        assert_eq!(c.queues[0].tenants_max, 1000);
        let c = Config::from_toml(&format!("[[queues]]\nname = \"a\"\n{ONE_QUEUE_ROUTE}")).unwrap();
        assert!(!c.queues[0].tenants, "off unless asked for");
        one_issue(
            &format!(
                "[[queues]]\nname = \"a\"\ntenants = true\ntenants_max = 0\n{ONE_QUEUE_ROUTE}"
            ),
            "config key queues[0].tenants_max: 0 is out of range: must be 1..=100000",
        );
    }

    #[test]
    fn lane_rules() {
        let err = Config::from_toml(&format!(
            "[[queues]]\nname = \"a\"\ntype = \"quorum\"\nlanes = 0\n{ONE_QUEUE_ROUTE}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "config key queues[0].lanes: 0 is out of range: must be 1..=10 (1 = no lanes)"
            ),
            "{err}"
        );
        one_issue(
            &format!(
                "[[queues]]\nname = \"a\"\ntype = \"quorum\"\nmax_priority = 2\nlanes = 4\n\
                 {ONE_QUEUE_ROUTE}"
            ),
            "config key queues[0].lanes: 4 lanes for priorities 0..=2 leaves a lane without a \
             priority: use at most 3 lanes or raise max_priority",
        );
        let c = Config::from_toml(&format!(
            "[[queues]]\nname = \"a\"\ntype = \"quorum\"\n\
             [[queues]]\nname = \"b\"\ntype = \"quorum\"\nlanes = 1\n\
             [[queues]]\nname = \"c\"\nlanes = 5\n{ONE_QUEUE_ROUTE}"
        ))
        .unwrap();
        assert_eq!(c.queue_bands(&c.queues[0]).map(|b| b.lanes()), Some(3));
        assert_eq!(c.queue_bands(&c.queues[1]), None, "one lane: no lanes");
        assert_eq!(
            c.queue_bands(&c.queues[2]),
            None,
            "classic queues sort by broker priority"
        );
        let long = "a".repeat(245);
        one_issue(
            &format!(
                "[[queues]]\nname = \"a\"\n[[queues]]\nname = \"{long}\"\ntype = \"quorum\"\n\
                 {ONE_QUEUE_ROUTE}"
            ),
            &format!(
                "config key queues[1].name: \"{long}\" makes the queue name 261 bytes long: \
                 AMQP allows 255; shorten it"
            ),
        );
    }

    #[test]
    fn route_rules() {
        one_issue(
            "[[routes]]\npattern = \"diag..x\"\nqueue = \"diag\"",
            "config key routes[0].pattern: \"diag..x\" is not a valid topic pattern: word 2 is \
             empty: words are separated by single dots, with none at either end",
        );
        one_issue(
            "[[routes]]\npattern = \"diag.*\"\nqueue = \"nope\"",
            "config key routes[0].queue: \"nope\" is not a configured queue: configured queues \
             are \"io\", \"cpu\", \"diag\"; use one of them or add a [[queues]] entry with that \
             name",
        );
    }

    #[test]
    fn overlapping_routes_are_rejected_with_an_example() {
        one_issue(
            "[[routes]]\npattern = \"diag.echo\"\nqueue = \"diag\"\n\
             [[routes]]\npattern = \"http.*\"\nqueue = \"io\"\n\
             [[routes]]\npattern = \"diag.#\"\nqueue = \"cpu\"\n",
            "config key routes[2].pattern: \"diag.#\" overlaps routes[0].pattern = \
             \"diag.echo\" (both match task type \"diag.echo\"); a task would run twice: make \
             the patterns disjoint",
        );
        one_issue(
            "[[routes]]\npattern = \"a.*\"\nqueue = \"io\"\n\
             [[routes]]\npattern = \"*.b\"\nqueue = \"io\"\n",
            "config key routes[1].pattern: \"*.b\" overlaps routes[0].pattern = \"a.*\" (both \
             match task type \"a.b\"); every task type must have exactly one route: merge them \
             or make the patterns disjoint",
        );
    }
}
