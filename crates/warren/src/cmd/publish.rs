//! `warren publish TYPE ARGS [--wait] [--count N]`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use warren_client::{Client, TaskRequest};
use warren_core::Config;

use crate::cli::PublishArgs;

pub async fn run(config: &Config, args: PublishArgs) -> anyhow::Result<i32> {
    let json: serde_json::Value = serde_json::from_str(&args.args)
        .with_context(|| format!("ARGS {:?} is not valid JSON", abbreviate(&args.args)))?;
    let mut base = TaskRequest::new(args.task_type.clone(), json);
    base.priority = args.priority;
    base.expiration_ms = args.expiration_ms;
    base.delay_ms = args.delay_ms;
    base.eta = args.eta.clone();
    for h in &args.headers {
        let Some((k, v)) = h.split_once('=') else {
            bail!("--header {h:?} must be KEY=VALUE");
        };
        base = match v.parse::<i64>() {
            Ok(i) => base.header_int(k, i),
            Err(_) => base.header_str(k, v),
        };
    }
    let client = Client::connect(config).await?;
    let timeout = Duration::from_millis(args.timeout_ms);

    if args.count == 1 {
        if let Some(id) = &args.id {
            base = base.id(id.clone());
        }
        if !args.wait {
            println!("{}", client.publish(&base).await?);
            return Ok(0);
        }
        let event = client.call(&base, timeout).await?;
        println!("{}", serde_json::to_string(&event)?);
        return Ok(if event.state == warren_core::TaskState::Succeeded {
            0
        } else {
            1
        });
    }

    let reqs: Vec<TaskRequest> = (0..args.count)
        .map(|n| {
            let r = base.clone();
            match &args.id {
                Some(id) => r.id(format!("{id}-{n}")),
                None => r,
            }
        })
        .collect();
    let watch = if args.wait {
        Some(
            client
                .watch(&[
                    &format!("succeeded.{}", args.task_type),
                    &format!("dead.{}", args.task_type),
                    &format!("cancelled.{}", args.task_type),
                ])
                .await?,
        )
    } else {
        None
    };
    let bar = ProgressBar::new(args.count);
    bar.set_style(
        ProgressStyle::with_template("{msg:10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message("published");
    let began = Instant::now();
    let ids = client
        .publish_batch(&reqs, 512, |n| bar.set_position(n as u64))
        .await?;
    bar.finish();
    eprintln!(
        "published {} tasks of type {} in {:.2}s",
        ids.len(),
        args.task_type,
        began.elapsed().as_secs_f64()
    );
    let Some(mut watch) = watch else {
        return Ok(0);
    };
    let mut pending: HashSet<String> = ids.into_iter().collect();
    let done = ProgressBar::new(args.count);
    done.set_style(
        ProgressStyle::with_template("{msg:10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    done.set_message("finished");
    let deadline = Instant::now() + timeout;
    let mut failed = 0u64;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(got) = watch.next(left).await? else {
            done.abandon();
            bail!(
                "{} of {} tasks had no final event within {} ms",
                pending.len(),
                args.count,
                args.timeout_ms
            );
        };
        if pending.remove(&got.event.task_id) {
            if got.event.state != warren_core::TaskState::Succeeded {
                failed += 1;
            }
            done.inc(1);
        }
    }
    done.finish();
    eprintln!(
        "all {} tasks finished in {:.2}s: {} succeeded, {} not",
        args.count,
        began.elapsed().as_secs_f64(),
        args.count - failed,
        failed
    );
    Ok(if failed == 0 { 0 } else { 1 })
}

fn abbreviate(s: &str) -> String {
    if s.chars().count() <= 60 {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(60).collect::<String>())
    }
}
