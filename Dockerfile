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
ENTRYPOINT ["warren"]
CMD ["--help"]
