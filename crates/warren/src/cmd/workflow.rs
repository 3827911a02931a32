//! `warren workflow`: start a chain or group from JSON, show a workflow's
//! state from the tracker's database, cancel it (contract section 8).

use std::io::Read;

use anyhow::Context;
use warren_client::workflow::step_request;
use warren_client::{Chord, Client, WorkflowSpec};
use warren_core::Config;
use warren_tracker::{OpenMode, Store};

use crate::cli::WorkflowAction;

/// Most tasks `status` lists.
const LIST_LIMIT: i64 = 1000;

pub async fn run(config: &Config, action: WorkflowAction) -> anyhow::Result<i32> {
    match action {
        WorkflowAction::Start { file } => start(config, &file).await,
        WorkflowAction::Status { workflow_id, json } => status(config, &workflow_id, json).await,
        WorkflowAction::Cancel { workflow_id } => {
            let client = Client::connect(config).await?;
            client.cancel(&workflow_id).await?;
            println!("cancel sent for workflow {workflow_id}");
            Ok(0)
        }
    }
}

async fn start(config: &Config, file: &str) -> anyhow::Result<i32> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("read the workflow from stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {file}"))?
    };
    let spec = WorkflowSpec::from_json(&text)?;
    if let WorkflowSpec::Chord {
        chord,
        tasks,
        callback,
    } = &spec
    {
        let mut c = Chord::new(chord.clone(), callback.clone());
        for t in tasks {
            c = c.task(step_request(t));
        }
        c.start()?;
        c.requests()?;
        let client = Client::connect(config).await?;
        let ids = client.publish_chord(&c).await?;
        println!("workflow {chord}");
        println!("{}", ids.join(" "));
        println!("callback {}", c.callback_id());
        return Ok(0);
    }
    let chains = spec.chains()?;
    // Checked (and ids fixed) before anything is sent.
    let reqs = chains
        .iter()
        .map(|c| c.request())
        .collect::<Result<Vec<_>, _>>()?;
    let client = Client::connect(config).await?;
    let ids = client.publish_batch(&reqs, 256, |_| {}).await?;
    let workflow_id = match &spec {
        WorkflowSpec::Group { group, .. } | WorkflowSpec::Chord { chord: group, .. } => {
            group.clone()
        }
        WorkflowSpec::Chain { workflow_id, .. } => {
            workflow_id.clone().unwrap_or_else(|| ids[0].clone())
        }
    };
    println!("workflow {workflow_id}");
    for (c, id) in chains.iter().zip(&ids) {
        println!("{}", c.ids(id).join(" "));
    }
    Ok(0)
}

async fn status(config: &Config, workflow_id: &str, json: bool) -> anyhow::Result<i32> {
    let store = Store::open(&config.tracker.database_url, OpenMode::Existing).await?;
    let counts = store.workflow_counts(workflow_id).await;
    let rows = store.workflow(workflow_id, LIST_LIMIT).await;
    store.close().await;
    let (counts, rows) = (counts?, rows?);
    if counts.is_empty() {
        eprintln!("no workflow {workflow_id:?} in the tracker (unknown, not seen yet, or pruned)");
        return Ok(1);
    }
    let view = warren_tracker::record::workflow_view(workflow_id, &counts, &rows);
    if json {
        println!("{view}");
    } else {
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!(
            "workflow {workflow_id}: {} tasks ({})",
            view["total"],
            counts.join(", ")
        );
        println!(
            "{:<40}  {:<16}  {:<10}  {:<40}  REASON",
            "ID", "TYPE", "STATE", "PARENT"
        );
        for r in &rows {
            println!(
                "{:<40}  {:<16}  {:<10}  {:<40}  {}",
                r.task_id,
                r.task_type,
                r.state,
                r.parent_id.as_deref().unwrap_or("-"),
                r.reason.as_deref().unwrap_or("")
            );
        }
    }
    Ok(if view["done"] == true { 0 } else { 3 })
}
