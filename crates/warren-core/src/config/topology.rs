//! `[topology]`: how Warren declares its durable queues.

use serde::Deserialize;

use super::{Config, Issues, QueueKind};

/// How Warren declares the durable queues it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyConfig {
    /// Whether every durable queue Warren owns is a quorum queue, replicated
    /// across a RabbitMQ cluster: work queues, delay intake and tiers,
    /// dead-letter intake, `P.dead`, `P.unroutable`, cron state, tracker
    /// events. False (the default) keeps them classic, work queues as their
    /// `type` says.
    pub replicated: bool,
}

impl Config {
    /// The RabbitMQ type a work queue is declared with: quorum for every
    /// queue when `topology.replicated` is set, else its `type`.
    pub fn queue_kind(&self, q: &super::QueueConfig) -> QueueKind {
        if self.topology.replicated {
            QueueKind::Quorum
        } else {
            q.kind.unwrap_or_default()
        }
    }

    pub(super) fn check_topology(&self, issues: &mut Issues) {
        if !self.topology.replicated {
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.kind == Some(QueueKind::Classic) {
                issues.add(
                    format!("queues[{i}].type"),
                    "\"classic\", but topology.replicated = true makes every queue a quorum \
                     queue: remove the key (or set it to \"quorum\"), or set \
                     topology.replicated = false",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn replicated_makes_every_work_queue_quorum() {
        let c = Config::from_toml("[topology]\nreplicated = true\n").unwrap();
        assert!(c.topology.replicated);
        assert!(c
            .queues
            .iter()
            .all(|q| c.queue_kind(q) == QueueKind::Quorum));
        let c = Config::from_toml("").unwrap();
        assert!(!c.topology.replicated);
        assert!(c
            .queues
            .iter()
            .all(|q| c.queue_kind(q) == QueueKind::Classic));
    }

    #[test]
    fn replicated_refuses_a_classic_queue() {
        one_issue(
            "[topology]\nreplicated = true\n[[queues]]\nname = \"a\"\ntype = \"classic\"\n\
             [[routes]]\npattern = \"#\"\nqueue = \"a\"\n",
            "config key queues[0].type: \"classic\", but topology.replicated = true makes every \
             queue a quorum queue: remove the key (or set it to \"quorum\"), or set \
             topology.replicated = false",
        );
        let c = Config::from_toml(
            "[topology]\nreplicated = true\n[[queues]]\nname = \"a\"\ntype = \"quorum\"\n\
             [[routes]]\npattern = \"#\"\nqueue = \"a\"\n",
        )
        .unwrap();
        assert_eq!(c.queue_kind(&c.queues[0]), QueueKind::Quorum);
    }

    #[test]
    fn replicated_reads_from_the_environment() {
        let c = Config::load_from(None, &env(&[("WARREN__TOPOLOGY__REPLICATED", "true")])).unwrap();
        assert!(c.topology.replicated);
    }
}
