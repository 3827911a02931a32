//! The `warren` command: parses flags and hands over to the library crates.

mod cli;
mod cmd;
mod shutdown;

use clap::Parser;

/// The allocator of every `warren` process, the bench's raw-lapin baseline
/// included (a subcommand of this binary). A worker allocates and frees
/// several blocks per task (lapin's frames, the events, the attempt's
/// state), and glibc's malloc spent about a fifth of the worker's
/// instructions there, slow paths and `realloc` copies mostly; mimalloc's
/// per-thread free lists take most of that away (BENCHMARKS.md has the
/// figures). Built with `no_thp`: without it mimalloc asks for transparent
/// huge pages, and a worker's resident memory grows by 2 MiB pages (about
/// 60 MB instead of 36 MB at the bench's peak).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stack for every thread of the process (unless `RUST_MIN_STACK` is set).
/// lapin parses an AMQP header table recursively on its own thread, and a
/// publisher may send one nested as deep as a frame allows (about 18,700
/// levels in RabbitMQ's 128 KiB frames), which needs between 32 and 64 MiB
/// in a release build and far more in a debug build. Pages are only
/// reserved: a thread uses memory for the depth it actually reaches.
const THREAD_STACK_BYTES: usize = if cfg!(debug_assertions) {
    1 << 30
} else {
    256 << 20
};

fn main() {
    // Before any thread starts: the standard library reads it once.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES.to_string());
    }
    let cli = cli::Cli::parse();
    init_logging(&cli);
    // Not on the main thread, whose stack is the system's (8 MiB): what the
    // runtime runs there (`block_on`) may drop such a table too.
    let main = std::thread::Builder::new()
        .name("warren".into())
        .stack_size(THREAD_STACK_BYTES)
        .spawn(move || run(cli));
    let code = match main.map(|t| t.join()) {
        Ok(Ok(code)) => code,
        Ok(Err(_)) => 101,
        Err(e) => {
            eprintln!("error: cannot start the main thread: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Runs the command on a new async runtime; its exit code.
fn run(cli: cli::Cli) -> i32 {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = match runtime.block_on(cmd::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    };
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

fn init_logging(cli: &cli::Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        cli::LogFormat::Json => builder.json().init(),
        cli::LogFormat::Text => builder.compact().init(),
    }
}
