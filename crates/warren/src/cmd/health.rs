//! `warren health`: one HTTP probe of a local process's health endpoint,
//! without curl in the image.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_core::Config;

use crate::cli::{Component, HealthArgs};

pub async fn run(config: &Config, args: HealthArgs) -> anyhow::Result<i32> {
    let (key, listen) = match args.component {
        Component::Worker => ("worker.listen", &config.worker.listen),
        Component::Scheduler => ("scheduler.listen", &config.scheduler.listen),
        Component::Tracker => ("tracker.listen", &config.tracker.listen),
    };
    if listen.is_empty() {
        bail!("{key} is empty: this process serves no health endpoint");
    }
    let addr = probe_address(listen);
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let status = tokio::time::timeout(Duration::from_millis(args.timeout_ms), get(&addr, path))
        .await
        .with_context(|| {
            format!(
                "no answer from http://{addr}{path} within {} ms",
                args.timeout_ms
            )
        })?
        .with_context(|| format!("http://{addr}{path} ({key})"))?;
    if status != 200 {
        bail!("http://{addr}{path} ({key}) answered {status}");
    }
    println!("http://{addr}{path}: ok");
    Ok(0)
}

/// Where to reach a listen address from this host: a wildcard listener
/// answers on loopback.
fn probe_address(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        _ => listen.to_owned(),
    }
}

/// The status code of `GET path` (HTTP/1.0, connection closed after).
async fn get(addr: &str, path: &str) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    s.take(1024).read_to_end(&mut head).await?;
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP answer")
}

#[cfg(test)]
mod tests {
    use super::probe_address;

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        assert_eq!(probe_address("0.0.0.0:8090"), "127.0.0.1:8090");
        assert_eq!(probe_address("[::]:8091"), "[::1]:8091");
        assert_eq!(probe_address("10.0.0.5:8089"), "10.0.0.5:8089");
    }
}
