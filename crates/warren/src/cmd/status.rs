//! `warren status ID`: one task's state and history, from the tracker's
//! database; without an id, the fleet overview (see [`super::overview`]).

use anyhow::Context;
use serde_json::{json, Value};
use warren_core::Config;
use warren_tracker::{OpenMode, Store, TaskView};

use crate::cli::StatusArgs;

pub async fn run(config: &Config, args: StatusArgs) -> anyhow::Result<i32> {
    let Some(task_id) = args.task_id else {
        return super::overview::run(config, args.json).await;
    };
    let store = Store::open(&config.tracker.database_url, OpenMode::Existing).await?;
    let task = store.task(&task_id).await?;
    let history = store.history(&task_id).await?;
    store.close().await;
    let Some(task) = task else {
        anyhow::bail!(
            "no task {:?} in the tracker database {}: unknown id, not seen yet (is `warren \
             tracker` or `warren up` running?), or pruned after tracker.retention_ms",
            task_id,
            config.tracker.database_url
        );
    };
    let view = task.view();
    let events: Vec<Value> = history.into_iter().map(|h| h.event).collect();
    if args.json {
        println!("{}", json!({"task": view, "events": events}));
        return Ok(0);
    }
    print!("{}", summary(&view));
    println!();
    println!(
        "{:<24}  {:<9}  {:>7}  {:<20}  DETAIL",
        "AT", "STATE", "ATTEMPT", "WORKER"
    );
    for e in &events {
        println!(
            "{:<24}  {:<9}  {:>7}  {:<20}  {}",
            e["at"].as_str().unwrap_or("-"),
            e["state"].as_str().unwrap_or("-"),
            e["attempt"].as_i64().map_or("-".into(), |a| a.to_string()),
            e["worker"].as_str().unwrap_or("-"),
            detail(e),
        );
    }
    std::io::Write::flush(&mut std::io::stdout()).context("write to stdout")?;
    Ok(0)
}

/// The task's facts, one per line.
fn summary(t: &TaskView) -> String {
    let mut out = format!("task      {}\n", t.task_id);
    let mut line = |k: &str, v: Option<String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            out.push_str(&format!("{k:<9} {v}\n"));
        }
    };
    line("type", Some(t.task_type.clone()));
    let state = match &t.reason {
        Some(r) => format!("{} ({r})", t.state),
        None => t.state.clone(),
    };
    line("state", Some(state));
    line("attempts", Some(t.attempts.to_string()));
    line("queue", t.queue.clone());
    line("worker", t.worker.clone());
    line("first", Some(t.first_seen.clone()));
    line("started", t.started_at.clone());
    line("finished", t.finished_at.clone());
    line("duration", t.duration_ms.map(|d| format!("{d} ms")));
    line("due", t.due_at.clone());
    line("error", t.error.as_ref().map(error_text));
    line("result", t.result.as_ref().map(Value::to_string));
    out
}

/// `code: message` of an event's error object.
pub fn error_text(e: &Value) -> String {
    match (e["code"].as_str(), e["message"].as_str()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        _ => e.to_string(),
    }
}

/// What an event adds: its error, reason, due time, progress or duration.
fn detail(e: &Value) -> String {
    if !e["error"].is_null() {
        let retry = match e["retry"].as_bool() {
            Some(true) => " (will retry)",
            Some(false) => " (no retry left)",
            None => "",
        };
        return format!("{}{retry}", error_text(&e["error"]));
    }
    if let Some(r) = e["reason"].as_str() {
        return r.to_owned();
    }
    if let Some(d) = e["due_at"].as_str() {
        return format!("due {d}");
    }
    if let Some(b) = e["progress"]["bytes"].as_u64() {
        return match e["progress"]["total"].as_u64() {
            Some(t) => format!("{b} of {t} bytes"),
            None => format!("{b} bytes"),
        };
    }
    if let Some(d) = e["duration_ms"].as_u64() {
        return format!("{d} ms");
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_say_what_each_event_adds() {
        let failed = json!({"error": {"kind": "retryable", "code": "boom", "message": "flaky"}, "retry": true});
        assert_eq!(detail(&failed), "boom: flaky (will retry)");
        assert_eq!(
            detail(&json!({"error": null, "reason": "expired"})),
            "expired"
        );
        assert_eq!(
            detail(&json!({"error": null, "due_at": "2030-01-01T00:00:00.000Z"})),
            "due 2030-01-01T00:00:00.000Z"
        );
        assert_eq!(
            detail(&json!({"progress": {"bytes": 5, "total": null}})),
            "5 bytes"
        );
        assert_eq!(detail(&json!({"duration_ms": 12})), "12 ms");
    }
}
