# Warren container image: one binary, every role (`warren scheduler`,
# `warren worker`, `warren up`, `warren publish ...`).
#
#   docker build -t warren:local .
#   docker run --rm warren:local --help

# ---- build ----
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release -p warren \
    && install -Dm755 target/release/warren /out/warren

# ---- runtime ----
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 warren \
    && useradd --system --uid 10001 --gid warren --home-dir /var/lib/warren --shell /usr/sbin/nologin warren \
    && install -d -o warren -g warren -m 0750 /var/lib/warren /var/lib/warren-tracker
COPY --from=builder /out/warren /usr/local/bin/warren
COPY config/default.toml /etc/warren/default.toml
USER warren:warren
WORKDIR /var/lib/warren
# Metrics and health (/metrics, /healthz, /readyz) of each role, on every
# interface of the container so Prometheus can scrape them.
ENV WARREN__WORKER__LISTEN=0.0.0.0:8090 \
    WARREN__SCHEDULER__LISTEN=0.0.0.0:8091 \
    WARREN_HEALTH_COMPONENT=worker
EXPOSE 8089 8090 8091
# `warren health` probes the /healthz of the role named by
# WARREN_HEALTH_COMPONENT (worker, scheduler or tracker; set it per service)
# at its configured address; the image needs no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["warren", "health"]
ENTRYPOINT ["warren"]
CMD ["--help"]
