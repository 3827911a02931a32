//! `warren bench SCENARIO`.

use std::path::PathBuf;

use warren_bench::{Options, Scenario, TrackerOptions};
use warren_core::Config;
use warren_tracker::Backend;

use crate::cli::{BenchArgs, BenchScenario};

pub async fn run(
    config: &Config,
    config_path: Option<PathBuf>,
    args: BenchArgs,
) -> anyhow::Result<i32> {
    let scenario = match args.scenario {
        BenchScenario::Throughput => Scenario::Throughput,
        BenchScenario::Latency => Scenario::Latency,
        BenchScenario::Delay => Scenario::Delay,
        BenchScenario::Hold => Scenario::Hold,
        BenchScenario::Memory => Scenario::Memory,
        BenchScenario::Scaling => Scenario::Scaling,
        BenchScenario::Tracker => Scenario::Tracker,
        BenchScenario::Transfer => Scenario::Transfer,
        BenchScenario::Published => Scenario::Published,
        BenchScenario::Chord => Scenario::Chord,
        BenchScenario::All => Scenario::All,
    };
    anyhow::ensure!(args.n >= 2, "--n must be at least 2");
    anyhow::ensure!(
        args.rate > 0.0 && args.duration > 0.0,
        "--rate and --duration must be positive"
    );
    let opts = Options {
        n: args.n,
        rate: args.rate,
        duration_s: args.duration,
        concurrency: args.concurrency,
        baseline_prefetch: args.baseline_prefetch.max(1),
        hold: args.hold.max(1),
        rounds: args.rounds.max(1),
        transfer_mb: args.transfer_mb.max(1),
        tracker: TrackerOptions {
            events: args.tracker_events.max(2),
            tasks: args.tracker_tasks.max(1),
            status_runs: args.tracker_status_runs.max(1),
            postgres_url: args.tracker_postgres,
            backends: args
                .tracker_backends
                .iter()
                .map(|b| match b.as_str() {
                    "postgres" => Backend::Postgres,
                    _ => Backend::Sqlite,
                })
                .collect(),
        },
        config_path,
    };
    let rows = warren_bench::run(config, scenario, &opts).await?;
    if args.json {
        for r in &rows {
            println!(
                "{}",
                serde_json::json!({
                    "scenario": r.scenario, "metric": r.metric, "unit": r.unit,
                    "warren": r.warren, "baseline": r.baseline, "ratio": r.ratio(),
                })
            );
        }
    } else {
        print!("{}", warren_bench::table(&rows));
    }
    Ok(0)
}
