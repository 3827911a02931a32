//! `warren task reprioritize | reschedule | run-now`: a change record on
//! `P.control` for a task that waits (contract section 5), after the
//! tracker's database says the task has not started.

use anyhow::{bail, Context};
use warren_core::Config;
use warren_tracker::{OpenMode, Store};

use crate::cli::TaskAction;

pub async fn run(config: &Config, action: TaskAction) -> anyhow::Result<i32> {
    let now = warren_client::runtime::now_ms();
    let (task_id, priority, due_ms, force) = match action {
        TaskAction::Reprioritize {
            task_id,
            priority,
            force,
        } => (task_id, Some(priority), None, force),
        TaskAction::Reschedule {
            task_id,
            at,
            after,
            now: due_now,
            force,
        } => {
            let due = match (at, after, due_now) {
                (Some(at), _, _) => {
                    warren_tracker::record::parse_time_ms(&at).with_context(|| {
                        format!("--at {at:?} is not an RFC 3339 time, e.g. 2026-12-24T08:00:00Z")
                    })?
                }
                (None, Some(after), _) => now.saturating_add(parse_after_ms(&after)?),
                (None, None, true) => now,
                (None, None, false) => bail!("reschedule needs --at TIME, --in DURATION or --now"),
            };
            (task_id, None, Some(due), force)
        }
        TaskAction::RunNow { task_id, force } => (task_id, None, Some(now), force),
    };
    if !force {
        check_waiting(config, &task_id).await?;
    }
    let client = warren_client::Client::connect(config).await?;
    client.change_task(&task_id, priority, due_ms).await?;
    let what = match (priority, due_ms) {
        (Some(p), _) => format!("priority {p}"),
        (None, Some(d)) if d <= now => "due now".to_owned(),
        (None, Some(d)) => format!("due at {}", warren_tracker::record::format_ms(d)),
        (None, None) => unreachable!("a change has a priority or a due time"),
    };
    println!("change sent for task {task_id}: {what} (applied where it waits)");
    Ok(0)
}

/// `90s`, `10m`, `2h`, `1d` or plain milliseconds.
fn parse_after_ms(s: &str) -> anyhow::Result<i64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = digits
        .parse()
        .ok()
        .filter(|_| !digits.is_empty())
        .with_context(|| {
            format!("--in {s:?} is not a duration: give 500 (ms), 90s, 10m, 2h or 1d")
        })?;
    let scale = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("--in {s:?} is not a duration: give 500 (ms), 90s, 10m, 2h or 1d"),
    };
    Ok(n.saturating_mul(scale))
}

/// Refuses a task the tracker does not know, or knows as started or ended.
async fn check_waiting(config: &Config, task_id: &str) -> anyhow::Result<()> {
    let url = &config.tracker.database_url;
    let store = Store::open(url, OpenMode::Existing)
        .await
        .with_context(|| format!("cannot ask the tracker database {url} for the task's state (--force sends the change without asking)"))?;
    let task = store.task(task_id).await;
    store.close().await;
    let Some(task) = task? else {
        bail!(
            "no task {task_id:?} in the tracker database {url}: unknown id, or not seen yet \
             (--force sends the change anyway)"
        );
    };
    match warren_tracker::record::change_refusal(&task) {
        None => Ok(()),
        Some(why) => bail!("{why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_their_unit() {
        assert_eq!(parse_after_ms("500").unwrap(), 500);
        assert_eq!(parse_after_ms("90s").unwrap(), 90_000);
        assert_eq!(parse_after_ms("10m").unwrap(), 600_000);
        assert_eq!(parse_after_ms("2h").unwrap(), 7_200_000);
        assert_eq!(parse_after_ms("1d").unwrap(), 86_400_000);
        for bad in ["", "s", "10x", "-5s", "1.5h"] {
            let e = parse_after_ms(bad).unwrap_err().to_string();
            assert!(e.contains("not a duration"), "{bad}: {e}");
        }
    }
}
