//! `tracker.tokens`, `tracker.users` and `tracker.open`: who may use the
//! tracker's API and dashboard, and with which role.
//!
//! An entry names a credential, its role and where its secret is read from,
//! `NAME:ROLE:env:VAR` or `NAME:ROLE:file:PATH`, so that no secret is written
//! into a configuration file; the tracker reads the secrets when it starts.

use std::fmt;
use std::path::PathBuf;

use super::{Config, Issues};

/// Longest credential name accepted.
const MAX_NAME_CHARS: usize = 64;

/// What a tracker credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TrackerRole {
    /// Every `GET`: tasks, listings, queues, dead letters, the dashboard.
    Read,
    /// Also what changes something (replaying dead tasks, every `POST`).
    Admin,
}

impl TrackerRole {
    /// `read` or `admin`, as written in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackerRole::Read => "read",
            TrackerRole::Admin => "admin",
        }
    }
}

impl fmt::Display for TrackerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a credential's secret is read from when the tracker starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable of the tracker's process.
    Env(String),
    /// A file (its content, without a trailing newline).
    File(PathBuf),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(var) => write!(f, "environment variable {var}"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// One entry of `tracker.tokens` or `tracker.users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerCredential {
    /// The token's or the user's name (a user logs in with it; logs show it).
    pub name: String,
    /// What it may do.
    pub role: TrackerRole,
    /// Where its secret (the token, or the user's password) is read from.
    pub source: SecretSource,
}

impl TrackerCredential {
    /// Parses `NAME:ROLE:env:VAR` or `NAME:ROLE:file:PATH`. The error never
    /// repeats what stands where the source should be, in case a secret was
    /// written there by mistake.
    pub fn parse(entry: &str) -> Result<TrackerCredential, String> {
        let example = "use NAME:ROLE:env:VAR or NAME:ROLE:file:PATH with ROLE read or admin, \
                       for example \"ops:admin:env:WARREN_TRACKER_TOKEN\" or \
                       \"alice:read:file:/run/secrets/alice\"";
        let mut parts = entry.splitn(3, ':');
        let name = parts.next().unwrap_or_default();
        let role = parts.next();
        let source = parts.next();
        if name.is_empty()
            || name.chars().count() > MAX_NAME_CHARS
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
        {
            return Err(format!(
                "the name {name:?} must be 1 to {MAX_NAME_CHARS} letters, digits, '.', '_', \
                 '@' or '-': {example}"
            ));
        }
        let role = match role {
            Some("read") => TrackerRole::Read,
            Some("admin") => TrackerRole::Admin,
            Some(other) => {
                return Err(format!(
                    "{name}: the role {other:?} is neither read nor admin: {example}"
                ))
            }
            None => return Err(format!("{name}: no role and no secret source: {example}")),
        };
        let source = match source.and_then(|s| s.split_once(':')) {
            Some(("env", var)) if is_env_name(var) => SecretSource::Env(var.to_owned()),
            Some(("env", _)) => {
                return Err(format!(
                    "{name}:{role}: env: needs a variable name of letters, digits and '_': \
                     {example}"
                ))
            }
            Some(("file", path)) if !path.is_empty() => SecretSource::File(PathBuf::from(path)),
            _ => {
                return Err(format!(
                    "{name}:{role}: the secret source (shown as …) must be env:VAR or \
                     file:PATH, never the secret itself: {example}"
                ))
            }
        };
        Ok(TrackerCredential {
            name: name.to_owned(),
            role,
            source,
        })
    }
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(var: &str) -> bool {
    var.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Config {
    /// The valid entries of `tracker.tokens` (the API's bearer tokens).
    pub fn tracker_tokens(&self) -> Vec<TrackerCredential> {
        parsed(&self.tracker.tokens)
    }

    /// The valid entries of `tracker.users` (the dashboard's logins).
    pub fn tracker_users(&self) -> Vec<TrackerCredential> {
        parsed(&self.tracker.users)
    }

    /// Why the tracker may not serve HTTP with this configuration: neither
    /// credentials nor `tracker.open = true`. One line naming the keys.
    pub fn tracker_auth_missing(&self) -> Option<String> {
        let t = &self.tracker;
        (!t.open && t.tokens.is_empty() && t.users.is_empty()).then(|| {
            "the tracker has no credentials: set tracker.tokens (API bearer tokens) and/or \
             tracker.users (dashboard logins), for example \
             WARREN__TRACKER__TOKENS=ops:admin:env:WARREN_TRACKER_TOKEN, or set \
             tracker.open = true (WARREN__TRACKER__OPEN=true) to serve without authentication"
                .to_owned()
        })
    }

    pub(super) fn check_tracker_auth(&self, issues: &mut Issues) {
        let t = &self.tracker;
        for (key, entries) in [("tracker.tokens", &t.tokens), ("tracker.users", &t.users)] {
            let mut seen = std::collections::BTreeSet::new();
            for (i, entry) in entries.iter().enumerate() {
                match TrackerCredential::parse(entry) {
                    Ok(c) => {
                        if !seen.insert(c.name.clone()) {
                            issues.add(
                                format!("{key}[{i}]"),
                                format!(
                                    "the name {:?} is used twice: give each entry its own name",
                                    c.name
                                ),
                            );
                        }
                    }
                    Err(problem) => issues.add(format!("{key}[{i}]"), problem),
                }
            }
        }
        if t.open && !(t.tokens.is_empty() && t.users.is_empty()) {
            issues.add(
                "tracker.open",
                "true turns authentication off, yet tracker.tokens or tracker.users name \
                 credentials: remove them, or set tracker.open = false to use them",
            );
        }
        issues.above_zero(
            "tracker.session_ttl_ms",
            t.session_ttl_ms,
            "0 would end every dashboard session at once: set it above 0, for example \
             28800000 (8 hours)",
        );
        if !(1..=1000).contains(&t.max_failed_logins_per_minute) {
            issues.add(
                "tracker.max_failed_logins_per_minute",
                format!(
                    "{} is out of range: must be 1..=1000, for example 5",
                    t.max_failed_logins_per_minute
                ),
            );
        }
    }
}

fn parsed(entries: &[String]) -> Vec<TrackerCredential> {
    entries
        .iter()
        .filter_map(|e| TrackerCredential::parse(e).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use super::*;

    #[test]
    fn entries_parse_with_role_and_source() {
        let c = TrackerCredential::parse("ops:admin:env:WARREN_TRACKER_TOKEN").unwrap();
        assert_eq!(c.name, "ops");
        assert_eq!(c.role, TrackerRole::Admin);
        assert_eq!(c.source, SecretSource::Env("WARREN_TRACKER_TOKEN".into()));
        let c = TrackerCredential::parse("alice@example.org:read:file:/run/s:x").unwrap();
        assert_eq!(c.role, TrackerRole::Read);
        assert_eq!(c.source, SecretSource::File("/run/s:x".into()));
        for bad in [
            "",
            "ops",
            "ops:root:env:X",
            "ops:read",
            "ops:read:env:",
            "a b:read:env:X",
        ] {
            assert!(TrackerCredential::parse(bad).is_err(), "{bad}");
        }
        let e = TrackerCredential::parse("ops:admin:hunter2-secret").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("env:VAR or file:PATH"), "{e}");
    }

    #[test]
    fn auth_keys_from_file_and_environment() {
        let c = Config::from_toml("").unwrap();
        assert!(!c.tracker.open);
        assert!(c.tracker_auth_missing().unwrap().contains("tracker.tokens"));
        let c = Config::load_from(
            None,
            &env(&[
                (
                    "WARREN__TRACKER__TOKENS",
                    "ops:admin:env:T_OPS, ci:read:file:/run/ci",
                ),
                ("WARREN__TRACKER__USERS", "alice:admin:env:ALICE_PW"),
            ]),
        )
        .unwrap();
        assert_eq!(c.tracker_tokens().len(), 2);
        assert_eq!(c.tracker_tokens()[1].role, TrackerRole::Read);
        assert_eq!(c.tracker_users()[0].name, "alice");
        assert_eq!(c.tracker_auth_missing(), None);
        let c = Config::load_from(None, &env(&[("WARREN__TRACKER__OPEN", "true")])).unwrap();
        assert!(c.tracker.open);
        assert_eq!(c.tracker_auth_missing(), None);
    }

    #[test]
    fn auth_rules() {
        one_issue(
            "[tracker]\ntokens = [\"ops:owner:env:X\"]",
            "config key tracker.tokens[0]: ops: the role \"owner\" is neither read nor admin: \
             use NAME:ROLE:env:VAR or NAME:ROLE:file:PATH with ROLE read or admin, for example \
             \"ops:admin:env:WARREN_TRACKER_TOKEN\" or \"alice:read:file:/run/secrets/alice\"",
        );
        let found = issues("[tracker]\nusers = [\"a:read:env:X\", \"a:admin:env:Y\"]");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("config key tracker.users[1]: the name \"a\" is used twice"));
        let found = issues("[tracker]\nopen = true\ntokens = [\"a:read:env:X\"]");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("config key tracker.open: true turns authentication off"));
        let keys: Vec<String> =
            issues("[tracker]\nsession_ttl_ms = 0\nmax_failed_logins_per_minute = 0")
                .iter()
                .map(|i| i.split(':').next().unwrap().to_owned())
                .collect();
        assert_eq!(
            keys,
            [
                "config key tracker.session_ttl_ms",
                "config key tracker.max_failed_logins_per_minute"
            ]
        );
    }
}
