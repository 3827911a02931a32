//! Command-line flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Warren: background tasks on RabbitMQ.
///
/// Start everything on one machine with `warren up`, then publish a task with
/// `warren publish diag.echo '{"hello":"world"}' --wait`. Configuration comes
/// from config/default.toml built in, then --config FILE, then environment
/// variables WARREN__SECTION__KEY (e.g. WARREN__BROKER__URL).
#[derive(Debug, Parser)]
#[command(name = "warren", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML) layered over the built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format on stderr (log level: WARREN_LOG, e.g. WARREN_LOG=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the topology, then run the scheduler, a worker and the task
    /// tracker (dashboard on tracker.listen) in one process (a laptop, a
    /// demo). Stops cleanly on Ctrl-C or SIGTERM.
    Up(WorkerArgs),
    /// Run a worker: consume work queues and run task handlers.
    Worker(WorkerArgs),
    /// Run the scheduler: apply the topology and keep it reconciled.
    Scheduler,
    /// Show or apply the exchanges, queues and bindings computed from configuration.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Publish a task to P.tasks, or P.delay with --delay-ms/--eta (with publisher confirms).
    Publish(PublishArgs),
    /// Measure Warren beside a raw-lapin baseline on the configured broker
    /// (own prefix, cleaned up after). Prints a table, or JSON with --json.
    Bench(BenchArgs),
    /// Internal: the raw-lapin baseline worker `warren bench` starts.
    #[command(hide = true)]
    BenchBaselineWorker {
        /// Work queue to consume.
        #[arg(long)]
        queue: String,
        /// Events exchange.
        #[arg(long)]
        events: String,
        /// Prefetch.
        #[arg(long, default_value_t = 16)]
        prefetch: u16,
    },
    /// Cancel a task by id: a queued, delayed or retry-waiting task is dropped
    /// when next seen; a running one is aborted. Remembered for 24 h.
    Cancel {
        /// The task id (the message_id it was published with).
        task_id: String,
    },
    /// Change a task that waits (queued, delayed or waiting for a retry):
    /// its priority or due time. Refused for a task the tracker knows as
    /// started or finished.
    Task {
        #[command(subcommand)]
        action: TaskAction,
    },
    /// Pause a work queue or a task type across the whole fleet: workers
    /// stop taking its tasks, which wait in the broker (a paused type's in
    /// P.paused.<type>) until `warren resume`. Kept across restarts.
    Pause(PauseArgs),
    /// Resume a paused work queue or task type: workers take its tasks
    /// again (a type's parked tasks go back to their queues).
    Resume(PauseArgs),
    /// List, replay or purge the tasks parked in P.dead.
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Run the task tracker: follow every status event into its database
    /// (tracker.database_url) and serve the dashboard, JSON API, /metrics and
    /// health checks on tracker.listen (http://127.0.0.1:8089/ by default).
    /// The API and dashboard need the credentials of tracker.tokens and
    /// tracker.users, or tracker.open = true; with neither it does not start.
    Tracker,
    /// What happened to one task: its state and every event, oldest first
    /// (read from the tracker's database). Without an id: the fleet at a
    /// glance (queues, running and delayed tasks, workers alive, from the
    /// management API; failures in the last hour from the tracker's database).
    Status(StatusArgs),
    /// Tracked tasks, latest event first (read from the tracker's database).
    Tasks(TasksArgs),
    /// Start a chain or group from JSON, follow a workflow's state, or
    /// cancel it (contract section 8).
    Workflow {
        #[command(subcommand)]
        action: WorkflowAction,
    },
    /// Probe a running worker, scheduler or tracker on this host through
    /// its /healthz (or /readyz with --ready) at the configured listen
    /// address; exit 0 when it answers 200 (the image's HEALTHCHECK).
    Health(HealthArgs),
}

/// `workflow` subcommands.
#[derive(Debug, Subcommand)]
pub enum WorkflowAction {
    /// Publish a workflow described in JSON: a chain
    /// `{"chain": [step, ...], "workflow_id"?: ID}` (its first step is the
    /// first task) or a group `{"group": ID, "tasks": [step or {"chain":
    /// [...]}, ...]}`; a step is `{"type", "args"?, "id"?, "priority"?,
    /// "max_retries"?, "timeout_ms"?, "after"?, "pass_result"?}`. Prints the
    /// workflow id, then each task's id.
    Start {
        /// The JSON file, `-` for stdin.
        file: String,
    },
    /// A workflow's tasks and their count per state, from the tracker's
    /// database; exit 0 when every task reached a final state, 3 while
    /// some have not, 1 when no task of it is known.
    Status {
        /// The workflow id.
        workflow_id: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a workflow: each of its tasks not started yet is cancelled
    /// when a worker next sees it (and with it the rest of its chain).
    Cancel {
        /// The workflow id.
        workflow_id: String,
    },
}

/// `task` subcommands.
#[derive(Debug, Subcommand)]
pub enum TaskAction {
    /// Give a waiting task another priority (0..=255; its queue's
    /// x-max-priority caps it): it takes its new place when next seen.
    Reprioritize {
        /// The task id.
        task_id: String,
        /// The new priority.
        priority: u8,
        /// Send the change without asking the tracker's database for the
        /// task's state.
        #[arg(long)]
        force: bool,
    },
    /// Move a waiting task's due time, later or earlier.
    Reschedule {
        /// The task id.
        task_id: String,
        /// The new due time, RFC 3339 (2026-12-24T08:00:00Z).
        #[arg(long, group = "when")]
        at: Option<String>,
        /// The new due time, from now: milliseconds, or a number with s, m,
        /// h or d (90s, 10m, 2h, 1d).
        #[arg(long = "in", group = "when")]
        after: Option<String>,
        /// Due now.
        #[arg(long, group = "when")]
        now: bool,
        /// Send the change without asking the tracker's database.
        #[arg(long)]
        force: bool,
    },
    /// Run a waiting task now (due now): `reschedule ID --now`.
    RunNow {
        /// The task id.
        task_id: String,
        /// Send the change without asking the tracker's database.
        #[arg(long)]
        force: bool,
    },
}

/// `pause` and `resume` flags.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// What to pause or resume: a work queue ([[queues]] short name) or a
    /// task type (exact, e.g. email.send).
    #[arg(value_enum)]
    pub kind: PauseKindArg,
    /// The queue's short name or the task type.
    pub name: String,
}

/// What `pause` and `resume` apply to.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PauseKindArg {
    /// A work queue, with its priority lanes.
    Queue,
    /// A task type, whichever queue carries it.
    Type,
}

/// `health` flags.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Which process to probe: worker (worker.listen), scheduler
    /// (scheduler.listen) or tracker (tracker.listen).
    #[arg(value_enum, env = "WARREN_HEALTH_COMPONENT", default_value = "worker")]
    pub component: Component,
    /// Probe /readyz (connected to the broker, ready to work) instead of /healthz.
    #[arg(long)]
    pub ready: bool,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// A long-running Warren process with a health endpoint.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Component {
    /// `warren worker` (and `warren up`).
    Worker,
    /// `warren scheduler`.
    Scheduler,
    /// `warren tracker`.
    Tracker,
}

/// `status` flags.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The task id (the message_id it was published with); without it, the
    /// fleet overview.
    pub task_id: Option<String>,
    /// One JSON object: {"task": {...}, "events": [...]}, or the overview's
    /// {"queues": [...], "running", "delayed", "failures_last_hour", "workers": [...],
    /// "paused": [{"kind": "queue"|"type", "name"}]}.
    #[arg(long)]
    pub json: bool,
}

/// `tasks` flags.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only tasks in this state.
    #[arg(long, value_parser = [
        "scheduled", "started", "failed", "succeeded", "dead", "cancelled", "duplicate",
    ])]
    pub state: Option<String>,
    /// Only tasks of this type (exact, e.g. diag.echo).
    #[arg(long = "type", value_name = "TYPE")]
    pub task_type: Option<String>,
    /// Only tasks with an event since: an age (30s, 15m, 2h, 7d), an RFC 3339
    /// time or Unix milliseconds.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Show at most N tasks.
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub limit: u64,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// Benchmark scenarios.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BenchScenario {
    /// Publish rate and preloaded-queue drain rate, beside the baseline.
    Throughput,
    /// Fixed-rate enqueue->start and enqueue->final percentiles, beside the baseline.
    Latency,
    /// Delayed tasks at a fixed rate: lateness percentiles, early starts.
    Delay,
    /// Many delayed tasks held: scheduler RSS and release rate.
    Hold,
    /// Worker RSS idle and with 256 tasks in flight.
    Memory,
    /// Aggregate drain of --n tasks with 1, 2 and 4 workers, beside the
    /// broker's own ceiling (transient messages, no confirms, auto-ack).
    Scaling,
    /// Tracker ingestion rate (a preloaded backlog of --tracker-events) and
    /// `warren status` latency over --tracker-tasks stored tasks, on SQLite
    /// and PostgreSQL.
    Tracker,
    /// file.download and file.upload of --transfer-mb through a worker from
    /// and to a local HTTP server, beside curl; the worker's peak RSS.
    Transfer,
    /// Drain of --n tasks with a tracker running, the copies of published
    /// tasks (`tracker.track_published`) on beside off, alternating rounds.
    Published,
    /// A chord of --n diag.echo members (at most 10,000) beside --n plain
    /// diag.echo tasks, a scheduler running in both, alternating rounds:
    /// publish and drain rates, and the time from the last member's final
    /// event to the callback's `started` event.
    Chord,
    /// Every scenario but scaling, transfer, tracker, published and chord.
    All,
}

/// `bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which scenario.
    #[arg(value_enum)]
    pub scenario: BenchScenario,
    /// Tasks in the throughput scenario.
    #[arg(long, default_value_t = 50_000)]
    pub n: usize,
    /// Tasks per second in the latency and delay scenarios.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of paced publishing in the latency and delay scenarios.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Worker concurrency (prefetch is twice that); default from configuration.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Prefetch of the raw-lapin baseline worker (it pipelines its confirms;
    /// tuned for it, independent of Warren's settings).
    #[arg(long, default_value_t = warren_bench::baseline::BASELINE_PREFETCH)]
    pub baseline_prefetch: u16,
    /// Delayed tasks held in the hold scenario.
    #[arg(long, default_value_t = 1_000_000)]
    pub hold: usize,
    /// Throughput and transfer rounds: baseline and Warren alternate, best of
    /// each is reported.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// MiB moved each way in the transfer scenario.
    #[arg(long, default_value_t = 1024)]
    pub transfer_mb: u64,
    /// Status events preloaded per backend in the tracker scenario.
    #[arg(long, default_value_t = 100_000)]
    pub tracker_events: usize,
    /// Tasks stored (with their events) before `warren status` is timed in
    /// the tracker scenario.
    #[arg(long, default_value_t = 10_000_000)]
    pub tracker_tasks: u64,
    /// `warren status` runs timed per backend in the tracker scenario.
    #[arg(long, default_value_t = 50)]
    pub tracker_status_runs: usize,
    /// PostgreSQL server for the tracker scenario; its user must be allowed
    /// to create databases (one is created and dropped per measurement).
    #[arg(
        long,
        env = "WARREN_BENCH_POSTGRES",
        default_value = "postgres://root@127.0.0.1:5432/postgres"
    )]
    pub tracker_postgres: String,
    /// Tracker databases to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres",
          value_parser = ["sqlite", "postgres"])]
    pub tracker_backends: Vec<String>,
    /// Print JSON rows instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `topology` actions.
#[derive(Debug, Subcommand)]
pub enum TopologyAction {
    /// Print the plan without touching the broker.
    Show,
    /// Declare everything on the broker (idempotent).
    Apply,
    /// Redeclare every durable queue whose type or arguments differ from
    /// the configuration (such as after setting topology.replicated),
    /// moving its messages out and back so none is lost, then apply the
    /// topology. Run it with Warren's processes and producers stopped; see
    /// docs/topology.md, "Switching an existing topology".
    Migrate,
    /// Print the `rabbitmqctl set_permissions` line that gives ROLE's broker
    /// user the least privilege it needs under the configured prefix.
    ///
    /// Roles: producer (publish, cancel, watch events), worker, scheduler,
    /// tracker, operator (everything under the prefix: topology apply, dead,
    /// up). Work queues and cron schedules are listed as configured now: set
    /// the permissions again after adding one. See docs/deployment.md,
    /// "Broker users per role".
    Permissions {
        /// producer, worker, scheduler, tracker or operator.
        role: String,
        /// The broker user to grant them to [default: <prefix>-<role>].
        #[arg(long)]
        user: Option<String>,
        /// The virtual host [default: the one of broker.url].
        #[arg(long)]
        vhost: Option<String>,
    },
}

/// Worker overrides of the configuration.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to consume (short names from [[queues]], comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// How many tasks run at once.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// How many unacknowledged tasks the broker may push ahead (>= concurrency).
    #[arg(long)]
    pub prefetch: Option<u16>,
}

/// `publish` flags.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Task type, the routing key (e.g. diag.echo, http.request).
    pub task_type: String,
    /// Arguments as JSON (e.g. '{"ms": 100}').
    #[arg(default_value = "{}")]
    pub args: String,
    /// Priority 0..9, higher runs first.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: Option<u8>,
    /// Per-message TTL: a task still queued after this many ms ends dead (expired).
    #[arg(long, value_name = "MS")]
    pub expiration_ms: Option<u64>,
    /// Run no earlier than MS milliseconds from now (sent through P.delay).
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub delay_ms: Option<i64>,
    /// Run no earlier than this time: RFC 3339 (2027-01-01T09:00:00Z) or Unix ms.
    #[arg(long, value_name = "TIME")]
    pub eta: Option<String>,
    /// Task id (default: a new UUID v7). With --count, "-<n>" is appended.
    #[arg(long)]
    pub id: Option<String>,
    /// Extra header KEY=VALUE (integers are sent as integers); repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
    /// Wait for the final event and print it; exit 1 unless it succeeded.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, in ms.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    pub timeout_ms: u64,
    /// Publish this many copies, with a progress bar.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub count: u64,
}

/// `dead` actions.
#[derive(Debug, Subcommand)]
pub enum DeadAction {
    /// Show dead tasks without removing them (the queue is left unchanged).
    List(DeadListArgs),
    /// Move dead tasks back to P.tasks with their attempt count reset.
    Replay(DeadReplayArgs),
    /// Delete dead tasks (asks first unless --yes).
    Purge(DeadPurgeArgs),
}

/// Which dead tasks a `dead` action concerns.
#[derive(Debug, Args)]
pub struct DeadFilterArgs {
    /// Only tasks of this type (exact, e.g. diag.echo).
    #[arg(long = "type", value_name = "TYPE")]
    pub task_type: Option<String>,
    /// Only tasks parked for this reason.
    #[arg(long, value_parser = [
        "retries_exhausted", "permanent_failure", "invalid", "expired", "poison",
    ])]
    pub reason: Option<String>,
}

/// `dead list` flags.
#[derive(Debug, Args)]
pub struct DeadListArgs {
    #[command(flatten)]
    pub filter: DeadFilterArgs,
    /// One JSON object per line (id, type, reason, detail, attempt, queue, headers, body).
    #[arg(long)]
    pub json: bool,
    /// Show at most N tasks.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
}

/// `dead replay` flags.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["all", "ids"])))]
pub struct DeadReplayArgs {
    /// Task ids to replay; exit 1 if any is not in P.dead.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Replay every dead task (that matches --type and --reason).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filter: DeadFilterArgs,
}

/// `dead purge` flags.
#[derive(Debug, Args)]
pub struct DeadPurgeArgs {
    #[command(flatten)]
    pub filter: DeadFilterArgs,
    /// Delete without asking (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}
