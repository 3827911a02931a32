//! The problems validation finds, how they are collected and how they read.

use std::fmt;
use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type or an
    /// unknown key; the text names the key when known.
    #[error("{0}")]
    Parse(String),
    /// The configuration parsed but breaks rules; every problem is listed.
    #[error("{}", join_issues(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn join_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One broken rule: the key and a problem text that states the value, what
/// is wrong with it and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The key, as written in TOML paths (`queues[1].max_priority`).
    pub key: String,
    /// The value, what is wrong and the fix.
    pub problem: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key {}: {}", self.key, self.problem)
    }
}

/// The problems found so far, in the order the checks ran.
#[derive(Default)]
pub(super) struct Issues(Vec<ConfigIssue>);

impl Issues {
    pub(super) fn add(&mut self, key: impl AsRef<str>, problem: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.as_ref().to_string(),
            problem: problem.into(),
        });
    }

    /// The check behind every "must be above 0" rule: adds `problem` under
    /// `key` when `value` is 0. Returns whether `value` is above 0, so that
    /// a further check of the same key can follow with `&&`.
    pub(super) fn above_zero<T: PartialEq + From<u8>>(
        &mut self,
        key: impl AsRef<str>,
        value: T,
        problem: &str,
    ) -> bool {
        let above = value != T::from(0);
        if !above {
            self.add(key, problem);
        }
        above
    }

    /// Every issue added, or none.
    pub(super) fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}

/// Checks a `host:port` listen address (`""` turns it off when `optional`).
pub(super) fn check_listen(
    issues: &mut Issues,
    key: &str,
    value: &str,
    port: &str,
    optional: bool,
) {
    if optional && value.is_empty() {
        return;
    }
    if value.parse::<std::net::SocketAddr>().is_err() {
        let off = if optional {
            ", or \"\" to turn it off"
        } else {
            ""
        };
        issues.add(
            key,
            format!(
                "{value:?} is not an address and port: use one such as \"127.0.0.1:{port}\" \
                 (\"0.0.0.0:{port}\" listens on every interface){off}"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let err =
            Config::from_toml("prefix = \"\"\n[worker]\nconcurrency = 0\ntask_timeout_ms = 0")
                .unwrap_err();
        let ConfigError::Invalid(list) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(list.len(), 3);
        let text = err.to_string();
        assert_eq!(text.matches("; config key ").count(), 2, "{text}");
    }
}
