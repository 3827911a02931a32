#!/usr/bin/env bash
# The container test: builds the runtime image from the repository's
# Dockerfile (WARREN_BINARY=prebuilt, with the warren binary built on this
# host) and runs Warren from it against the local broker:
#
#   1. a scheduler, two workers and the tracker start from the image, each
#      with a read-only root file system, no capabilities, as the image's
#      non-root user, on the host network; `docker inspect` must show each
#      healthy through the image's HEALTHCHECK (times printed);
#   2. a batch published from the host (the host's `warren publish`) all
#      succeeds;
#   3. `docker stop` on the worker running a long diag.sleep lets it finish
#      (SIGTERM drain): the task succeeds at its first attempt on that
#      worker and the container exits 0;
#   4. `docker kill` on a worker in the middle of a batch loses nothing: the
#      batch all succeeds, no task is dead;
#   5. the tracker recorded the long task.
#
# The Docker engine is this script's own: started with
# `dockerd --bridge=none --iptables=false` on a socket, data root and exec
# root in a temporary directory, and stopped (by its PID) when the script
# ends, whatever happens. Containers run with --network host only and talk
# only to 127.0.0.1 (the broker and each other's health endpoints). No image
# registry is used: the Dockerfile's base image (debian:bookworm-slim) is
# made locally with debootstrap and `docker import`ed (root file system
# cached in ~/.cache/warren).
#
# Where no engine can be started (no dockerd, not root, a broker that is not
# local, an engine that does not come up) it prints why and exits 0 (skipped);
# WARREN_REQUIRE_CONTAINERS=1 makes that a failure.
#
# Environment: WARREN__BROKER__URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
# WARREN_CONTAINER_BINARY (default target/debug/warren; stripped into
# target/container/warren for the image), WARREN_WAIT_SECS (default 60).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

SECS="${WARREN_WAIT_SECS:-60}"
IMAGE=warren:test
BEGAN="$(date +%s%N)"

skip() {
    printf 'container test SKIPPED: %s\n' "$*" >&2
    [ "${WARREN_REQUIRE_CONTAINERS:-0}" = 1 ] && exit 1
    exit 0
}
fail() {
    printf 'container test FAILED: %s\n' "$*" >&2
    exit 1
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# ---- can an engine run here? ----
parse_broker_url
broker_is_local || skip "the broker ($BROKER_HOST) is not on this host; containers here talk to 127.0.0.1 only"
[ "$(id -u)" -eq 0 ] || skip "starting a Docker engine needs root"
command -v dockerd >/dev/null 2>&1 || skip "dockerd is not installed (apt-get install docker.io)"
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] ||
    skip "debootstrap is not installed (apt-get install debootstrap)"

# A docker client that builds with BuildKit (which builds only the stages
# the target needs, so the Rust builder stage is not pulled): one with the
# buildx plugin, or a client older than 23 (BuildKit built in, as Debian's
# docker.io ships).
DOCKER=""
for c in "$(command -v docker || true)" /usr/bin/docker; do
    if [ -z "$c" ] || [ ! -x "$c" ]; then continue; fi
    if "$c" buildx version >/dev/null 2>&1; then
        DOCKER="$c"
        break
    fi
    major="$("$c" --version 2>/dev/null | sed -nE 's/^Docker version ([0-9]+)\..*/\1/p')"
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then
        DOCKER="$c"
        export DOCKER_BUILDKIT=1
        break
    fi
done
[ -n "$DOCKER" ] || skip "no docker client that can build with BuildKit (buildx plugin, or Debian's docker.io client)"
docker() { "$DOCKER" "$@"; }

# ---- the engine, the containers and the topology, removed on exit ----
WORK="$(mktemp -d /tmp/warren-containers.XXXXXX)"
DOCKERD_PID=""
CONTAINERS=()
PREFIX=""
export DOCKER_HOST="unix://$WORK/docker.sock"
export DOCKER_CONFIG="$WORK/client"

delete_topology() {
    mgmt_settings
    local kind name
    for kind in queues exchanges; do
        mgmt_get "$kind/$BROKER_VHOST_ENC?columns=name" 2>/dev/null |
            grep -oE "\"name\":\"${PREFIX//./\\.}\\.[^\"]*\"" | cut -d'"' -f4 |
            while read -r name; do
                curl -sf -m 5 -o /dev/null -X DELETE -u "$WARREN_MGMT_USER:$WARREN_MGMT_PASS" \
                    "$WARREN_MGMT_URL/api/$kind/$BROKER_VHOST_ENC/$name" || warn "could not delete $kind $name"
            done
    done
}

cleanup() {
    local rc=$? c i
    set +e
    if [ -n "$DOCKERD_PID" ]; then
        if [ "$rc" -ne 0 ]; then
            for c in "${CONTAINERS[@]}"; do
                printf '\n---- docker logs %s (last 40 lines) ----\n' "$c" >&2
                timeout 10 "$DOCKER" logs --tail 40 "$c" >&2 2>&1
            done
        fi
        [ "${#CONTAINERS[@]}" -gt 0 ] && timeout 60 "$DOCKER" rm -f "${CONTAINERS[@]}" >/dev/null 2>&1
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for ((i = 0; i < 300; i++)); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            warn "dockerd (pid $DOCKERD_PID) did not stop within 30 s: killing it"
            kill -KILL "$DOCKERD_PID" 2>/dev/null
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        [ "$rc" -ne 0 ] && { printf '\n---- dockerd log (last 20 lines) ----\n' >&2; tail -n 20 "$WORK/dockerd.log" >&2; }
    fi
    [ -n "$PREFIX" ] && delete_topology
    # What the engine leaves mounted under WORK (its network namespace file)
    # is unmounted; nothing may remain mounted there before it is removed.
    awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
    if grep -q " $WORK/" /proc/mounts; then
        warn "mounts remain under $WORK; left in place"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting a private Docker engine (dockerd --bridge=none --iptables=false, $WORK)"
mkdir -p "$WORK/data" "$WORK/exec" "$WORK/client" "$WORK/vol"
echo '{}' >"$WORK/daemon.json"
dockerd --bridge=none --iptables=false --ip6tables=false \
    --config-file "$WORK/daemon.json" --data-root "$WORK/data" --exec-root "$WORK/exec" \
    --pidfile "$WORK/dockerd.pid" -H "$DOCKER_HOST" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
engine_up() { kill -0 "$DOCKERD_PID" 2>/dev/null && docker version >/dev/null 2>&1; }
for ((i = 0; i < 300; i++)); do
    engine_up && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.1
done
engine_up || skip "the Docker engine did not start: $(grep -E 'level=(error|fatal)|failed' "$WORK/dockerd.log" | tail -n 1 | cut -c1-300)"
log "engine $(docker version --format '{{.Server.Version}}') up; client $DOCKER"

# ---- the image ----
BIN="${WARREN_CONTAINER_BINARY:-target/debug/warren}"
if [ ! -x "$BIN" ]; then
    log "building $BIN (cargo build -p warren)"
    cargo build -p warren >&2
fi
mkdir -p target/container
if command -v strip >/dev/null 2>&1; then
    strip -o target/container/warren.tmp "$BIN"
else
    cp "$BIN" target/container/warren.tmp
fi
mv target/container/warren.tmp target/container/warren

BASE_TAR="$(debian_base_tarball bookworm)"
docker import "$BASE_TAR" debian:bookworm-slim >/dev/null
t0="$(now_ms)"
docker build --network none --build-arg WARREN_BINARY=prebuilt -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1 ||
    {
        tail -n 30 "$WORK/build.log" >&2
        fail "docker build failed"
    }
BUILD_MS=$(($(now_ms) - t0))
IMAGE_BYTES="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
IMAGE_MB="$(awk -v b="$IMAGE_BYTES" 'BEGIN { printf "%.1f", b / 1e6 }')"
log "image $IMAGE built in ${BUILD_MS} ms: $IMAGE_MB MB"
[ "$IMAGE_BYTES" -le 60000000 ] || fail "the runtime image is $IMAGE_MB MB, above the 60 MB target"
[ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = "10001:10001" ] || fail "the image does not run as uid 10001"

# ---- Warren in containers ----
PREFIX="wt.containers.$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')"
NAME="warren-ct-${PREFIX##*.}"
TOKEN="ct-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export WARREN__PREFIX="$PREFIX"
export WARREN__BROKER__URL="${WARREN__BROKER__URL:-$WARREN_DEFAULT_BROKER_URL}"
W="$WARREN_ROOT/$BIN"

USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 20000))
        [[ "$USED_PORTS" == *" $p "* ]] && continue
        port_open 127.0.0.1 "$p" && continue
        USED_PORTS+="$p "
        echo "$p"
        return
    done
}

declare -A PORT COMPONENT STARTED
# run NAME ROLE: starts `warren ROLE` from the image; its data volume is
# a directory of WORK owned by the image's user.
run() {
    local name="$1" role="$2" comp="$2" port vol
    port="$(free_port)"
    vol="$WORK/vol/$name"
    mkdir -p "$vol"
    chown 10001:10001 "$vol"
    local args=(
        -d --name "$name" --hostname "$name"
        --network host --read-only --cap-drop ALL --security-opt no-new-privileges
        -e WARREN__PREFIX="$PREFIX"
        -e WARREN__BROKER__URL="$WARREN__BROKER__URL"
        -e WARREN__BROKER__MANAGEMENT_URL="$WARREN_MGMT_URL"
        -e WARREN_HEALTH_COMPONENT="$comp"
    )
    case "$role" in
        worker)
            args+=(-e WARREN__WORKER__LISTEN="127.0.0.1:$port" -v "$vol:/var/lib/warren")
            ;;
        scheduler)
            args+=(-e WARREN__SCHEDULER__LISTEN="127.0.0.1:$port")
            ;;
        tracker)
            args+=(
                -e WARREN__TRACKER__LISTEN="127.0.0.1:$port"
                -e WARREN__TRACKER__DATABASE_URL="sqlite:///var/lib/warren-tracker/tracker.db"
                -e WARREN__TRACKER__TOKENS="ops:admin:env:WARREN_TRACKER_TOKEN"
                -e WARREN_TRACKER_TOKEN="$TOKEN"
                -v "$vol:/var/lib/warren-tracker"
            )
            ;;
    esac
    PORT[$name]="$port"
    COMPONENT[$name]="$comp"
    CONTAINERS+=("$name")
    STARTED[$name]="$(now_ms)"
    docker run "${args[@]}" "$IMAGE" "$role" >/dev/null
}

state() { docker inspect -f "{{$1}}" "$2"; }

# wait_healthy NAME...: until `docker inspect` shows each healthy; prints
# each one's time from `docker run` to /readyz answering 200 (polled from
# the host) and to healthy.
wait_healthy() {
    local deadline=$(($(now_ms) + SECS * 1000)) n
    local -A ready healthy
    while :; do
        local pending=0
        for n in "$@"; do
            [ -n "${healthy[$n]:-}" ] && continue
            pending=1
            [ "$(state .State.Running "$n")" = true ] || fail "$n stopped (exit code $(state .State.ExitCode "$n"))"
            if [ -z "${ready[$n]:-}" ] &&
                curl -sf -m 1 -o /dev/null "http://127.0.0.1:${PORT[$n]}/readyz"; then
                ready[$n]=$(($(now_ms) - ${STARTED[$n]}))
            fi
            if [ "$(state .State.Health.Status "$n")" = healthy ]; then
                healthy[$n]=$(($(now_ms) - ${STARTED[$n]}))
                [ -n "${ready[$n]:-}" ] || ready[$n]="${healthy[$n]}"
                printf '%-10s %-32s ready %5d ms, healthy %5d ms after docker run\n' \
                    "${COMPONENT[$n]}" "$n" "${ready[$n]}" "${healthy[$n]}" >&2
                STARTUP+=("${COMPONENT[$n]} ready ${ready[$n]} ms / healthy ${healthy[$n]} ms")
            fi
        done
        [ "$pending" = 0 ] && return 0
        [ "$(now_ms)" -lt "$deadline" ] || fail "not healthy within ${SECS}s: $*"
        sleep 0.2
    done
}

# running NAME: handlers running in the worker NAME now (its /metrics).
running() {
    curl -sf -m 2 "http://127.0.0.1:${PORT[$1]}/metrics" 2>/dev/null |
        awk '$1 == "warren_worker_tasks_running" { print int($2); found = 1 } END { if (!found) print 0 }'
}

# busy_worker NAME...: waits until one of the workers runs a task, prints it.
busy_worker() {
    local deadline=$(($(now_ms) + SECS * 1000)) n
    while [ "$(now_ms)" -lt "$deadline" ]; do
        for n in "$@"; do
            if [ "$(running "$n")" -gt 0 ]; then
                echo "$n"
                return 0
            fi
        done
        sleep 0.1
    done
    fail "no worker started a task within ${SECS}s"
}

mgmt_settings
"$W" topology apply >/dev/null
STARTUP=()
SCHED="$NAME-scheduler" W1="$NAME-worker1" W2="$NAME-worker2" TRACKER="$NAME-tracker"
run "$SCHED" scheduler
run "$W1" worker
run "$W2" worker
run "$TRACKER" tracker
log "scheduler, two workers and the tracker started from $IMAGE (prefix $PREFIX)"
wait_healthy "$SCHED" "$W1" "$W2" "$TRACKER"
[ "$(docker exec "$W1" warren health --ready 2>&1)" = "http://127.0.0.1:${PORT[$W1]}/readyz: ok" ] ||
    fail "warren health --ready in $W1 did not answer ok"
for n in "${CONTAINERS[@]}"; do
    [ "$(state .Config.User "$n")" = "10001:10001" ] || fail "$n does not run as uid 10001"
    [ "$(state .HostConfig.ReadonlyRootfs "$n")" = true ] || fail "$n root file system is not read-only"
done

# ---- a batch from the host ----
log "publishing 200 diag.echo from the host"
"$W" publish diag.echo '{"from":"host"}' --count 200 --wait --timeout-ms $((SECS * 1000)) 2>"$WORK/batch.out" ||
    {
        cat "$WORK/batch.out" >&2
        fail "the batch did not all succeed"
    }
grep -E '^all ' "$WORK/batch.out" >&2

# ---- docker stop drains a running task ----
LONG_ID="$PREFIX-long"
log "publishing a 6 s diag.sleep, then docker stop on the worker running it"
"$W" publish diag.sleep '{"ms":6000}' --id "$LONG_ID" --wait --timeout-ms $((SECS * 1000)) >"$WORK/long.out" 2>&1 &
LONG_PID=$!
VICTIM="$(busy_worker "$W1" "$W2")"
sleep 1
t0="$(now_ms)"
docker stop -t 45 "$VICTIM" >/dev/null
STOP_MS=$(($(now_ms) - t0))
wait "$LONG_PID" || {
    cat "$WORK/long.out" >&2
    fail "the long task did not succeed"
}
[ "$(state .State.ExitCode "$VICTIM")" = 0 ] || fail "$VICTIM exited $(state .State.ExitCode "$VICTIM") after docker stop"
grep -q '"state":"succeeded"' "$WORK/long.out" || fail "no succeeded event: $(cat "$WORK/long.out")"
grep -q '"attempt":1,' "$WORK/long.out" || fail "the long task ran more than once: $(cat "$WORK/long.out")"
grep -q "\"worker\":\"$VICTIM/" "$WORK/long.out" || fail "the long task did not finish on $VICTIM: $(cat "$WORK/long.out")"
[ "$STOP_MS" -ge 3000 ] || fail "docker stop returned after $STOP_MS ms, before the task could finish"
log "docker stop $VICTIM took $STOP_MS ms: the task finished there (attempt 1) and the container exited 0"

STARTED[$VICTIM]="$(now_ms)"
docker start "$VICTIM" >/dev/null
wait_healthy "$VICTIM"

# ---- docker kill loses nothing ----
log "publishing 48 diag.sleep of 1.5 s, then docker kill on a busy worker"
"$W" publish diag.sleep '{"ms":1500}' --count 48 --wait --timeout-ms $((SECS * 2000)) >"$WORK/kill.out" 2>&1 &
KILL_PID=$!
VICTIM="$(busy_worker "$W1" "$W2")"
HELD="$(running "$VICTIM")"
docker kill "$VICTIM" >/dev/null
t0="$(now_ms)"
wait "$KILL_PID" || {
    cat "$WORK/kill.out" >&2
    fail "tasks were lost or failed after docker kill"
}
grep -E '^all ' "$WORK/kill.out" >&2
[ "$(state .State.ExitCode "$VICTIM")" = 137 ] || fail "$VICTIM exited $(state .State.ExitCode "$VICTIM"), not 137 (SIGKILL)"
DEAD="$(mgmt_get "queues/$BROKER_VHOST_ENC/$PREFIX.dead" | grep -oE '"messages":[0-9]+' | head -n 1 | cut -d: -f2)"
[ "${DEAD:-0}" = 0 ] || fail "$DEAD tasks dead after docker kill"
log "docker kill $VICTIM with $HELD tasks running: all 48 succeeded $(($(now_ms) - t0)) ms later, none dead"

# ---- the tracker saw it ----
tracked() {
    curl -sf -m 2 -H "Authorization: Bearer $TOKEN" \
        "http://127.0.0.1:${PORT[$TRACKER]}/api/tasks/$LONG_ID" 2>/dev/null | grep -q '"succeeded"'
}
wait_for 30 tracked || fail "the tracker has no succeeded record of $LONG_ID"
log "the tracker recorded $LONG_ID as succeeded"

MEM="$(docker stats --no-stream --format '{{.Name}} {{.MemUsage}}' "$SCHED" "$TRACKER" "$( [ "$VICTIM" = "$W1" ] && echo "$W2" || echo "$W1")" |
    sed "s/^$NAME-//")"

ELAPSED_S="$(awk -v a="$BEGAN" -v b="$(date +%s%N)" 'BEGIN { printf "%.0f", (b - a) / 1e9 }')"
{
    echo "container test passed in ${ELAPSED_S} s"
    echo "  image $IMAGE: $IMAGE_MB MB (built in $BUILD_MS ms from $BIN, stripped)"
    for s in "${STARTUP[@]}"; do echo "  $s"; done
    echo "  docker stop of a worker running a task: $STOP_MS ms"
    echo "  memory after the runs:"
    printf '%s\n' "$MEM" | sed 's/^/    /'
} >&2
