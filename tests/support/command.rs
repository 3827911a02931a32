//! Running a command to the end and checking how it exited.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs a [`Command`] to the end (stdin closed, output captured) and checks
/// how it exited. On a mismatch it panics at the caller's line, showing the
/// command line, the exit status and the stderr (and stdout).
pub trait CommandExt {
    /// Asserts the command succeeded; returns its output.
    fn succeeds(&mut self) -> Output;
    /// Asserts the command failed; returns its stderr.
    fn fails(&mut self) -> String;
    /// Asserts the command exited with `code`; returns its output.
    fn exits_with(&mut self, code: i32) -> Output;
}

impl CommandExt for Command {
    #[track_caller]
    fn succeeds(&mut self) -> Output {
        let out = run(self);
        assert!(out.status.success(), "{}", report(self, &out, "succeed"));
        out
    }

    #[track_caller]
    fn fails(&mut self) -> String {
        let out = run(self);
        assert!(!out.status.success(), "{}", report(self, &out, "fail"));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[track_caller]
    fn exits_with(&mut self, code: i32) -> Output {
        let out = run(self);
        let expected = format!("exit with {code}");
        assert_eq!(
            out.status.code(),
            Some(code),
            "{}",
            report(self, &out, &expected)
        );
        out
    }
}

#[track_caller]
fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(cmd)))
}

/// `program args…`, the program by its file name.
fn command_line(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let mut line = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned();
    for a in cmd.get_args() {
        line.push(' ');
        line.push_str(&a.to_string_lossy());
    }
    line
}

fn report(cmd: &Command, out: &Output, expected: &str) -> String {
    format!(
        "`{}` was expected to {expected} but ended with {}\nstderr:\n{}\nstdout:\n{}",
        command_line(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    )
}
