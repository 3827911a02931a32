//! Diagnostic task types, shipped so anyone can try Warren and test it black-box.
//!
//! - `diag.echo`: the result is the arguments.
//! - `diag.sleep {"ms": N}`: sleeps N ms (cancellable), result `{"slept_ms": N}`.
//! - `diag.fail {"kind": "retryable"|"permanent", "message": "..."}`: fails so.
//! - `diag.panic {"message": "..."}`: panics, to show panics become failures.
//! - `diag.add {"add": K, "n": N}`: result `{"n": M + K}`, where M is the
//!   `n` of the previous chain step's result (`previous`, contract section 8)
//!   when there is one, else N (default 0); K defaults to 1. A chain of
//!   `diag.add` steps counts up, each step seeing the one before.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{Handler, Registry, TaskContext, TaskError};

/// Registers every diagnostic type.
pub fn register(r: &mut Registry) {
    r.register("diag.echo", Echo);
    r.register("diag.sleep", Sleep);
    r.register("diag.fail", Fail);
    r.register("diag.panic", Panic);
    r.register("diag.add", Add);
}

/// `diag.add`: adds `add` to the previous step's `n` (or its own).
pub struct Add;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddArgs {
    #[serde(default = "one")]
    add: i64,
    #[serde(default)]
    n: i64,
    #[serde(default)]
    previous: Option<Value>,
    #[serde(default)]
    previous_failure: Option<Value>,
}

fn one() -> i64 {
    1
}

#[async_trait::async_trait]
impl Handler for Add {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let args: AddArgs = ctx.args_as()?;
        let _ = args.previous_failure;
        let base = match &args.previous {
            None => args.n,
            Some(p) => p.get("n").and_then(Value::as_i64).ok_or_else(|| {
                TaskError::invalid_args("previous must be a result with an integer n")
            })?,
        };
        let n = base
            .checked_add(args.add)
            .ok_or_else(|| TaskError::invalid_args("n + add overflows"))?;
        Ok(json!({ "n": n }))
    }
}

/// `diag.echo`: returns its arguments, which must be an object.
pub struct Echo;

#[async_trait::async_trait]
impl Handler for Echo {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        ctx.args_object()?;
        Ok(ctx.args)
    }
}

/// `diag.sleep`: sleeps for `ms` milliseconds unless cancelled.
pub struct Sleep;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

#[async_trait::async_trait]
impl Handler for Sleep {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let args: SleepArgs = ctx.args_as()?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(args.ms)) => Ok(json!({"slept_ms": args.ms})),
            _ = ctx.cancel.cancelled() => Err(TaskError::retryable("aborted", "sleep was aborted")),
        }
    }
}

/// `diag.fail`: fails with the given kind and message.
pub struct Fail;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailArgs {
    kind: String,
    #[serde(default)]
    message: String,
}

#[async_trait::async_trait]
impl Handler for Fail {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let args: FailArgs = ctx.args_as()?;
        match args.kind.as_str() {
            "retryable" => Err(TaskError::retryable("diag_fail", args.message)),
            "permanent" => Err(TaskError::permanent("diag_fail", args.message)),
            other => Err(TaskError::invalid_args(format!(
                "kind {other:?} must be \"retryable\" or \"permanent\""
            ))),
        }
    }
}

/// `diag.panic`: panics with the given message.
pub struct Panic;

#[async_trait::async_trait]
impl Handler for Panic {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let msg = ctx
            .args_object()?
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("diag.panic")
            .to_owned();
        panic!("{msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    fn ctx(t: &str, args: Value) -> TaskContext {
        TaskContext {
            id: "t".into(),
            task_type: t.into(),
            args,
            attempt: 1,
            cancel: CancellationToken::new(),
            data_dir: "data".into(),
            config: std::sync::Arc::new(warren_core::Config::from_toml("").unwrap()),
            progress: Default::default(),
        }
    }

    #[tokio::test]
    async fn echo_returns_args() {
        let v = json!({"a": [1, 2]});
        assert_eq!(Echo.handle(ctx("diag.echo", v.clone())).await.unwrap(), v);
    }

    #[tokio::test]
    async fn every_diag_type_refuses_arguments_that_are_not_an_object() {
        for t in [
            "diag.echo",
            "diag.sleep",
            "diag.fail",
            "diag.panic",
            "diag.add",
        ] {
            for args in [json!([1, 2, 3]), json!("a string"), json!(42), json!(null)] {
                let mut r = Registry::new();
                register(&mut r);
                let e = r
                    .get(t)
                    .unwrap()
                    .handle(ctx(t, args.clone()))
                    .await
                    .unwrap_err();
                assert_eq!(e.code, "invalid_args", "{t} {args}");
                assert!(!e.is_retryable(), "{t} {args}");
                assert!(
                    e.message.contains("must be a JSON object"),
                    "{t}: {}",
                    e.message
                );
            }
        }
    }

    #[tokio::test]
    async fn add_counts_from_the_previous_result() {
        let r = Add.handle(ctx("diag.add", json!({"n": 4}))).await.unwrap();
        assert_eq!(r, json!({"n": 5}));
        let r = Add
            .handle(ctx("diag.add", json!({"add": 3, "previous": {"n": 5}})))
            .await
            .unwrap();
        assert_eq!(r, json!({"n": 8}));
        let e = Add
            .handle(ctx("diag.add", json!({"previous": "x"})))
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_args");
    }

    #[tokio::test]
    async fn fail_kinds_and_messages() {
        let e = Fail
            .handle(ctx(
                "diag.fail",
                json!({"kind": "retryable", "message": "boom"}),
            ))
            .await
            .unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(e.message, "boom");
        let e = Fail
            .handle(ctx(
                "diag.fail",
                json!({"kind": "permanent", "message": "no"}),
            ))
            .await
            .unwrap_err();
        assert!(!e.is_retryable());
        let e = Fail
            .handle(ctx("diag.fail", json!({"kind": "sideways"})))
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_args");
    }

    #[tokio::test]
    async fn sleep_validates_and_can_be_cancelled() {
        let e = Sleep
            .handle(ctx("diag.sleep", json!({"ms": "x"})))
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_args");
        let c = ctx("diag.sleep", json!({"ms": 60_000}));
        c.cancel.cancel();
        let e = Sleep.handle(c).await.unwrap_err();
        assert_eq!(e.code, "aborted");
    }
}
