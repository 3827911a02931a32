//! A worker binary with a task type of its own: `text.wordcount`.
//!
//! Run it next to `warren up` (which applies the topology):
//!
//! ```sh
//! warren --config examples/wordcount-worker/warren.toml topology apply
//! cargo run -p wordcount-worker -- examples/wordcount-worker/warren.toml
//! warren --config examples/wordcount-worker/warren.toml \
//!     publish text.wordcount '{"text": "to be or not to be"}' --wait
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};
use warren_core::Config;
use warren_worker::{
    async_trait, CancellationToken, Handler, Registry, TaskContext, TaskError, Worker,
};

/// Counts words in `{"text": "..."}` and returns the total and the top five.
struct WordCount;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    text: String,
}

#[async_trait]
impl Handler for WordCount {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        // Invalid arguments are a permanent failure: retrying would not help.
        let args: Args = ctx.args_as()?;
        Ok(count(&args.text))
    }
}

fn count(text: &str) -> Value {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(w.to_lowercase()).or_default() += 1;
    }
    let mut top: Vec<(&String, &u64)> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    top.truncate(5);
    json!({
        "words": counts.values().sum::<u64>(),
        "distinct": counts.len(),
        "top": top.into_iter().map(|(w, n)| json!([w, n])).collect::<Vec<_>>(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let path = std::env::args().nth(1).map(std::path::PathBuf::from);
    let config = Config::load(path.as_deref())?;

    let mut registry = Registry::new();
    registry.register("text.wordcount", WordCount);

    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    Worker::new(config, registry)?.run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words() {
        let v = count("To be, or not to be");
        assert_eq!(v["words"], 6);
        assert_eq!(v["distinct"], 4);
        assert_eq!(v["top"][0], json!(["be", 2]));
    }
}
