# Warren container image: one binary, every role (`warren scheduler`,
# `warren worker`, `warren tracker`, `warren up`, `warren publish ...`).
#
#   docker build -t warren:local .
#   docker run --rm warren:local --help
#
# The runtime image holds only `warren`, the shared libraries it links (found
# with ldd), the CA certificates, /etc/passwd and /etc/group with the
# `warren` user (uid and gid 10001), and the built-in configuration: no
# shell, no package manager. It runs as that user and needs no write access
# to its root file system (`docker run --read-only`): mount a volume on
# /var/lib/warren (worker.data_dir is data/ under it) and, for the tracker's
# SQLite database, on /var/lib/warren-tracker.
#
# The binary comes from one of two stages, chosen by WARREN_BINARY:
#   builder   (default) compiled here, in the rust:1-bookworm stage, release profile;
#   prebuilt  taken from target/container/warren in the build context, a binary
#             built on the host for the same glibc (Debian 12 or older), e.g.
#               cargo build --release -p warren
#               install -D target/release/warren target/container/warren
#               DOCKER_BUILDKIT=1 docker build --build-arg WARREN_BINARY=prebuilt -t warren:local .
#             scripts/test-containers.sh builds the image this way (BuildKit
#             skips the stage that is not used).

ARG WARREN_BINARY=builder

# ---- build ----
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release -p warren \
    && install -Dm755 target/release/warren /out/warren

# ---- or a binary built on the host ----
# `warre[n]` lets the file be missing: a builder that runs every stage (the
# classic builder, docker-compose 1.x) still builds the default way.
# config/default.toml is only there so that the COPY always has a source.
FROM scratch AS prebuilt
COPY config/default.toml target/container/warre[n] /out/

FROM ${WARREN_BINARY} AS binary

# ---- the runtime's files, gathered from Debian ----
FROM debian:bookworm-slim AS rootfs
COPY --from=binary /out/ /tmp/binary/
COPY config/default.toml /rootfs/etc/warren/default.toml
# ca-certificates is installed only when the base image lacks it.
RUN set -eu; \
    if [ ! -f /tmp/binary/warren ]; then \
        echo "WARREN_BINARY=prebuilt needs target/container/warren in the build context" >&2; \
        exit 1; \
    fi; \
    install -D -m 0755 /tmp/binary/warren /rootfs/usr/local/bin/warren; \
    if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    chmod 0644 /rootfs/etc/warren/default.toml; \
    libs="$(ldd /rootfs/usr/local/bin/warren | grep -o '/[^ ]*' || true)"; \
    for f in $libs; do cp --parents -L "$f" /rootfs/; done; \
    mkdir -p /rootfs/etc/ssl/certs /rootfs/tmp \
        /rootfs/var/lib/warren/data /rootfs/var/lib/warren-tracker; \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/; \
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' > /rootfs/etc/nsswitch.conf; \
    printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nwarren:x:10001:10001:Warren:/var/lib/warren:/usr/sbin/nologin\n' \
        > /rootfs/etc/passwd; \
    printf 'root:x:0:\nwarren:x:10001:\n' > /rootfs/etc/group; \
    chown -R 10001:10001 /rootfs/var/lib/warren /rootfs/var/lib/warren-tracker; \
    chmod 0750 /rootfs/var/lib/warren /rootfs/var/lib/warren-tracker; \
    chmod 1777 /rootfs/tmp; \
    /rootfs/usr/local/bin/warren --version

# ---- runtime ----
FROM scratch AS runtime
COPY --from=rootfs /rootfs/ /
USER 10001:10001
WORKDIR /var/lib/warren
# Metrics and health (/metrics, /healthz, /readyz) of each role, on every
# interface of the container so Prometheus and the orchestrator reach them.
# SQLite (the tracker's default database) writes its temporary files beside
# the database, in the tracker's volume, as the root file system may be
# read-only.
# The tracker's listen address stays 127.0.0.1:8089 unless set: its API
# needs credentials (tracker.tokens, tracker.users) before it is exposed.
ENV WARREN__WORKER__LISTEN=0.0.0.0:8090 \
    WARREN__SCHEDULER__LISTEN=0.0.0.0:8091 \
    WARREN_HEALTH_COMPONENT=worker \
    SQLITE_TMPDIR=/var/lib/warren-tracker
EXPOSE 8089 8090 8091
# `warren health` probes the /healthz of the role named by
# WARREN_HEALTH_COMPONENT (worker, scheduler or tracker; set it per service)
# at its configured listen address; the image needs no curl and no shell.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["warren", "health"]
# SIGTERM (docker stop, Kubernetes) makes a worker stop taking tasks and let
# the running ones finish within worker.grace_period_ms (30 s by default):
# give the container longer than that before SIGKILL (docker stop -t 40,
# compose stop_grace_period, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["warren"]
CMD ["--help"]
