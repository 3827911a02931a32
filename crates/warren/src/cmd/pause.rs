//! `warren pause` and `warren resume`: a pause or resume record on
//! `P.control`, read by every worker (contract section 5).

use anyhow::bail;
use warren_core::pauses::PauseTarget;
use warren_core::routes::is_valid_task_type;
use warren_core::Config;

use crate::cli::{PauseArgs, PauseKindArg};

/// The longest queue name RabbitMQ accepts, in bytes.
const MAX_QUEUE_NAME_BYTES: usize = 255;

pub async fn run(config: &Config, args: PauseArgs, paused: bool) -> anyhow::Result<i32> {
    let target = target(config, &args)?;
    let client = warren_client::Client::connect(config).await?;
    client.set_paused(&target, paused).await?;
    let done = if paused { "paused" } else { "resumed" };
    println!("{target} {done} (fleet-wide)");
    Ok(0)
}

/// The target named on the command line, checked against the
/// configuration: a configured work queue, or a valid task type whose
/// parking queue name fits.
fn target(config: &Config, args: &PauseArgs) -> anyhow::Result<PauseTarget> {
    let name = args.name.as_str();
    match args.kind {
        PauseKindArg::Queue => {
            if !config.queues.iter().any(|q| q.name == name) {
                let known: Vec<&str> = config.queues.iter().map(|q| q.name.as_str()).collect();
                bail!(
                    "unknown queue {name:?}: the configured work queues are {}",
                    known.join(", ")
                );
            }
            Ok(PauseTarget::queue(name))
        }
        PauseKindArg::Type => {
            if !is_valid_task_type(name) {
                bail!(
                    "invalid task type {name:?}: dot-separated words of A-Z a-z 0-9 _ -, at \
                     most 200 bytes, no wildcards"
                );
            }
            let hold = config.names().paused_type(name);
            if hold.len() > MAX_QUEUE_NAME_BYTES {
                bail!(
                    "task type {name:?} is too long to pause under prefix {:?}: its queue \
                     {hold} would exceed {MAX_QUEUE_NAME_BYTES} bytes",
                    config.prefix
                );
            }
            Ok(PauseTarget::task_type(name))
        }
    }
}
