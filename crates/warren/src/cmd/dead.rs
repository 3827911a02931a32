//! `warren dead list|replay|purge`: the parking lot `P.dead` from the terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;

use anyhow::{bail, Context};
use warren_client::dead::{DeadFilter, DeadLetters, DeadTask};
use warren_core::{Config, Names};

use crate::cli::{DeadAction, DeadFilterArgs, DeadListArgs, DeadPurgeArgs, DeadReplayArgs};

/// Longest detail shown in the text listing, in characters.
const DETAIL_CHARS: usize = 60;

pub async fn run(config: &Config, action: DeadAction) -> anyhow::Result<i32> {
    if let DeadAction::Purge(args) = &action {
        if !args.yes && !std::io::stdin().is_terminal() {
            bail!(
                "refusing to purge {} without confirmation: stdin is not a terminal; pass --yes",
                config.names().dead()
            );
        }
    }
    let conn = super::connect(config, "dead").await?;
    let names = config.names();
    let dead = DeadLetters::new(&conn, &names);
    let out = match action {
        DeadAction::List(args) => list(&dead, &names.dead(), args).await,
        DeadAction::Replay(args) => replay(&dead, &names, args).await,
        DeadAction::Purge(args) => purge(&dead, &names.dead(), args).await,
    };
    let _ = conn.close(200, "done".into()).await;
    out
}

fn filter_of(f: DeadFilterArgs) -> DeadFilter {
    DeadFilter {
        task_type: f.task_type,
        reason: f.reason,
        ids: None,
    }
}

fn is_filtered(f: &DeadFilter) -> bool {
    f.task_type.is_some() || f.reason.is_some()
}

async fn list(dead: &DeadLetters<'_>, queue: &str, args: DeadListArgs) -> anyhow::Result<i32> {
    let filter = filter_of(args.filter);
    let limit = args.limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    let mut stdout = std::io::stdout().lock();
    let mut written: std::io::Result<()> = Ok(());
    let mut header = !args.json;
    let report = dead
        .list(&filter, limit, |task| {
            if std::mem::take(&mut header) {
                written = writeln!(
                    stdout,
                    "{:<36}  {:<16}  {:<17}  {:>7}  {:<10}  {:>8}  DETAIL",
                    "ID", "TYPE", "REASON", "ATTEMPT", "QUEUE", "BYTES"
                );
            }
            if written.is_ok() {
                written = if args.json {
                    writeln!(stdout, "{}", task.to_json())
                } else {
                    writeln!(stdout, "{}", text_line(task))
                };
            }
            if written.is_ok() {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })
        .await?;
    match written {
        // The reader went away (`warren dead list | head`): not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
        other => other.context("write to stdout")?,
    }
    let summary = if report.limited {
        format!(
            "{} shown (--limit); {queue} holds {}",
            report.matched,
            count(report.depth as usize, "dead task")
        )
    } else if is_filtered(&filter) {
        format!(
            "{} of {} in {queue} match",
            report.matched,
            count(report.depth as usize, "dead task")
        )
    } else {
        format!("{} in {queue}", count(report.matched, "dead task"))
    };
    // With --json, stdout holds only JSON lines; the summary goes to stderr.
    if args.json {
        eprintln!("{summary}");
    } else {
        writeln!(stdout, "{summary}").context("write to stdout")?;
    }
    Ok(0)
}

/// One listing line: id, type, reason, attempt, queue, body size, detail.
fn text_line(t: &DeadTask) -> String {
    let attempt = t
        .attempt()
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    format!(
        "{:<36}  {:<16}  {:<17}  {:>7}  {:<10}  {:>8}  {}",
        t.id().unwrap_or("-"),
        t.task_type().unwrap_or("-"),
        t.reason().as_deref().unwrap_or("-"),
        attempt,
        t.queue().as_deref().unwrap_or("-"),
        t.body.len(),
        shorten(t.detail().as_deref().unwrap_or("-"), DETAIL_CHARS),
    )
}

/// The text on one line (control characters become spaces), at most `max`
/// characters, with `…` when cut.
fn shorten(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

async fn replay(
    dead: &DeadLetters<'_>,
    names: &Names,
    args: DeadReplayArgs,
) -> anyhow::Result<i32> {
    let queue = names.dead();
    let mut filter = filter_of(args.filter);
    if !args.all {
        filter.ids = Some(args.ids.iter().cloned().collect());
    }
    let report = dead.replay(&filter).await?;
    for id in &report.skipped_no_type {
        eprintln!("warning: dead task {id} has no type property to route it by: left in {queue}");
    }
    println!(
        "replayed {} from {queue} to {}",
        count(report.replayed, "dead task"),
        names.tasks()
    );
    if args.all {
        return Ok(0);
    }
    let missing: Vec<&str> = args
        .ids
        .iter()
        .filter(|id| !report.found.contains(*id))
        .map(String::as_str)
        .collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        let which = if is_filtered(&filter) {
            " matching --type/--reason"
        } else {
            ""
        };
        problems.push(format!(
            "not found in {queue}{which}: {}",
            missing.join(", ")
        ));
    }
    if !report.skipped_no_type.is_empty() {
        problems.push(format!(
            "left in {queue} (no type property): {}",
            report.skipped_no_type.join(", ")
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(0)
}

async fn purge(dead: &DeadLetters<'_>, queue: &str, args: DeadPurgeArgs) -> anyhow::Result<i32> {
    let filter = filter_of(args.filter);
    let yes = args.yes;
    let question_queue = queue.to_owned();
    let report = dead
        .purge(&filter, |n| async move {
            if yes {
                return true;
            }
            let question = format!(
                "Delete {} from {question_queue}? [y/N] ",
                count(n, "dead task")
            );
            tokio::task::spawn_blocking(move || ask(&question))
                .await
                .unwrap_or(false)
        })
        .await?;
    if report.matched == 0 {
        let which = if is_filtered(&filter) { " match" } else { "s" };
        println!("no dead task{which} in {queue}: nothing deleted");
    } else if report.deleted == 0 {
        println!("nothing deleted");
    } else {
        println!(
            "deleted {} from {queue}",
            count(report.deleted, "dead task")
        );
    }
    Ok(0)
}

/// Asks on the terminal; true only for `y` or `yes`.
fn ask(question: &str) -> bool {
    let mut stderr = std::io::stderr();
    if write!(stderr, "{question}")
        .and_then(|_| stderr.flush())
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// `1 dead task`, `3 dead tasks`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_keeps_one_line_and_cuts_long_text() {
        assert_eq!(shorten("a\nb\tc", 60), "a b c");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abcd", 4), "abcd");
        assert_eq!(shorten("ééééé", 3), "éé…");
    }

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(count(0, "dead task"), "0 dead tasks");
        assert_eq!(count(1, "dead task"), "1 dead task");
        assert_eq!(count(2, "dead task"), "2 dead tasks");
    }
}
