//! `warren bench transfer`: `file.download` and `file.upload` through a real
//! worker against a local HTTP server, beside `curl` moving the same file
//! from and to the same server in the same run, with the worker's memory
//! sampled throughout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use futures::StreamExt;
use rand::RngCore;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use warren_client::TaskRequest;
use warren_core::{Config, TaskState};

use crate::env::BenchEnv;
use crate::procstat;
use crate::report::Row;
use crate::Options;

/// The longest one transfer may take before the run gives up.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// What the local server shares with its handlers.
struct Served {
    dir: PathBuf,
    uploaded: AtomicU64,
}

/// Serves `GET /files/{name}` from `dir` (streamed, with its length) and
/// `PUT /upload` (the body counted and dropped) on an ephemeral port.
async fn server(dir: PathBuf) -> anyhow::Result<(SocketAddr, Arc<Served>)> {
    let served = Arc::new(Served {
        dir,
        uploaded: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/files/{name}", get(file))
        .route("/upload", put(upload))
        .with_state(served.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, served))
}

async fn file(State(s): State<Arc<Served>>, UrlPath(name): UrlPath<String>) -> Response {
    if name.contains('/') || name.starts_with('.') {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Ok(f) = tokio::fs::File::open(s.dir.join(&name)).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024));
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response()
}

async fn upload(State(s): State<Arc<Served>>, body: Body) -> Response {
    let mut stream = body.into_data_stream();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => n += c.len() as u64,
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    s.uploaded.store(n, Ordering::SeqCst);
    (StatusCode::OK, axum::Json(json!({ "bytes": n }))).into_response()
}

/// Writes `bytes` of random data to `path`.
async fn generate(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut f = tokio::fs::File::create(path).await?;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        rand::thread_rng().fill_bytes(&mut block);
        let n = block.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        f.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    f.sync_all().await?;
    Ok(())
}

/// Writes every dirty page to disk (`sync`), so no transfer pays for the
/// writeback of the one before it.
async fn settle() {
    let _ = tokio::process::Command::new("sync").status().await;
}

/// Runs `curl` and returns its wall time.
async fn curl(args: &[&str]) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--noproxy", "*"])
        .args(args)
        .stdout(Stdio::null())
        .output()
        .await
        .context("run curl (install it: apt-get install curl)")?;
    if !out.status.success() {
        bail!(
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(began.elapsed())
}

/// Peak resident memory of `pid` while `f` runs, sampled every 10 ms.
async fn peak_rss<T>(pid: u32, f: impl std::future::Future<Output = T>) -> (T, u64) {
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                if let Some(s) = procstat::sample(pid) {
                    peak.fetch_max(s.rss, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let out = f.await;
    done.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    (out, peak.load(Ordering::SeqCst))
}

/// Publishes one task and waits for its final event; its wall time.
async fn run_task(
    env: &BenchEnv,
    task_type: &str,
    args: serde_json::Value,
) -> anyhow::Result<Duration> {
    let mut watch = env.client.watch(&["#"]).await?;
    let began = Instant::now();
    let ids = env
        .client
        .publish_batch(&[TaskRequest::new(task_type, args)], 1, |_| {})
        .await?;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{task_type} did not finish within {TRANSFER_TIMEOUT:?}");
        }
        let Some(e) = watch.next(left).await? else {
            continue;
        };
        if e.event.task_id != ids[0] {
            continue;
        }
        match e.event.state {
            TaskState::Succeeded => return Ok(began.elapsed()),
            s if s.is_final() => bail!("{task_type} ended {s:?}: {:?}", e.event.error),
            _ => {}
        }
    }
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(1e-9)
}

/// Download and upload throughput beside curl, and the worker's peak RSS.
pub async fn transfer(config: &Config, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let bytes = opts.transfer_mb.max(1) * 1024 * 1024;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let root = std::env::temp_dir().join(format!("warren-bench-transfer-{}", &tag[..8]));
    let (serve_dir, data_dir) = (root.join("served"), root.join("data"));
    tokio::fs::create_dir_all(&serve_dir).await?;
    tokio::fs::create_dir_all(&data_dir).await?;
    let result = measure(config, opts, bytes, &serve_dir, &data_dir).await;
    let _ = tokio::fs::remove_dir_all(&root).await;
    result
}

async fn measure(
    config: &Config,
    opts: &Options,
    bytes: u64,
    serve_dir: &Path,
    data_dir: &Path,
) -> anyhow::Result<Vec<Row>> {
    eprintln!("transfer: writing a {} MiB source file", bytes >> 20);
    generate(&serve_dir.join("source.bin"), bytes).await?;
    generate(&data_dir.join("upload.bin"), bytes).await?;
    let (addr, served) = server(serve_dir.to_owned()).await?;
    let url = format!("http://{addr}/files/source.bin");
    let upload_url = format!("http://{addr}/upload");

    let mut env = BenchEnv::new(config, opts.config_path.clone()).await?;
    let vars = vec![
        ("WARREN__WORKER__DATA_DIR", data_dir.display().to_string()),
        ("WARREN__HTTP__ALLOW_LOOPBACK", "true".to_owned()),
        ("WARREN__HTTP__MAX_FILE_BYTES", (bytes * 2).to_string()),
    ];
    let pid = env.spawn(&["worker", "--queues", "io"], &vars)?;
    let measured = async {
        // The worker is ready once it ran one small task.
        tokio::time::timeout(
            Duration::from_secs(60),
            run_task(
                &env,
                "http.request",
                json!({"method": "GET", "url": format!("http://{addr}/files/none")}),
            ),
        )
        .await
        .ok();
        let idle_rss = procstat::sample(pid).map_or(0, |s| s.rss);
        let curl_out = data_dir.join("curl.bin");
        let curl_out_s = curl_out.display().to_string();
        let upload_src = data_dir.join("upload.bin").display().to_string();
        let (mut best_curl_dl, mut best_warren_dl) = (Duration::MAX, Duration::MAX);
        let (mut best_curl_ul, mut best_warren_ul) = (Duration::MAX, Duration::MAX);
        let mut best_warren_ul_plain = Duration::MAX;
        let mut peak = 0u64;
        for round in 0..opts.rounds.max(1) {
            eprintln!("transfer: round {}", round + 1);
            let _ = tokio::fs::remove_file(&curl_out).await;
            settle().await;
            best_curl_dl = best_curl_dl.min(curl(&["-o", &curl_out_s, &url]).await?);
            let _ = tokio::fs::remove_file(&curl_out).await;
            let target = format!("dl-{round}.bin");
            settle().await;
            let (t, rss) = peak_rss(
                pid,
                run_task(&env, "file.download", json!({"url": url, "path": target})),
            )
            .await;
            best_warren_dl = best_warren_dl.min(t?);
            peak = peak.max(rss);
            let got = tokio::fs::metadata(data_dir.join(&target)).await?.len();
            anyhow::ensure!(got == bytes, "downloaded {got} of {bytes} bytes");
            let _ = tokio::fs::remove_file(data_dir.join(&target)).await;

            best_curl_ul =
                best_curl_ul.min(curl(&["-H", "Expect:", "-T", &upload_src, &upload_url]).await?);
            anyhow::ensure!(
                served.uploaded.load(Ordering::SeqCst) == bytes,
                "curl upload short"
            );
            served.uploaded.store(0, Ordering::SeqCst);
            // With the sha256 (the default), then without it, as curl.
            for (checksum, best) in [
                (true, &mut best_warren_ul),
                (false, &mut best_warren_ul_plain),
            ] {
                let args = json!({"path": "upload.bin", "url": upload_url, "method": "PUT",
                                  "checksum": checksum});
                let (t, rss) = peak_rss(pid, run_task(&env, "file.upload", args)).await;
                *best = (*best).min(t?);
                peak = peak.max(rss);
                anyhow::ensure!(
                    served.uploaded.load(Ordering::SeqCst) == bytes,
                    "upload short"
                );
                served.uploaded.store(0, Ordering::SeqCst);
            }
        }
        let hwm = procstat::sample(pid).map_or(0, |s| s.hwm);
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let size = format!("{} MiB", bytes >> 20);
        Ok::<_, anyhow::Error>(vec![
            Row::vs(
                "transfer",
                &format!("download {size} (vs curl)"),
                "MiB/s",
                mib_per_s(bytes, best_warren_dl),
                mib_per_s(bytes, best_curl_dl),
            ),
            Row::vs(
                "transfer",
                &format!("upload {size} (vs curl)"),
                "MiB/s",
                mib_per_s(bytes, best_warren_ul),
                mib_per_s(bytes, best_curl_ul),
            ),
            Row::vs(
                "transfer",
                &format!("upload {size}, checksum off (vs curl)"),
                "MiB/s",
                mib_per_s(bytes, best_warren_ul_plain),
                mib_per_s(bytes, best_curl_ul),
            ),
            Row::new("transfer", "worker RSS idle", "MiB", mb(idle_rss)),
            Row::new(
                "transfer",
                "worker RSS peak while transferring",
                "MiB",
                mb(peak),
            ),
            Row::new("transfer", "worker VmHWM after the run", "MiB", mb(hwm)),
        ])
    }
    .await;
    env.cleanup().await?;
    measured
}
