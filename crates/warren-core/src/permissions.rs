//! Least-privilege broker permissions per role: the `configure`, `write` and
//! `read` regular expressions of `rabbitmqctl set_permissions`, computed from
//! the configured prefix, work queues and schedules.
//!
//! RabbitMQ checks each regex against the full name of the exchange or queue
//! an operation touches, unanchored, so every pattern here is anchored
//! (`^…$`) and every configured name is escaped (a prefix such as
//! `acme.prod` holds a `.`, which a regex would read as "any character").
//! What each AMQP method needs (RabbitMQ's access-control guide):
//!
//! | method | configure | write | read |
//! |---|---|---|---|
//! | `exchange.declare`, `queue.declare` (active) | the object | | |
//! | the same, `passive = true` | | | |
//! | `exchange.delete`, `queue.delete` | the object | | |
//! | `queue.bind`, `queue.unbind` | | the queue | the exchange |
//! | `basic.publish` | | the exchange (`amq.default` for `""`) | |
//! | `basic.get`, `basic.consume`, `queue.purge` | | | the queue |
//!
//! Dead-lettering, alternate exchanges and TTL hand-overs are done by the
//! broker and need no permission of the publisher.

use std::fmt;
use std::str::FromStr;

use crate::Config;

/// A process kind that connects to the broker with a user of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Publishes tasks (`P.tasks`, `P.delay`), sends cancels, watches events:
    /// `warren publish`, `warren cancel`, the Rust client.
    Producer,
    /// `warren worker`: consumes its work queues, publishes events, retries
    /// and dead copies, and the next steps of chains (`P.tasks`).
    Worker,
    /// `warren scheduler`: delays, retries, dead-letter intake, cron.
    Scheduler,
    /// `warren tracker`: its own event queue, and the dashboard's dead-letter
    /// list, replay and purge.
    Tracker,
    /// Everything under the prefix: `warren topology apply`, `warren dead`,
    /// `warren up`.
    Operator,
}

impl Role {
    /// Every role, in the order the documentation lists them.
    pub const ALL: [Role; 5] = [
        Role::Producer,
        Role::Worker,
        Role::Scheduler,
        Role::Tracker,
        Role::Operator,
    ];

    /// The role's name on the command line (`producer`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Worker => "worker",
            Role::Scheduler => "scheduler",
            Role::Tracker => "tracker",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: choose one of producer, worker, scheduler, tracker, operator")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// One role's three permission regexes, as `rabbitmqctl set_permissions`
/// takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Declare and delete (and, for exclusive queues, own).
    pub configure: String,
    /// Publish to (exchanges) and bind to (queues).
    pub write: String,
    /// Consume and get from (queues), bind from (exchanges).
    pub read: String,
}

/// The regex that matches no name at all (RabbitMQ reads `''` the same way).
pub const NOTHING: &str = "^$";

/// The name RabbitMQ checks permissions on for the default exchange `""`.
pub const DEFAULT_EXCHANGE: &str = "amq.default";

/// `s` with every regex metacharacter escaped, so it matches itself only.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `^(alt1|alt2|…)$` over already-escaped alternatives; [`NOTHING`] when
/// there are none.
fn any_of(alternatives: &[String]) -> String {
    match alternatives {
        [] => NOTHING.to_owned(),
        [one] => format!("^{one}$"),
        many => format!("^({})$", many.join("|")),
    }
}

/// `^alternative$` for one already-escaped alternative.
fn only(alternative: &str) -> String {
    format!("^{alternative}$")
}

impl Permissions {
    /// The least privilege `role` needs under the prefix of `config`.
    ///
    /// Names that depend on configuration (work queues, cron schedules) are
    /// listed as they are configured now: after adding a `[[queues]]` or
    /// `[[cron]]` entry, set the permissions again.
    pub fn for_role(config: &Config, role: Role) -> Permissions {
        let n = config.names();
        let p = regex_escape(n.prefix());
        // `P.<rest>` with `rest` given as regex text.
        let under = |rest: &str| format!("{p}\\.{rest}");
        let name = |full: String| regex_escape(&full);
        let default_exchange = regex_escape(DEFAULT_EXCHANGE);
        // The event watches of `Client::watch` (`--wait` with `--count`).
        let watch = under("watch\\..*");
        // Leader lock and per-schedule records of cron.
        let cron = under("cron\\..*");
        match role {
            Role::Producer => Permissions {
                configure: only(&watch),
                write: any_of(&[
                    name(n.tasks()),
                    name(n.delay()),
                    name(n.control()),
                    // Chord starts (contract section 8).
                    name(n.chords()),
                    watch.clone(),
                ]),
                read: any_of(&[name(n.events()), watch]),
            },
            Role::Worker => {
                // Each work queue and its lanes (which it also publishes
                // to, through the default exchange).
                let mut read: Vec<String> = Vec::new();
                for q in &config.queues {
                    read.push(name(n.work_queue(&q.name)));
                    if let Some(b) = config.queue_bands(q) {
                        read.extend((0..b.lanes()).map(|k| name(n.lane_queue(&q.name, k))));
                    }
                }
                read.push(name(n.cancels()));
                // The queues of paused types, which it declares, parks in
                // and moves back from.
                let paused = under("paused\\..+");
                read.push(paused.clone());
                // The queues of chords, to which it publishes its members'
                // outcomes, declaring them first.
                let chord = under("chord\\..+");
                // Global concurrency permits, which it declares and
                // deletes, and the locks of unique keys, which it declares,
                // publishes to and reads (contract section 9).
                let permits = under("permits\\..+");
                let unique = under("unique\\..+");
                read.push(unique.clone());
                Permissions {
                    configure: any_of(&[paused.clone(), chord, permits, unique]),
                    write: any_of(&[
                        name(n.events()),
                        name(n.delay()),
                        name(n.control()),
                        name(n.escrow()),
                        // The next step of a chain (contract section 8).
                        name(n.tasks()),
                        paused,
                        default_exchange,
                    ]),
                    read: any_of(&read),
                }
            }
            Role::Scheduler => {
                let has_cron = !config.cron.is_empty();
                let mut read = vec![
                    name(n.dead_letter_intake()),
                    name(n.delay_intake()),
                    name(n.wait_due()),
                    name(n.cancels()),
                ];
                if has_cron {
                    read.push(cron.clone());
                }
                if config.topology.replicated {
                    // It takes tasks out of the wait tiers itself there.
                    read.push(under("wait\\.[0-9]+s"));
                }
                // Chord starts, and the chords' queues it declares, folds
                // and deletes (contract section 8).
                let chord = under("chord\\..+");
                read.push(name(n.chords()));
                read.push(chord.clone());
                Permissions {
                    configure: if has_cron {
                        any_of(&[cron.clone(), chord])
                    } else {
                        only(&chord)
                    },
                    write: any_of(&[
                        name(n.tasks()),
                        name(n.events()),
                        name(n.control()),
                        under("release\\.[0-9]+s"),
                        default_exchange,
                    ]),
                    read: any_of(&read),
                }
            }
            Role::Tracker => {
                let queue = name(format!("{}.tracker.events", n.prefix()));
                // The copies of published tasks, which it declares as the
                // topology does and reads (the topology binds them).
                let published = name(n.tracker_published());
                // It follows the pause records (and publishes its boot
                // marker and the dashboard's pause records to P.control).
                Permissions {
                    configure: any_of(&[queue.clone(), published.clone()]),
                    write: any_of(&[queue.clone(), name(n.tasks()), name(n.control())]),
                    read: any_of(&[
                        name(n.events()),
                        queue,
                        published,
                        name(n.dead()),
                        name(n.cancels()),
                    ]),
                }
            }
            Role::Operator => {
                let all = under(".*");
                Permissions {
                    configure: only(&all),
                    write: any_of(&[all.clone(), default_exchange]),
                    read: only(&all),
                }
            }
        }
    }

    /// The `rabbitmqctl set_permissions` command line that grants these
    /// permissions to `user` on `vhost`, every argument shell-quoted.
    pub fn set_permissions_command(&self, vhost: &str, user: &str) -> String {
        [
            "rabbitmqctl",
            "set_permissions",
            "-p",
            vhost,
            user,
            &self.configure,
            &self.write,
            &self.read,
        ]
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// `s` as one POSIX shell word: as is when it holds only characters no
/// shell treats specially, else in single quotes (a `'` inside written as
/// `'\''`).
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/' | b':' | b'@' | b',')
        });
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::TopologyPlan;
    use regex_automata::meta::Regex;

    fn config(prefix: &str, extra: &str) -> Config {
        let toml = format!("prefix = \"{prefix}\"\n{extra}");
        Config::from_toml(&toml).expect("valid test configuration")
    }

    /// Whether the pattern, as RabbitMQ applies it (unanchored search),
    /// allows `name`.
    fn allows(pattern: &str, name: &str) -> bool {
        Regex::new(pattern)
            .unwrap_or_else(|e| panic!("{pattern:?} is not a valid regex: {e}"))
            .is_match(name)
    }

    #[test]
    fn escape_makes_metacharacters_literal() {
        assert_eq!(regex_escape("acme.prod"), "acme\\.prod");
        assert_eq!(regex_escape("a-b_c"), "a-b_c");
        let weird = "a.b*c+d?(e)|[f]{g}^h$i\\j";
        let anchored = format!("^{}$", regex_escape(weird));
        assert!(allows(&anchored, weird));
        assert!(!allows(&anchored, "a.b*c+d?(e)|[f]{g}^h$i\\"));
        // The dot of a prefix matches a dot only.
        let p = Permissions::for_role(&config("acme.prod", ""), Role::Operator);
        assert!(allows(&p.configure, "acme.prod.tasks"));
        assert!(!allows(&p.configure, "acmeXprod.tasks"));
        assert!(!allows(&p.configure, "other.tasks"));
        assert!(!allows(&p.configure, "xacme.prod.tasks"));
    }

    #[test]
    fn roles_parse_and_a_bad_one_lists_them() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        let e = "admin".parse::<Role>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown role \"admin\": choose one of producer, worker, scheduler, tracker, operator"
        );
    }

    #[test]
    fn default_prefix_permissions_are_exact() {
        let c = config("warren", "");
        let p = Permissions::for_role(&c, Role::Producer);
        assert_eq!(p.configure, "^warren\\.watch\\..*$");
        assert_eq!(
            p.write,
            "^(warren\\.tasks|warren\\.delay|warren\\.control|warren\\.chords|warren\\.watch\\..*)$"
        );
        assert_eq!(p.read, "^(warren\\.events|warren\\.watch\\..*)$");
        let w = Permissions::for_role(&c, Role::Worker);
        assert_eq!(
            w.configure,
            "^(warren\\.paused\\..+|warren\\.chord\\..+|warren\\.permits\\..+|warren\\.unique\\..+)$"
        );
        assert_eq!(
            w.write,
            "^(warren\\.events|warren\\.delay|warren\\.control|warren\\.escrow|warren\\.tasks|warren\\.paused\\..+|amq\\.default)$"
        );
        let o = Permissions::for_role(&c, Role::Operator);
        assert_eq!(o.configure, "^warren\\..*$");
        assert_eq!(o.write, "^(warren\\..*|amq\\.default)$");
        assert_eq!(o.read, "^warren\\..*$");
    }

    #[test]
    fn the_operator_reaches_every_planned_object_and_nothing_else() {
        let c = config("acme.prod", "");
        let plan = TopologyPlan::from_config(&c);
        let o = Permissions::for_role(&c, Role::Operator);
        for name in plan
            .exchanges
            .iter()
            .map(|x| &x.name)
            .chain(plan.queues.iter().map(|q| &q.name))
        {
            assert!(allows(&o.configure, name), "{name}");
            assert!(allows(&o.write, name), "{name}");
            assert!(allows(&o.read, name), "{name}");
        }
        for other in ["acme.dev.tasks", "amq.gen-x", "amq.direct", "warren.tasks"] {
            assert!(!allows(&o.configure, other), "{other}");
            assert!(!allows(&o.read, other), "{other}");
        }
    }

    #[test]
    fn the_producer_publishes_and_watches_but_cannot_touch_queues() {
        let c = config("acme.prod", "");
        let n = c.names();
        let p = Permissions::for_role(&c, Role::Producer);
        for x in [n.tasks(), n.delay(), n.control()] {
            assert!(allows(&p.write, &x), "{x}");
        }
        let watch = n.watch_queue("0193abc");
        assert!(allows(&p.configure, &watch));
        assert!(allows(&p.write, &watch));
        assert!(allows(&p.read, &watch));
        assert!(allows(&p.read, &n.events()));
        for q in [n.work_queue("default"), n.dead(), n.delay_intake()] {
            assert!(!allows(&p.configure, &q), "{q}");
            assert!(!allows(&p.read, &q), "{q}");
            assert!(!allows(&p.write, &q), "{q}");
        }
        for x in [n.events(), DEFAULT_EXCHANGE.to_owned(), n.tasks()] {
            assert!(!allows(&p.configure, &x), "{x}");
        }
        assert!(!allows(&p.write, &n.events()), "no forged events");
        assert!(!allows(&p.write, DEFAULT_EXCHANGE));
    }

    #[test]
    fn the_worker_reads_its_queues_and_configures_nothing() {
        let c = config("wt.x", "");
        let n = c.names();
        let w = Permissions::for_role(&c, Role::Worker);
        for q in [
            n.work_queue("io"),
            n.work_queue("cpu"),
            n.work_queue("diag"),
            n.cancels(),
        ] {
            assert!(allows(&w.read, &q), "{q}");
        }
        for x in [
            n.events(),
            n.delay(),
            n.control(),
            n.escrow(),
            n.tasks(),
            DEFAULT_EXCHANGE.into(),
        ] {
            assert!(allows(&w.write, &x), "{x}");
        }
        let plan = TopologyPlan::from_config(&c);
        for x in &plan.exchanges {
            assert!(!allows(&w.configure, &x.name), "{}", x.name);
        }
        for q in [n.dead(), n.delay_intake(), n.work_queue("iox")] {
            assert!(!allows(&w.read, &q), "{q}");
        }
    }

    #[test]
    fn the_worker_reads_the_lanes_of_its_quorum_queues() {
        let c = config(
            "wt.l",
            "[[queues]]\nname = \"io\"\ntype = \"quorum\"\n\
             [[queues]]\nname = \"cpu\"\n\
             [[routes]]\npattern = \"#\"\nqueue = \"io\"\n",
        );
        let n = c.names();
        let w = Permissions::for_role(&c, Role::Worker);
        for q in [
            n.work_queue("io"),
            n.lane_queue("io", 0),
            n.lane_queue("io", 2),
            n.work_queue("cpu"),
        ] {
            assert!(allows(&w.read, &q), "{q}");
        }
        for q in [n.lane_queue("io", 3), n.lane_queue("cpu", 0)] {
            assert!(!allows(&w.read, &q), "{q}");
        }
        assert!(allows(&w.write, DEFAULT_EXCHANGE), "moves go to the lanes");
    }

    #[test]
    fn the_scheduler_reads_its_intakes_and_owns_cron_only() {
        let plain = config("wt.s", "");
        let s = Permissions::for_role(&plain, Role::Scheduler);
        assert_eq!(s.configure, "^wt\\.s\\.chord\\..+$", "chord queues only");
        let c = config(
            "wt.s",
            "[[cron]]\nname = \"tick\"\nschedule = \"0 * * * * *\"\ntask_type = \"diag.echo\"\n",
        );
        let n = c.names();
        let s = Permissions::for_role(&c, Role::Scheduler);
        for q in [
            n.dead_letter_intake(),
            n.delay_intake(),
            n.wait_due(),
            n.cancels(),
            "wt.s.cron.leader".into(),
            "wt.s.cron.state.tick".into(),
        ] {
            assert!(allows(&s.read, &q), "{q}");
        }
        assert!(allows(&s.configure, "wt.s.cron.leader"));
        for x in [
            n.tasks(),
            n.events(),
            n.control(),
            n.release_tier(1),
            n.release_tier(15),
            DEFAULT_EXCHANGE.into(),
        ] {
            assert!(allows(&s.write, &x), "{x}");
        }
        for q in [n.work_queue("default"), n.dead(), n.tasks(), n.events()] {
            assert!(!allows(&s.configure, &q), "{q}");
            assert!(!allows(&s.read, &q), "{q}");
        }
        // It reads the wait tiers only where it takes tasks out of them.
        assert!(!allows(&s.read, &n.wait_tier(16)));
        let r = config("wt.s", "[topology]\nreplicated = true\n");
        let s = Permissions::for_role(&r, Role::Scheduler);
        for t in [1, 15, 16, 268_435_456] {
            assert!(allows(&s.read, &n.wait_tier(t)), "{t}");
        }
        assert!(!allows(&s.read, &n.work_queue("default")));
    }

    #[test]
    fn the_tracker_reads_events_and_dead_letters() {
        let c = config("wt.t", "");
        let n = c.names();
        let t = Permissions::for_role(&c, Role::Tracker);
        assert!(allows(&t.configure, "wt.t.tracker.events"));
        assert!(allows(&t.write, "wt.t.tracker.events"));
        assert!(allows(&t.read, "wt.t.tracker.events"));
        assert!(allows(&t.read, &n.events()));
        assert!(allows(&t.read, &n.dead()));
        assert!(allows(&t.write, &n.tasks()), "dashboard replay");
        assert!(allows(&t.read, &n.cancels()), "pause records");
        assert!(allows(&t.write, &n.control()), "dashboard pause");
        assert!(allows(&t.configure, &n.tracker_published()));
        assert!(allows(&t.read, &n.tracker_published()));
        assert!(!allows(&t.write, &n.tracker_published()));
        assert!(!allows(&t.configure, &n.events()));
        assert!(!allows(&t.write, &n.events()));
        assert!(!allows(&t.read, &n.work_queue("default")));
    }

    #[test]
    fn the_command_is_shell_quoted() {
        let c = config("acme.prod", "");
        let p = Permissions::for_role(&c, Role::Worker);
        assert_eq!(
            p.set_permissions_command("/", "acme-worker"),
            format!(
                "rabbitmqctl set_permissions -p / acme-worker '{}' '{}' '{}'",
                p.configure, p.write, p.read
            )
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("prod/eu"), "prod/eu");
    }
}
