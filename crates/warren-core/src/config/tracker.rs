//! `[tracker]`: the task tracker's database, retention, HTTP address and
//! who may use it (the credentials themselves: `tracker_auth`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::issues::check_listen;
use super::{Config, DatabaseUrl, Issues};

/// Most events `tracker.batch_max_events` may put in one transaction.
const MAX_TRACKER_BATCH: usize = 10_000;

/// Most copies `tracker.published_max_length` may keep (a 32-bit queue argument).
const MAX_PUBLISHED_LENGTH: u64 = i32::MAX as u64;

/// The task tracker (`warren tracker`, also inside `warren up`): where it
/// keeps task states, how long, and where it serves its HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerConfig {
    /// `sqlite://PATH` (one file, created if missing) or
    /// `postgres://user:pass@host:5432/db`; its password is redacted when printed.
    pub database_url: DatabaseUrl,
    /// How long a task is kept after its last event, in milliseconds.
    pub retention_ms: u64,
    /// Address of the dashboard, the JSON API, `/metrics` and health (`host:port`).
    pub listen: String,
    /// Most events written in one transaction.
    pub batch_max_events: usize,
    /// Longest an event waits for its batch to fill before it is written.
    pub batch_max_ms: u64,
    /// Largest result stored per task; a larger one is kept as a truncated preview.
    pub max_result_bytes: usize,
    /// Serve the API and dashboard without authentication (a warning is
    /// logged at start); refused together with credentials.
    pub open: bool,
    /// API bearer tokens, `NAME:ROLE:env:VAR` or `NAME:ROLE:file:PATH`
    /// (ROLE `read` or `admin`); see [`super::TrackerCredential`].
    pub tokens: Vec<String>,
    /// Dashboard logins, same form; the secret is the user's password.
    pub users: Vec<String>,
    /// How long a dashboard session lasts after its login, in milliseconds.
    pub session_ttl_ms: u64,
    /// Failed logins and bad tokens one client address may send per minute;
    /// past that it is answered 429 until the minute has passed.
    pub max_failed_logins_per_minute: u32,
    /// Keep a copy of every task published to `P.tasks` (on a route) or
    /// `P.delay` in the bounded queue `P.tracker.published`, which the
    /// tracker reads to show tasks as `queued` or `scheduled` from their
    /// publication on. The scheduler declares the queue and its bindings
    /// when on, and deletes the queue when off.
    pub track_published: bool,
    /// Most copies `P.tracker.published` holds while no tracker reads it;
    /// past that the oldest are dropped (`x-max-length`, `drop-head`).
    pub published_max_length: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            database_url: DatabaseUrl::new("sqlite://warren-tracker/tracker.db"),
            retention_ms: 7 * 24 * 3600 * 1000,
            listen: "127.0.0.1:8089".into(),
            batch_max_events: 2000,
            batch_max_ms: 50,
            max_result_bytes: 16 * 1024,
            open: false,
            tokens: Vec::new(),
            users: Vec::new(),
            session_ttl_ms: 8 * 3600 * 1000,
            max_failed_logins_per_minute: 5,
            track_published: true,
            published_max_length: 100_000,
        }
    }
}

impl Config {
    pub(super) fn check_tracker(&self, issues: &mut Issues) {
        let t = &self.tracker;
        let url = &t.database_url;
        if let Some(path) = url.sqlite_path() {
            let data_dir = &self.worker.data_dir;
            if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" {
                issues.add(
                    "tracker.database_url",
                    format!(
                        "\"{url}\" names no file: use sqlite://PATH, for example \
                         sqlite://warren-tracker/tracker.db (the tracker and `warren status` \
                         must share it)"
                    ),
                );
            } else if !data_dir.as_os_str().is_empty()
                && normalized(&path).starts_with(normalized(data_dir))
            {
                issues.add(
                    "tracker.database_url",
                    format!(
                        "\"{url}\" is inside worker.data_dir = {:?}, where file.download and \
                         file.upload tasks could overwrite or send it: put it elsewhere, for \
                         example sqlite://warren-tracker/tracker.db",
                        data_dir.display().to_string()
                    ),
                );
            }
        } else if !url.is_postgres() {
            issues.add(
                "tracker.database_url",
                format!(
                    "\"{url}\" is not a database URL: use sqlite://PATH (one file, created \
                     if missing) or postgres://user:pass@host:5432/database"
                ),
            );
        }
        issues.above_zero(
            "tracker.retention_ms",
            t.retention_ms,
            "0 would delete every task at once: set it above 0, for example 604800000 \
             (7 days)",
        );
        check_listen(issues, "tracker.listen", &t.listen, "8089", false);
        if !(1..=MAX_PUBLISHED_LENGTH).contains(&t.published_max_length) {
            issues.add(
                "tracker.published_max_length",
                format!(
                    "{} is out of range: give 1..={MAX_PUBLISHED_LENGTH} copies (the bound of \
                     P.tracker.published while no tracker reads it)",
                    t.published_max_length
                ),
            );
        }
        if !(1..=MAX_TRACKER_BATCH).contains(&t.batch_max_events) {
            issues.add(
                "tracker.batch_max_events",
                format!(
                    "{} is out of range: must be 1..={MAX_TRACKER_BATCH}, for example 2000",
                    t.batch_max_events
                ),
            );
        }
        issues.above_zero(
            "tracker.batch_max_ms",
            t.batch_max_ms,
            "0 would write every event alone: set it above 0, for example 50",
        );
        issues.above_zero(
            "tracker.max_result_bytes",
            t.max_result_bytes,
            "0 would keep no result: set it above 0, for example 16384 (16 KiB)",
        );
    }
}

/// A path without `.` components, for comparing where files live.
fn normalized(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn tracker_defaults_and_environment() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.tracker, TrackerConfig::default());
        assert_eq!(
            c.tracker.database_url.sqlite_path(),
            Some(PathBuf::from("warren-tracker/tracker.db"))
        );
        let c = Config::load_from(
            None,
            &env(&[
                (
                    "WARREN__TRACKER__DATABASE_URL",
                    "postgres://warren:s3cret@db:5432/warren",
                ),
                ("WARREN__TRACKER__LISTEN", "0.0.0.0:9000"),
            ]),
        )
        .unwrap();
        assert!(c.tracker.database_url.is_postgres());
        assert_eq!(c.tracker.database_url.sqlite_path(), None);
        assert_eq!(
            c.tracker.database_url.to_string(),
            "postgres://warren:***@db:5432/warren"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.tracker.listen, "0.0.0.0:9000");
    }

    #[test]
    fn tracker_rules() {
        one_issue(
            "[tracker]\ndatabase_url = \"mysql://root:pw@db/warren\"",
            "config key tracker.database_url: \"mysql://root:***@db/warren\" is not a database \
             URL: use sqlite://PATH (one file, created if missing) or \
             postgres://user:pass@host:5432/database",
        );
        one_issue(
            "[tracker]\ndatabase_url = \"sqlite://./data/tracker.db\"",
            "config key tracker.database_url: \"sqlite://./data/tracker.db\" is inside \
             worker.data_dir = \"data\", where file.download and file.upload tasks could \
             overwrite or send it: put it elsewhere, for example \
             sqlite://warren-tracker/tracker.db",
        );
        assert_eq!(
            issues("[tracker]\ndatabase_url = \"sqlite::memory:\"").len(),
            1
        );
        assert!(Config::from_toml("[tracker]\ndatabase_url = \"sqlite:/var/lib/t.db\"").is_ok());
        one_issue(
            "[tracker]\nlisten = \"localhost\"",
            "config key tracker.listen: \"localhost\" is not an address and port: use one such \
             as \"127.0.0.1:8089\" (\"0.0.0.0:8089\" listens on every interface)",
        );
        one_issue(
            "[worker]\nlisten = \"8090\"",
            "config key worker.listen: \"8090\" is not an address and port: use one such \
             as \"127.0.0.1:8090\" (\"0.0.0.0:8090\" listens on every interface), or \"\" to \
             turn it off",
        );
        one_issue(
            "[scheduler]\nlisten = \"host:x\"",
            "config key scheduler.listen: \"host:x\" is not an address and port: use one such \
             as \"127.0.0.1:8091\" (\"0.0.0.0:8091\" listens on every interface), or \"\" to \
             turn it off",
        );
        assert!(Config::from_toml("[worker]\nlisten = \"\"\n[scheduler]\nlisten = \"\"").is_ok());
        let keys: Vec<String> = issues(
            "[tracker]\nretention_ms = 0\nbatch_max_events = 0\nbatch_max_ms = 0\n\
             max_result_bytes = 0",
        )
        .iter()
        .map(|i| i.split(':').next().unwrap().to_owned())
        .collect();
        assert_eq!(
            keys,
            [
                "config key tracker.retention_ms",
                "config key tracker.batch_max_events",
                "config key tracker.batch_max_ms",
                "config key tracker.max_result_bytes",
            ]
        );
    }
}
