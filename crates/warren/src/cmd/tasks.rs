//! `warren tasks`: tracked tasks, latest first, from the tracker's database.

use std::io::Write;

use anyhow::Context;
use warren_core::Config;
use warren_tracker::{OpenMode, Store, TaskFilter};

use crate::cli::TasksArgs;

/// Longest error shown in the text listing, in characters.
const ERROR_CHARS: usize = 60;

pub async fn run(config: &Config, args: TasksArgs) -> anyhow::Result<i32> {
    let since_ms = match &args.since {
        Some(s) => Some(
            warren_tracker::api::parse_since(s, chrono_now_ms())
                .map_err(anyhow::Error::msg)
                .context("--since")?,
        ),
        None => None,
    };
    let filter = TaskFilter {
        state: args.state,
        task_type: args.task_type,
        queue: None,
        since_ms,
        limit: i64::try_from(args.limit).unwrap_or(i64::MAX),
    };
    let store = Store::open(&config.tracker.database_url, OpenMode::Existing).await?;
    let rows = store.list(&filter).await;
    store.close().await;
    let rows = rows?;
    let mut out = std::io::stdout().lock();
    let written = (|| -> std::io::Result<()> {
        if args.json {
            for r in &rows {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&r.view()).expect("serializes")
                )?;
            }
            return Ok(());
        }
        writeln!(
            out,
            "{:<36}  {:<16}  {:<10}  {:>8}  {:<8}  {:<24}  ERROR",
            "ID", "TYPE", "STATE", "ATTEMPTS", "QUEUE", "LAST EVENT"
        )?;
        for r in &rows {
            let v = r.view();
            let error = v
                .error
                .as_ref()
                .map(super::status::error_text)
                .unwrap_or_default();
            writeln!(
                out,
                "{:<36}  {:<16}  {:<10}  {:>8}  {:<8}  {:<24}  {}",
                v.task_id,
                v.task_type,
                v.state,
                v.attempts,
                v.queue.as_deref().unwrap_or("-"),
                v.last_event_at,
                shorten(&error, ERROR_CHARS),
            )?;
        }
        Ok(())
    })();
    match written {
        // The reader went away (`warren tasks | head`): not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
        other => other.context("write to stdout")?,
    }
    if !args.json {
        let more = if rows.len() as u64 == args.limit {
            " (--limit; there may be more)"
        } else {
            ""
        };
        writeln!(out, "{} task(s){more}", rows.len()).context("write to stdout")?;
    }
    Ok(0)
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The text on one line, at most `max` characters, with `…` when cut.
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
