//! Warren's benchmark, run by `warren bench`.
//!
//! Every scenario runs on its own prefix against the configured broker,
//! starts real `warren` processes (and, for the baseline, a raw-lapin worker
//! with the same guarantees: persistent messages, publisher confirms, one
//! confirmed event before each ack), and deletes what it declared. Warren's
//! figures are reported beside the baseline's from the same invocation, so
//! the ratio stays honest on a noisy machine.

pub mod baseline;
mod env;
pub mod procstat;
pub mod report;
mod scaling;
mod scenarios;
pub mod stats;
mod tracker;
mod transfer;

use std::path::PathBuf;

use warren_core::Config;

pub use report::{table, Row};
pub use tracker::TrackerOptions;

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Publish rate and preloaded-queue drain rate, beside the baseline.
    Throughput,
    /// Fixed-rate latency percentiles, beside the baseline.
    Latency,
    /// Delay lateness at a fixed rate.
    Delay,
    /// Many delayed tasks held: scheduler RSS and release rate.
    Hold,
    /// Worker RSS idle and busy.
    Memory,
    /// Aggregate drain of 1, 2 and 4 workers beside the broker's ceiling
    /// (not part of `all`).
    Scaling,
    /// Tracker ingestion rate and `warren status` latency, SQLite and
    /// PostgreSQL (not part of `all`: it needs PostgreSQL and fills a
    /// database with --tracker-tasks tasks).
    Tracker,
    /// file.download and file.upload beside curl, with the worker's RSS
    /// (not part of `all`: it writes files of --transfer-mb).
    Transfer,
    /// Drain with a tracker, `tracker.track_published` on beside off
    /// (not part of `all`).
    Published,
    /// A chord of --n diag.echo members beside --n plain tasks: drain
    /// rates and the time from the last member to the callback's start
    /// (not part of `all`).
    Chord,
    /// All of the above but transfer, tracker, published and chord.
    All,
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tasks for throughput.
    pub n: usize,
    /// Tasks per second for latency and delay.
    pub rate: f64,
    /// Seconds of paced publishing for latency and delay.
    pub duration_s: f64,
    /// Worker concurrency override (prefetch = 2x).
    pub concurrency: Option<usize>,
    /// Prefetch of the raw-lapin baseline worker.
    pub baseline_prefetch: u16,
    /// Delayed tasks held in the hold scenario.
    pub hold: usize,
    /// Throughput rounds (baseline and Warren alternate; best of each).
    pub rounds: usize,
    /// MiB moved each way in the transfer scenario.
    pub transfer_mb: u64,
    /// The tracker scenario's sizes and databases.
    pub tracker: TrackerOptions,
    /// The --config file, passed on to child processes.
    pub config_path: Option<PathBuf>,
}

/// Runs a scenario (or all) and returns the rows.
pub async fn run(config: &Config, scenario: Scenario, opts: &Options) -> anyhow::Result<Vec<Row>> {
    use Scenario::*;
    let mut rows = Vec::new();
    let all = scenario == All;
    if all || scenario == Throughput {
        rows.extend(scenarios::throughput(config, opts).await?);
    }
    if all || scenario == Latency {
        rows.extend(scenarios::latency(config, opts).await?);
    }
    if all || scenario == Delay {
        rows.extend(scenarios::delay(config, opts).await?);
    }
    if all || scenario == Hold {
        rows.extend(scenarios::hold(config, opts).await?);
    }
    if all || scenario == Memory {
        rows.extend(scenarios::memory(config, opts).await?);
    }
    if scenario == Scaling {
        rows.extend(scaling::scaling(config, opts).await?);
    }
    if scenario == Tracker {
        rows.extend(tracker::tracker(config, opts).await?);
    }
    if scenario == Transfer {
        rows.extend(transfer::transfer(config, opts).await?);
    }
    if scenario == Published {
        rows.extend(scenarios::published(config, opts).await?);
    }
    if scenario == Chord {
        rows.extend(scenarios::chord(config, opts).await?);
    }
    Ok(rows)
}
