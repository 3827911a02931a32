//! `[[exec]]`: task types handled by a program of the user's, in any
//! language (README "Handlers in any language (exec)").

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, Issues};
use crate::routes;

/// Default cap on what a program may write to stdout that is kept: 1 MiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// One task type run by a program: argv (no shell), working directory,
/// environment and limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The exact task type this program handles.
    #[serde(rename = "type")]
    pub task_type: String,
    /// The program and its arguments; the first word is a path (relative to
    /// `workdir`) or a name looked up in the worker's `PATH` at start-up.
    pub command: Vec<String>,
    /// Working directory of the program; empty: the worker's.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Names of the worker's environment variables passed on; nothing else
    /// of the worker's environment reaches the program.
    #[serde(default)]
    pub env_allow: Vec<String>,
    /// Fixed environment variables of the program (they win over `env_allow`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Time limit of one run in milliseconds: the program's process group
    /// gets SIGTERM, then SIGKILL 5 s later. 0: only the task's own time
    /// limit (`worker.task_timeout_ms` or `x-warren-timeout-ms`).
    #[serde(default)]
    pub time_limit_ms: u64,
    /// Bytes of stdout kept as the result; the rest is read and dropped.
    #[serde(default = "default_max_output")]
    pub max_output_bytes: usize,
}

fn default_max_output() -> usize {
    DEFAULT_MAX_OUTPUT_BYTES
}

/// An environment variable name: not empty, no `=` and no NUL.
fn is_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

/// Whether `task_type` is one of the built-in task types, which no
/// `[[exec]]` or `[[webhook]]` entry may take over.
pub(super) fn is_builtin_type(task_type: &str) -> bool {
    matches!(task_type, "http.request" | "file.download" | "file.upload")
        || task_type.starts_with("diag.")
}

/// The checks of the `type` key of an `[[exec]]` or `[[webhook]]` entry
/// (`section`): a valid, exact task type, not built in, one entry each.
pub(super) fn check_handler_type<'a>(
    section: &str,
    i: usize,
    task_type: &'a str,
    seen: &mut BTreeSet<&'a str>,
    issues: &mut Issues,
) {
    let key = format!("{section}[{i}].type");
    if !routes::is_valid_task_type(task_type) {
        issues.add(
            key,
            format!(
                "{task_type:?} is not a task type: use words of letters, digits, '_' or '-' \
                 joined by '.', such as \"report.build\""
            ),
        );
    } else if !seen.insert(task_type) {
        issues.add(
            key,
            format!("{task_type:?} has another [[{section}]] entry: give each type one"),
        );
    } else if is_builtin_type(task_type) {
        issues.add(
            key,
            format!("{task_type:?} is a built-in task type: choose a type of your own"),
        );
    }
}

impl Config {
    /// The `[[exec]]` entry of a task type.
    pub fn exec_of(&self, task_type: &str) -> Option<&ExecConfig> {
        self.exec.iter().find(|e| e.task_type == task_type)
    }

    pub(super) fn check_exec(&self, issues: &mut Issues) {
        let mut seen = BTreeSet::new();
        for (i, e) in self.exec.iter().enumerate() {
            let key = |k: &str| format!("exec[{i}].{k}");
            check_handler_type("exec", i, &e.task_type, &mut seen, issues);
            match e.command.first() {
                None => issues.add(
                    key("command"),
                    "is empty: give the program and its arguments, such as [\"python3\", \
                     \"handler.py\"]",
                ),
                Some(p) if p.is_empty() || p.contains('\0') => issues.add(
                    key("command"),
                    "the program (first word) is empty or holds a NUL: name a program",
                ),
                Some(_) => {}
            }
            if e.command.iter().any(|a| a.contains('\0')) {
                issues.add(key("command"), "an argument holds a NUL byte: remove it");
            }
            if e.workdir.as_ref().is_some_and(|w| w.as_os_str().is_empty()) {
                issues.add(
                    key("workdir"),
                    "is empty: set a directory or leave the key out",
                );
            }
            for name in e.env_allow.iter().chain(e.env.keys()) {
                if !is_env_name(name) {
                    issues.add(
                        key("env"),
                        format!("{name:?} is not an environment variable name"),
                    );
                }
            }
            if e.env.values().any(|v| v.contains('\0')) {
                issues.add(key("env"), "a value holds a NUL byte: remove it");
            }
            issues.above_zero(
                key("max_output_bytes"),
                e.max_output_bytes,
                "0 would keep no result: set it above 0, for example 1048576 (1 MiB)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn exec_entries_parse_with_defaults() {
        let c = Config::from_toml(
            "[[exec]]\ntype = \"report.build\"\ncommand = [\"python3\", \"r.py\"]\n\
             env_allow = [\"LANG\"]\nenv = { MODE = \"x\" }\n",
        )
        .unwrap();
        let e = c.exec_of("report.build").unwrap();
        assert_eq!(e.command, ["python3", "r.py"]);
        assert_eq!(e.max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES);
        assert_eq!(e.time_limit_ms, 0);
        assert_eq!(e.env["MODE"], "x");
        assert!(c.exec_of("other").is_none());
    }

    #[test]
    fn exec_rules() {
        one_issue(
            "[[exec]]\ntype = \"a.*\"\ncommand = [\"x\"]",
            "config key exec[0].type: \"a.*\" is not a task type: use words of letters, \
             digits, '_' or '-' joined by '.', such as \"report.build\"",
        );
        one_issue(
            "[[exec]]\ntype = \"a\"\ncommand = []",
            "config key exec[0].command: is empty: give the program and its arguments, such \
             as [\"python3\", \"handler.py\"]",
        );
        one_issue(
            "[[exec]]\ntype = \"a\"\ncommand = [\"x\"]\n[[exec]]\ntype = \"a\"\ncommand = [\"y\"]",
            "config key exec[1].type: \"a\" has another [[exec]] entry: give each type one",
        );
        one_issue(
            "[[exec]]\ntype = \"http.request\"\ncommand = [\"x\"]",
            "config key exec[0].type: \"http.request\" is a built-in task type: choose a type \
             of your own",
        );
        one_issue(
            "[[exec]]\ntype = \"a\"\ncommand = [\"x\"]\nmax_output_bytes = 0",
            "config key exec[0].max_output_bytes: 0 would keep no result: set it above 0, for \
             example 1048576 (1 MiB)",
        );
        one_issue(
            "[[exec]]\ntype = \"a\"\ncommand = [\"x\"]\nenv_allow = [\"A=B\"]",
            "config key exec[0].env: \"A=B\" is not an environment variable name",
        );
        assert!(
            parse_error("[[exec]]\ntype = \"a\"\ncommand = [\"x\"]\nshell = true")
                .contains("shell")
        );
    }
}
