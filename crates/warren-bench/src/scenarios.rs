//! The benchmark scenarios. Each returns rows for the report.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use rand::Rng;
use serde_json::json;
use tokio::sync::mpsc;
use warren_client::{EventWatch, TaskRequest};
use warren_core::{headers, Config, TaskState};

use crate::env::{BenchEnv, ConfirmWindow};
use crate::procstat::{Spent, Stopwatch};
use crate::report::Row;
use crate::stats::{summarize, Summary};
use crate::{baseline, procstat, Options};

const MB: f64 = 1024.0 * 1024.0;

/// A progress bar of `len` steps labelled `msg`, as every scenario shows it.
pub(crate) fn bar(len: u64, msg: &'static str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:22} [{bar:30}] {pos}/{len} {per_sec}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}

fn wall_ms() -> f64 {
    Utc::now().timestamp_micros() as f64 / 1000.0
}

fn at_ms(at: &str) -> f64 {
    DateTime::parse_from_rfc3339(at)
        .map(|t| t.timestamp_millis() as f64)
        .unwrap_or(f64::NAN)
}

/// Waits for `n` events; returns (first, last) arrival instants.
pub(crate) async fn count_events(
    watch: &mut EventWatch,
    n: usize,
    idle_limit: Duration,
    b: &ProgressBar,
) -> anyhow::Result<(Instant, Instant)> {
    let mut first = None;
    let mut last = Instant::now();
    let mut seen = 0;
    while seen < n {
        match watch.next(idle_limit).await? {
            Some(_) => {
                seen += 1;
                last = Instant::now();
                first.get_or_insert(last);
                b.inc(1);
            }
            None => bail!("only {seen} of {n} tasks finished: nothing for {idle_limit:?}"),
        }
    }
    b.finish_and_clear();
    Ok((first.unwrap_or(last), last))
}

pub(crate) fn worker_vars(opts: &Options) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    if let Some(c) = opts.concurrency {
        v.push(("WARREN__WORKER__CONCURRENCY", c.to_string()));
        v.push(("WARREN__WORKER__PREFETCH", (c * 2).max(1).to_string()));
    }
    v
}

/// One drain measurement: publish rate, drain rate and CPU per task.
struct Drain {
    publish_per_s: f64,
    publish_cpu_us: f64,
    drain_per_s: f64,
    cpu_ms_per_task: f64,
    peak_rss_mb: f64,
}

async fn drain_warren(base: &Config, opts: &Options) -> anyhow::Result<Drain> {
    let n = opts.n;
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let watch = env.client.watch(&["succeeded.diag.echo"]).await?;
    let reqs: Vec<TaskRequest> = (0..n)
        .map(|i| TaskRequest::new("diag.echo", json!({ "i": i })))
        .collect();
    let b = bar(n as u64, "warren: publish");
    let clock = Stopwatch::start();
    env.client
        .publish_batch(&reqs, 512, |k| b.set_position(k as u64))
        .await?;
    let publish = clock.stop();
    b.finish_and_clear();
    let pid = env.spawn(&["worker", "--queues", "diag"], &worker_vars(opts))?;
    finish_drain(env, watch, pid, n, publish, "warren: drain").await
}

/// Waits for the `n` events of a drain, samples the worker, cleans up.
async fn finish_drain(
    mut env: BenchEnv,
    mut watch: EventWatch,
    pid: u32,
    n: usize,
    publish: Spent,
    label: &'static str,
) -> anyhow::Result<Drain> {
    let b = bar(n as u64, label);
    let (first, last) = count_events(&mut watch, n, Duration::from_secs(30), &b).await?;
    let sample = procstat::sample(pid).context("sample the worker")?;
    env.stop(pid).await;
    drop(watch);
    env.cleanup().await?;
    Ok(Drain {
        publish_per_s: n as f64 / publish.secs,
        publish_cpu_us: publish.cpu_s * 1e6 / n as f64,
        drain_per_s: (n.max(2) - 1) as f64 / (last - first).as_secs_f64().max(1e-9),
        cpu_ms_per_task: sample.cpu_s * 1000.0 / n as f64,
        peak_rss_mb: sample.hwm as f64 / MB,
    })
}

async fn drain_baseline(base: &Config, opts: &Options) -> anyhow::Result<Drain> {
    let n = opts.n;
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let names = env.names();
    let watch = env.client.watch(&["succeeded.diag.echo"]).await?;
    let publish = baseline::publish(
        env.config.broker.url.expose(),
        &names.tasks(),
        "diag.echo",
        n,
        512,
        |i| {
            (
                uuid::Uuid::now_v7().to_string(),
                serde_json::to_vec(&json!({ "i": i })).expect("JSON"),
            )
        },
    )
    .await?;
    let prefetch = opts.baseline_prefetch;
    let pid = env.spawn(
        &[
            "bench-baseline-worker",
            "--queue",
            &names.work_queue("diag"),
            "--events",
            &names.events(),
            "--prefetch",
            &prefetch.to_string(),
        ],
        &[],
    )?;
    finish_drain(env, watch, pid, n, publish, "baseline: drain").await
}

fn best(a: Option<Drain>, b: Drain) -> Drain {
    match a {
        None => b,
        Some(a) => Drain {
            publish_per_s: a.publish_per_s.max(b.publish_per_s),
            publish_cpu_us: a.publish_cpu_us.min(b.publish_cpu_us),
            drain_per_s: a.drain_per_s.max(b.drain_per_s),
            cpu_ms_per_task: a.cpu_ms_per_task.min(b.cpu_ms_per_task),
            peak_rss_mb: a.peak_rss_mb.min(b.peak_rss_mb),
        },
    }
}

/// One drain with a tracker running, `P.tracker.published` on or off.
async fn drain_tracked(base: &Config, opts: &Options, published: bool) -> anyhow::Result<Drain> {
    let n = opts.n;
    let mut config = base.clone();
    config.tracker.track_published = published;
    let mut env = BenchEnv::new(&config, opts.config_path.clone()).await?;
    let dir = std::env::temp_dir().join(format!("warren-bench-published-{}", env.config.prefix));
    let tracker = env.spawn(
        &["tracker"],
        &[
            (
                "WARREN__TRACKER__DATABASE_URL",
                format!("sqlite://{}/tracker.db", dir.display()),
            ),
            ("WARREN__TRACKER__LISTEN", "127.0.0.1:0".to_owned()),
            ("WARREN__TRACKER__OPEN", "true".to_owned()),
            ("WARREN__TRACKER__TRACK_PUBLISHED", published.to_string()),
        ],
    )?;
    let watch = env.client.watch(&["succeeded.diag.echo"]).await?;
    let reqs: Vec<TaskRequest> = (0..n)
        .map(|i| TaskRequest::new("diag.echo", json!({ "i": i })))
        .collect();
    let label = if published {
        "on: publish"
    } else {
        "off: publish"
    };
    let b = bar(n as u64, label);
    let clock = Stopwatch::start();
    env.client
        .publish_batch(&reqs, 512, |k| b.set_position(k as u64))
        .await?;
    let publish = clock.stop();
    b.finish_and_clear();
    let pid = env.spawn(&["worker", "--queues", "diag"], &worker_vars(opts))?;
    let events_queue = format!("{}.tracker.events", env.config.prefix);
    let cfg = env.config.clone();
    let label = if published { "on: drain" } else { "off: drain" };
    let d = finish_drain(env, watch, pid, n, publish, label).await;
    // finish_drain's cleanup stopped the tracker with the other children.
    let _ = tracker;
    let _ = crate::tracker::delete_queue(&cfg, &events_queue).await;
    let _ = std::fs::remove_dir_all(&dir);
    d
}

/// Scenario `published`: the cost of `tracker.track_published`. A tracker
/// runs in both; drain and publish of --n tasks with the copies in
/// `P.tracker.published` on and off, alternating over the rounds (best of
/// each), the "baseline" column being off.
pub async fn published(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let mut on: Option<Drain> = None;
    let mut off: Option<Drain> = None;
    for round in 0..opts.rounds.max(1) {
        if round % 2 == 0 {
            off = Some(best(off, drain_tracked(base, opts, false).await?));
            on = Some(best(on, drain_tracked(base, opts, true).await?));
        } else {
            on = Some(best(on, drain_tracked(base, opts, true).await?));
            off = Some(best(off, drain_tracked(base, opts, false).await?));
        }
    }
    let (on, off) = (on.expect("one round"), off.expect("one round"));
    let s = "published";
    Ok(vec![
        Row::vs(
            s,
            "publish with confirms, copies on vs off",
            "tasks/s",
            on.publish_per_s,
            off.publish_per_s,
        ),
        Row::vs(
            s,
            "worker drain with a tracker, copies on vs off",
            "tasks/s",
            on.drain_per_s,
            off.drain_per_s,
        ),
    ])
}

/// Scenario `throughput` (with its baseline): publish rate with confirms,
/// preloaded-queue drain rate, CPU per task.
pub async fn throughput(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    // Alternate baseline and Warren, and which goes first, best of each over
    // the rounds, so neither side always follows the other's cleanup (the
    // broker compacts its store after a drain) or gets its warmer moments.
    let mut w: Option<Drain> = None;
    let mut b: Option<Drain> = None;
    for round in 0..opts.rounds.max(1) {
        if round % 2 == 0 {
            b = Some(best(b, drain_baseline(base, opts).await?));
            w = Some(best(w, drain_warren(base, opts).await?));
        } else {
            w = Some(best(w, drain_warren(base, opts).await?));
            b = Some(best(b, drain_baseline(base, opts).await?));
        }
    }
    let (w, b) = (w.expect("one round"), b.expect("one round"));
    let s = "throughput";
    Ok(vec![
        Row::vs(
            s,
            "publish with confirms",
            "tasks/s",
            w.publish_per_s,
            b.publish_per_s,
        ),
        Row::vs(
            s,
            "publisher CPU per task",
            "us",
            w.publish_cpu_us,
            b.publish_cpu_us,
        ),
        Row::vs(
            s,
            "worker drain, events confirmed before ack",
            "tasks/s",
            w.drain_per_s,
            b.drain_per_s,
        ),
        Row::vs(
            s,
            "worker CPU per task",
            "ms",
            w.cpu_ms_per_task,
            b.cpu_ms_per_task,
        ),
        Row::vs(s, "worker peak RSS", "MB", w.peak_rss_mb, b.peak_rss_mb),
    ])
}

/// Publishes `n` tasks at `rate`/s on one confirm channel, recording each
/// send time; confirms are awaited on another task so pacing holds.
async fn paced_publish(
    env: &BenchEnv,
    n: usize,
    rate: f64,
    exchange: &str,
    mut make: impl FnMut(usize) -> (String, Vec<u8>, BasicProperties),
) -> anyhow::Result<HashMap<String, f64>> {
    let ch = env.client.channel().await?;
    let (tx, mut rx) = mpsc::channel::<lapin::PublisherConfirm>(100_000);
    let confirms = tokio::spawn(async move {
        while let Some(c) = rx.recv().await {
            c.await?;
        }
        Ok::<_, lapin::Error>(())
    });
    let mut sent = HashMap::with_capacity(n);
    let start = tokio::time::Instant::now();
    let b = bar(n as u64, "paced publish");
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let (id, body, props) = make(i);
        sent.insert(id, wall_ms());
        let c = ch.send(exchange, "diag.echo", &body, props).await?;
        tx.send(c).await.context("confirm collector stopped")?;
        b.inc(1);
    }
    drop(tx);
    confirms.await??;
    b.finish_and_clear();
    Ok(sent)
}

fn task_props(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(id.into())
}

/// Latencies from send to start and to the final event.
async fn latency_run(
    base: &Config,
    opts: &Options,
    raw: bool,
) -> anyhow::Result<(Summary, Summary)> {
    let n = (opts.rate * opts.duration_s) as usize;
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let names = env.names();
    let mut watch = env
        .client
        .watch(&["started.diag.echo", "succeeded.diag.echo"])
        .await?;
    let pid = if raw {
        env.spawn(
            &[
                "bench-baseline-worker",
                "--queue",
                &names.work_queue("diag"),
                "--events",
                &names.events(),
                "--prefetch",
                &opts.baseline_prefetch.to_string(),
            ],
            &[],
        )?
    } else {
        env.spawn(&["worker", "--queues", "diag"], &worker_vars(opts))?
    };
    // Warm-up: one task through, so the worker is consuming before timing starts.
    env.client
        .publish(&TaskRequest::new("diag.echo", json!({})).id("warmup"))
        .await?;
    loop {
        match watch.next(Duration::from_secs(30)).await? {
            Some(e) if e.event.task_id == "warmup" && e.event.state == TaskState::Succeeded => {
                break
            }
            Some(_) => {}
            None => bail!("the worker did not start within 30 s"),
        }
    }
    let tasks = names.tasks();
    let collector = async {
        let mut starts = HashMap::new();
        let mut finals = HashMap::new();
        while finals.len() < n {
            let Some(e) = watch.next(Duration::from_secs(30)).await? else {
                bail!("only {} of {n} tasks finished", finals.len());
            };
            // Starts come from the worker's clock at millisecond resolution
            // (the event's `at`); finals are when the event reached us.
            let at = at_ms(&e.event.at);
            match e.event.state {
                TaskState::Started => {
                    starts.insert(e.event.task_id, at);
                }
                TaskState::Succeeded => {
                    finals.insert(e.event.task_id, wall_ms());
                }
                _ => {}
            }
        }
        Ok((starts, finals))
    };
    let publisher = paced_publish(&env, n, opts.rate, &tasks, |i| {
        let id = format!("lat-{i}");
        let props = task_props(&id);
        (id, b"{}".to_vec(), props)
    });
    let (sent, collected) = tokio::join!(publisher, collector);
    let sent = sent?;
    let (starts, finals) = collected?;
    let lat = |m: &HashMap<String, f64>, floor: bool| {
        summarize(
            m.iter()
                .filter_map(|(id, at)| {
                    let s = sent.get(id)?;
                    let s = if floor { s.floor() } else { *s };
                    Some((at - s).max(0.0))
                })
                .collect(),
        )
    };
    let out = (lat(&starts, true), lat(&finals, false));
    env.stop(pid).await;
    drop(watch);
    env.cleanup().await?;
    Ok(out)
}

/// Scenario `latency` (with its baseline): fixed rate, enqueue→start and
/// enqueue→final-event percentiles.
pub async fn latency(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    // Rounds alternate Warren and the baseline; each side's round with the
    // lowest enqueue->start p99 is reported, as throughput reports the best.
    let mut warren: Option<(Summary, Summary)> = None;
    let mut baseline: Option<(Summary, Summary)> = None;
    for round in 0..opts.rounds.max(1) {
        for is_baseline in [round % 2 == 1, round % 2 == 0] {
            let run = latency_run(base, opts, is_baseline).await?;
            let best = if is_baseline {
                &mut baseline
            } else {
                &mut warren
            };
            if best.as_ref().is_none_or(|b| run.0.p99 < b.0.p99) {
                *best = Some(run);
            }
        }
    }
    let ((ws, wf), (bs, bf)) = (
        warren.expect("at least one round"),
        baseline.expect("at least one round"),
    );
    let s = format!("latency @{}/s", opts.rate);
    Ok(vec![
        Row::vs(&s, "enqueue->start p50", "ms", ws.p50, bs.p50),
        Row::vs(&s, "enqueue->start p99", "ms", ws.p99, bs.p99),
        Row::vs(&s, "enqueue->start p99.9", "ms", ws.p999, bs.p999),
        Row::vs(&s, "enqueue->start max", "ms", ws.max, bs.max),
        Row::vs(&s, "enqueue->final p50", "ms", wf.p50, bf.p50),
        Row::vs(&s, "enqueue->final p99", "ms", wf.p99, bf.p99),
        Row::vs(&s, "enqueue->final p99.9", "ms", wf.p999, bf.p999),
    ])
}

fn delay_props(id: &str, header: (&str, AMQPValue)) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(header.0.into(), header.1);
    task_props(id).with_headers(h)
}

/// Scenario `delay`: delayed tasks at a fixed rate with due times spread over
/// 1–5 s ahead; lateness of the start after the due time, and early starts.
///
/// Each task names its due time in `x-warren-eta` (Unix ms), so lateness is
/// measured from the time the producer asked for, intake included, and only
/// `started` events are watched.
pub async fn delay(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let n = (opts.rate * opts.duration_s) as usize;
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let names = env.names();
    let mut watch = env.client.watch(&["started.diag.echo"]).await?;
    env.spawn(&["scheduler"], &[])?;
    env.spawn(&["worker", "--queues", "diag"], &worker_vars(opts))?;
    let exchange = names.delay();
    let collector = async {
        let mut started = HashMap::with_capacity(n);
        while started.len() < n {
            let Some(e) = watch.next(Duration::from_secs(30)).await? else {
                bail!("only {} of {n} delayed tasks started", started.len());
            };
            if e.event.state == TaskState::Started {
                started.insert(e.event.task_id, at_ms(&e.event.at));
            }
        }
        Ok(started)
    };
    let mut rng = rand::thread_rng();
    let mut due = HashMap::with_capacity(n);
    let publisher = paced_publish(&env, n, opts.rate, &exchange, |i| {
        let id = format!("delay-{i}");
        let eta = Utc::now().timestamp_millis() + rng.gen_range(1000..=5000);
        due.insert(id.clone(), eta as f64);
        let props = delay_props(&id, (headers::ETA, AMQPValue::LongLongInt(eta)));
        (id, b"{}".to_vec(), props)
    });
    let (sent, collected) = tokio::join!(publisher, collector);
    sent?;
    let started = collected?;
    let lateness: Vec<f64> = started
        .iter()
        .filter_map(|(id, s)| due.get(id).map(|d| s - d))
        .collect();
    let early = lateness.iter().filter(|l| **l < 0.0).count();
    let sum = summarize(lateness);
    env.cleanup().await?;
    let s = format!("delay @{}/s", opts.rate);
    Ok(vec![
        Row::new(&s, "lateness p50", "ms", sum.p50),
        Row::new(&s, "lateness p99", "ms", sum.p99),
        Row::new(&s, "lateness max", "ms", sum.max),
        Row::new(&s, "tasks started early", "count", early as f64),
    ])
}

/// Scenario `hold`: many delayed tasks waiting at once; scheduler RSS while
/// it holds them, and the release rate when they all come due.
pub async fn hold(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let n = opts.hold;
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let names = env.names();
    let pid = env.spawn(&["scheduler"], &[])?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start = procstat::sample(pid)
        .map(|s| s.rss as f64 / MB)
        .unwrap_or(0.0);
    // Every task comes due at the same moment, after publishing and the hops.
    let hold_s = 30.0 + n as f64 / 4000.0;
    let due_ms = Utc::now().timestamp_millis() + (hold_s * 1000.0) as i64;
    let sampler = {
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let h = tokio::spawn(async move {
            // (before the due time, during the release)
            let mut max = (0.0f64, 0.0f64);
            while !s.is_cancelled() {
                if let Some(x) = procstat::sample(pid) {
                    let mb = x.rss as f64 / MB;
                    if Utc::now().timestamp_millis() < due_ms {
                        max.0 = max.0.max(mb);
                    } else {
                        max.1 = max.1.max(mb);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            max
        });
        (stop, h)
    };
    let ch = env.client.channel().await?;
    let mut confirms = ConfirmWindow::new(512, bar(n as u64, "hold: publish"));
    let exchange = names.delay();
    for i in 0..n {
        let id = format!("hold-{i}");
        let props = delay_props(&id, ("x-warren-eta", AMQPValue::LongLongInt(due_ms)));
        confirms
            .push(ch.send(&exchange, "diag.echo", b"{}", props).await?)
            .await?;
    }
    confirms.finish().await?;
    let work = names.work_queue("diag");
    let b = bar(n as u64, "hold: released");
    let release_deadline = Instant::now() + Duration::from_secs_f64(hold_s + 600.0);
    let mut first_release = None;
    loop {
        let d = env.depth(&work).await? as usize;
        b.set_position(d as u64);
        if d > 0 && first_release.is_none() {
            first_release = Some(Instant::now());
        }
        if d >= n {
            break;
        }
        if Instant::now() > release_deadline {
            bail!("only {d} of {n} held tasks were released");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let released = Instant::now();
    b.finish_and_clear();
    sampler.0.cancel();
    let (rss_holding, rss_release) = sampler.1.await.unwrap_or((0.0, 0.0));
    let release_s = (released - first_release.unwrap_or(released))
        .as_secs_f64()
        .max(1e-3);
    env.cleanup().await?;
    let s = format!("hold {n}");
    Ok(vec![
        Row::new(&s, "scheduler RSS at start", "MB", rss_start),
        Row::new(
            &s,
            "scheduler RSS max while holding",
            "MB",
            rss_holding.max(rss_start),
        ),
        Row::new(&s, "scheduler RSS max during release", "MB", rss_release),
        Row::new(&s, "release rate when due", "tasks/s", n as f64 / release_s),
    ])
}

/// Scenario `memory`: worker RSS idle and with 256 sleeping tasks in flight.
pub async fn memory(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let mut watch = env
        .client
        .watch(&["started.diag.sleep", "succeeded.diag.sleep"])
        .await?;
    let vars = vec![
        ("WARREN__WORKER__CONCURRENCY", "256".to_owned()),
        ("WARREN__WORKER__PREFETCH", "256".to_owned()),
    ];
    let pid = env.spawn(&["worker", "--queues", "diag"], &vars)?;
    // Settle after start-up before reading the idle figure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = procstat::sample(pid).context("sample the worker")?;
    let reqs: Vec<TaskRequest> = (0..256)
        .map(|_| TaskRequest::new("diag.sleep", json!({ "ms": 4000 })))
        .collect();
    env.client.publish_batch(&reqs, 256, |_| {}).await?;
    let mut started = 0;
    while started < 256 {
        match watch.next(Duration::from_secs(30)).await? {
            Some(e) if e.event.state == TaskState::Started => started += 1,
            Some(_) => {}
            None => bail!("only {started} of 256 tasks started"),
        }
    }
    let busy = procstat::sample(pid).context("sample the worker")?;
    let mut done = 0;
    while done < 256 {
        match watch.next(Duration::from_secs(30)).await? {
            Some(e) if e.event.state == TaskState::Succeeded => done += 1,
            Some(_) => {}
            None => bail!("only {done} of 256 tasks finished"),
        }
    }
    env.stop(pid).await;
    drop(watch);
    env.cleanup().await?;
    Ok(vec![
        Row::new("memory", "worker RSS idle", "MB", idle.rss as f64 / MB),
        Row::new(
            "memory",
            "worker RSS, 256 tasks in flight",
            "MB",
            busy.rss as f64 / MB,
        ),
    ])
}

/// One drain of the chord scenario: --n diag.echo tasks published (plain,
/// or as the members of one chord whose callback is a diag.echo), then a
/// worker started; a scheduler runs in both, as a chord needs one.
struct ChordDrain {
    publish_per_s: f64,
    drain_per_s: f64,
    cpu_ms_per_task: f64,
    /// The scheduler's CPU over the whole run (it folds the chord's join).
    scheduler_cpu_ms: f64,
    /// Chord only: the callback's `started` event's time minus the latest
    /// member's final event's time (both the worker's clock, ms).
    callback_gap_ms: Option<f64>,
    /// Chord only: the same gap as the events reached the bench.
    callback_gap_arrival_ms: Option<f64>,
}

async fn chord_drain(base: &Config, opts: &Options, as_chord: bool) -> anyhow::Result<ChordDrain> {
    let n = opts.n;
    let mut env = BenchEnv::new(base, opts.config_path.clone()).await?;
    let names = env.names();
    let mut watch = env.client.watch(&["*.diag.echo"]).await?;
    let scheduler = env.spawn(&["scheduler"], &[])?;
    let chord_id = format!("bench-chord-{}", &env.config.prefix);
    let members: Vec<TaskRequest> = (0..n)
        .map(|i| TaskRequest::new("diag.echo", json!({ "i": i })))
        .collect();
    let chord = warren_client::Chord {
        id: chord_id.clone(),
        members,
        callback: warren_client::Step::new("diag.echo", json!({ "callback": true })),
    };
    let callback_id = chord.callback_id();
    let b = bar(
        n as u64,
        if as_chord {
            "chord: publish"
        } else {
            "plain: publish"
        },
    );
    let clock = Stopwatch::start();
    if as_chord {
        env.client.publish_chord(&chord).await?;
    } else {
        env.client
            .publish_batch(&chord.members, 256, |k| b.set_position(k as u64))
            .await?;
    }
    let publish = clock.stop();
    b.finish_and_clear();
    // The chord's start is taken by the scheduler before the worker starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.depth(&names.chords()).await? > 0 {
        if Instant::now() > deadline {
            bail!("the scheduler did not take the chord's start within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = env.spawn(&["worker", "--queues", "diag"], &worker_vars(opts))?;
    let b = bar(
        n as u64,
        if as_chord {
            "chord: drain"
        } else {
            "plain: drain"
        },
    );
    let (mut first, mut last) = (None, Instant::now());
    let mut finals = 0usize;
    let mut last_final_at = f64::MIN;
    let mut gap = None;
    let mut callback_final = None;
    let idle = Duration::from_secs(60);
    while finals < n || (as_chord && callback_final.is_none()) {
        let Some(e) = watch.next(idle).await? else {
            bail!(
                "only {finals} of {n} tasks finished, callback seen: {}: nothing for {idle:?}",
                gap.is_some()
            );
        };
        let ev = &e.event;
        if ev.task_id == callback_id {
            if ev.state == TaskState::Started && gap.is_none() {
                gap = Some((at_ms(&ev.at), Instant::now()));
            }
            if ev.state.is_final() {
                callback_final = Some((ev.state, ev.reason.clone()));
            }
            continue;
        }
        if !matches!(
            ev.state,
            TaskState::Succeeded | TaskState::Dead | TaskState::Cancelled
        ) {
            continue;
        }
        finals += 1;
        last = Instant::now();
        first.get_or_insert(last);
        last_final_at = last_final_at.max(at_ms(&ev.at));
        b.inc(1);
    }
    b.finish_and_clear();
    // The callback ran with its n results, and succeeded.
    if let Some((state, reason)) = callback_final {
        if state != TaskState::Succeeded {
            bail!("the chord's callback ended {state:?} ({reason:?})");
        }
    }
    let sample = procstat::sample(pid).context("sample the worker")?;
    let folder = procstat::sample(scheduler).context("sample the scheduler")?;
    env.stop(pid).await;
    env.stop(scheduler).await;
    drop(watch);
    env.cleanup().await?;
    if as_chord {
        // The scheduler deletes the chord's queue once the callback is out;
        // if it did not get there, delete it here.
        let _ = crate::tracker::delete_queue(base, &names.chord_queue(&chord_id)).await;
    }
    let first = first.unwrap_or(last);
    Ok(ChordDrain {
        publish_per_s: n as f64 / publish.secs,
        drain_per_s: (n.max(2) - 1) as f64 / (last - first).as_secs_f64().max(1e-9),
        cpu_ms_per_task: sample.cpu_s * 1000.0 / n as f64,
        scheduler_cpu_ms: folder.cpu_s * 1000.0,
        callback_gap_ms: gap.map(|(at, _)| at - last_final_at),
        callback_gap_arrival_ms: gap
            .map(|(_, arrived)| arrived.saturating_duration_since(last).as_secs_f64() * 1000.0),
    })
}

/// Scenario `chord` (issue 21 item 7): a chord of --n diag.echo members
/// (at most 10,000) beside --n plain diag.echo tasks, same worker settings
/// and a scheduler in both, alternating over the rounds: publish and drain
/// rates (best of each), and per round the time from the latest member's
/// final event to the callback's `started` event.
pub async fn chord(base: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    if opts.n == 0 || opts.n > warren_core::chord::MAX_MEMBERS {
        bail!(
            "--n must be 1..={} for the chord scenario",
            warren_core::chord::MAX_MEMBERS
        );
    }
    let mut plain: Vec<ChordDrain> = Vec::new();
    let mut chord: Vec<ChordDrain> = Vec::new();
    for round in 0..opts.rounds.max(1) {
        if round % 2 == 0 {
            plain.push(chord_drain(base, opts, false).await?);
            chord.push(chord_drain(base, opts, true).await?);
        } else {
            chord.push(chord_drain(base, opts, true).await?);
            plain.push(chord_drain(base, opts, false).await?);
        }
    }
    let max =
        |v: &[ChordDrain], f: fn(&ChordDrain) -> f64| v.iter().map(f).fold(f64::MIN, f64::max);
    let min =
        |v: &[ChordDrain], f: fn(&ChordDrain) -> f64| v.iter().map(f).fold(f64::MAX, f64::min);
    let s = "chord";
    let mut rows = vec![
        Row::vs(
            s,
            "publish with confirms (chord vs plain)",
            "tasks/s",
            max(&chord, |d| d.publish_per_s),
            max(&plain, |d| d.publish_per_s),
        ),
        Row::vs(
            s,
            "worker drain (chord members vs plain)",
            "tasks/s",
            max(&chord, |d| d.drain_per_s),
            max(&plain, |d| d.drain_per_s),
        ),
        Row::vs(
            s,
            "worker CPU per task (chord vs plain)",
            "ms",
            min(&chord, |d| d.cpu_ms_per_task),
            min(&plain, |d| d.cpu_ms_per_task),
        ),
        Row::vs(
            s,
            "scheduler CPU for the run (chord vs plain)",
            "ms",
            min(&chord, |d| d.scheduler_cpu_ms),
            min(&plain, |d| d.scheduler_cpu_ms),
        ),
    ];
    for (k, d) in chord.iter().enumerate() {
        if let (Some(at), Some(arrival)) = (d.callback_gap_ms, d.callback_gap_arrival_ms) {
            rows.push(Row::new(
                s,
                &format!(
                    "round {}: last member final -> callback started (event times)",
                    k + 1
                ),
                "ms",
                at,
            ));
            rows.push(Row::new(
                s,
                &format!("round {}: the same, as the events arrived", k + 1),
                "ms",
                arrival,
            ));
        }
    }
    Ok(rows)
}
