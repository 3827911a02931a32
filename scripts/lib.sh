# shellcheck shell=bash
# shellcheck disable=SC2034  # BROKER_* and WARREN_MGMT_* are read by the scripts that source this
# Helpers shared by the Warren scripts. Source it, do not run it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Every wait is bounded; every failure ends the calling script with one clear
# line on stderr.
#
# Environment read here:
#   WARREN__BROKER__URL  AMQP URI of the broker (default amqp://guest:guest@127.0.0.1:5672/%2f)
#   WARREN_MGMT_URL      management HTTP API base (default http://<broker host>:15672)
#   WARREN_MGMT_USER / WARREN_MGMT_PASS
#                        management credentials (default: the broker URL's, else guest/guest)
#   WARREN_WAIT_SECS     bound for each wait below (default 60)

WARREN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WARREN_DEFAULT_BROKER_URL='amqp://guest:guest@127.0.0.1:5672/%2f'

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Run a command as root: directly if we are root, through sudo if it exists.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for '$*' (not root and no sudo)"
    fi
}

# apt-get install that refreshes the package lists once if the first try fails
# (a fresh machine often has none).
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "cannot install $*: no apt-get on this machine; install it by hand"
    log "installing $* with apt-get"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 ||
            die "apt-get install $* failed"
    fi
}

# Percent-decode a string (for user:pass in the broker URL).
urldecode() {
    local s="${1//+/ }"
    printf '%b' "${s//%/\\x}"
}

# Parse WARREN__BROKER__URL into BROKER_SCHEME BROKER_USER BROKER_PASS
# BROKER_HOST BROKER_PORT BROKER_VHOST_ENC (vhost as it appears in URLs,
# percent-encoded; %2F for "/").
parse_broker_url() {
    local url="${WARREN__BROKER__URL:-$WARREN_DEFAULT_BROKER_URL}"
    local rest userinfo hostport path
    case "$url" in
        amqp://*) BROKER_SCHEME=amqp BROKER_PORT=5672 rest="${url#amqp://}" ;;
        amqps://*) BROKER_SCHEME=amqps BROKER_PORT=5671 rest="${url#amqps://}" ;;
        *) die "WARREN__BROKER__URL must start with amqp:// or amqps:// (got '$url')" ;;
    esac
    rest="${rest%%\?*}"
    if [[ "$rest" == */* ]]; then
        hostport="${rest%%/*}"
        path="${rest#*/}"
    else
        hostport="$rest"
        path=""
    fi
    BROKER_USER=guest BROKER_PASS=guest
    if [[ "$hostport" == *@* ]]; then
        userinfo="${hostport%@*}"
        hostport="${hostport##*@}"
        BROKER_USER="$(urldecode "${userinfo%%:*}")"
        if [[ "$userinfo" == *:* ]]; then
            BROKER_PASS="$(urldecode "${userinfo#*:}")"
        else
            BROKER_PASS=""
        fi
    fi
    if [[ "$hostport" == \[* ]]; then # [ipv6]:port
        BROKER_HOST="${hostport%%]*}"
        BROKER_HOST="${BROKER_HOST#[}"
        local after="${hostport#*]}"
        [[ "$after" == :?* ]] && BROKER_PORT="${after#:}"
    elif [[ "$hostport" == *:* ]]; then
        BROKER_HOST="${hostport%%:*}"
        BROKER_PORT="${hostport##*:}"
    else
        BROKER_HOST="$hostport"
    fi
    [ -n "$BROKER_HOST" ] || BROKER_HOST=127.0.0.1
    [[ "$BROKER_PORT" =~ ^[0-9]+$ ]] || die "bad port in WARREN__BROKER__URL: '$BROKER_PORT'"
    BROKER_VHOST_ENC="${path:-%2F}"
}

broker_is_local() {
    case "$BROKER_HOST" in
        127.* | localhost | ::1) return 0 ;;
        *) return 1 ;;
    esac
}

# True if something accepts TCP connections on host:port (2 s bound).
port_open() {
    # shellcheck disable=SC2016  # $0/$1 expand in the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# wait_for SECONDS COMMAND...: run COMMAND once a second until it succeeds,
# at most about SECONDS times.
wait_for() {
    local secs="$1" i
    shift
    for ((i = 0; i < secs; i++)); do
        "$@" && return 0
        sleep 1
    done
    "$@"
}

# Make sure an AMQP broker answers on the host:port of WARREN__BROKER__URL.
# For a local broker: install Debian's rabbitmq-server if missing, start it
# detached, wait for the port.
ensure_broker() {
    parse_broker_url
    local secs="${WARREN_WAIT_SECS:-60}"
    if port_open "$BROKER_HOST" "$BROKER_PORT"; then
        log "broker answers on $BROKER_HOST:$BROKER_PORT"
        return 0
    fi
    broker_is_local ||
        die "no broker answers on $BROKER_HOST:$BROKER_PORT (remote host: start it there, or point WARREN__BROKER__URL elsewhere)"
    if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
        apt_install rabbitmq-server
        # The package may have started the service itself.
        if wait_for 10 port_open "$BROKER_HOST" "$BROKER_PORT"; then
            log "broker answers on $BROKER_HOST:$BROKER_PORT"
            return 0
        fi
    fi
    local server
    server="$(command -v rabbitmq-server || echo /usr/sbin/rabbitmq-server)"
    log "starting RabbitMQ ($server -detached)"
    # A node that is already booting makes this fail harmlessly; the port wait decides.
    as_root "$server" -detached >&2 || warn "rabbitmq-server -detached returned non-zero; waiting for the port anyway"
    log "waiting up to ${secs}s for $BROKER_HOST:$BROKER_PORT"
    wait_for "$secs" port_open "$BROKER_HOST" "$BROKER_PORT" ||
        die "RabbitMQ did not answer on $BROKER_HOST:$BROKER_PORT within ${secs}s (see /var/log/rabbitmq/)"
    log "broker answers on $BROKER_HOST:$BROKER_PORT"
}

# Management API settings: WARREN_MGMT_URL, WARREN_MGMT_USER, WARREN_MGMT_PASS.
mgmt_settings() {
    parse_broker_url
    local host="$BROKER_HOST"
    [[ "$host" == *:* ]] && host="[$host]"
    WARREN_MGMT_URL="${WARREN_MGMT_URL:-http://$host:15672}"
    WARREN_MGMT_URL="${WARREN_MGMT_URL%/}"
    WARREN_MGMT_USER="${WARREN_MGMT_USER:-$BROKER_USER}"
    WARREN_MGMT_PASS="${WARREN_MGMT_PASS-$BROKER_PASS}"
}

# mgmt_get PATH: GET $WARREN_MGMT_URL/api/PATH, body on stdout, fails on HTTP errors.
mgmt_get() {
    curl -sf -m 3 -u "$WARREN_MGMT_USER:$WARREN_MGMT_PASS" "$WARREN_MGMT_URL/api/$1"
}

mgmt_up() { mgmt_get overview >/dev/null 2>&1; }

# Make sure the management HTTP API answers; enable the plugin if it does not.
ensure_management() {
    command -v curl >/dev/null 2>&1 || apt_install curl
    mgmt_settings
    local secs="${WARREN_WAIT_SECS:-60}"
    if mgmt_up; then
        log "management API answers on $WARREN_MGMT_URL"
        return 0
    fi
    broker_is_local ||
        die "management API does not answer on $WARREN_MGMT_URL (enable rabbitmq_management on that broker)"
    local plugins
    plugins="$(command -v rabbitmq-plugins || echo /usr/sbin/rabbitmq-plugins)"
    [ -x "$plugins" ] || die "rabbitmq-plugins not found; cannot enable rabbitmq_management"
    log "enabling rabbitmq_management"
    as_root "$plugins" enable rabbitmq_management >&2 ||
        die "rabbitmq-plugins enable rabbitmq_management failed"
    log "waiting up to ${secs}s for $WARREN_MGMT_URL"
    wait_for "$secs" mgmt_up ||
        die "management API did not answer on $WARREN_MGMT_URL within ${secs}s"
    log "management API answers on $WARREN_MGMT_URL"
}

# Make sure cargo (and, with "full", rustfmt and clippy) are available.
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust with rustup (https://rustup.rs), then open a new shell"
    if [ "${1:-}" = full ]; then
        if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
            command -v rustup >/dev/null 2>&1 ||
                die "cargo fmt/clippy missing and no rustup to add them (rustup component add rustfmt clippy)"
            log "adding rustfmt and clippy (rustup component add)"
            rustup component add rustfmt clippy >&2 || die "rustup component add rustfmt clippy failed"
        fi
    fi
    log "$(cargo --version)"
}

# Create DIR/.venv and install DIR/requirements.txt into it, only when the
# venv is missing, the requirements (or python) changed, or the modules in
# IMPORTS (comma-separated) no longer import. Sets VENV_PYTHON.
ensure_venv() {
    local dir="$1" imports="${2:-sys}"
    local venv="$dir/.venv" req="$dir/requirements.txt"
    local stamp="$venv/.requirements.stamp" want
    [ -f "$req" ] || die "missing $req"
    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-venv
    fi
    want="$(
        python3 --version 2>&1
        sha256sum "$req" | cut -d' ' -f1
    )"
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
        "$venv/bin/python" -c "import $imports" >/dev/null 2>&1; then
        log "python venv up to date ($venv)"
    else
        log "creating python venv $venv"
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >&2; then
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv" >&2 || die "python3 -m venv $venv failed"
        fi
        log "pip install -r $req"
        # pip's output goes to a log, so a failure ends with one line naming it.
        local piplog
        piplog="$(mktemp -t pip-install.XXXXXX)"
        if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --timeout 60 -r "$req" >"$piplog" 2>&1; then
            rm -rf "$venv"
            die "pip install -r $req failed: $(grep -E '^ERROR' "$piplog" | tail -n 1 | cut -c1-200) (full output: $piplog)"
        fi
        rm -f "$piplog"
        printf '%s\n' "$want" >"$stamp"
    fi
    VENV_PYTHON="$venv/bin/python"
}

# The interop tests' venv (tests/interop): pika, and schemathesis for the
# tracker API's conformance test. Exports WARREN_INTEROP_PYTHON.
ensure_python_venv() {
    ensure_venv "$WARREN_ROOT/tests/interop" pika,schemathesis
    export WARREN_INTEROP_PYTHON="$VENV_PYTHON"
}

# Make sure headless Chromium is there for the dashboard test (Debian's
# chromium package). Exports WARREN_CHROMIUM (its path).
ensure_chromium() {
    local bin
    bin="$(command -v chromium || command -v chromium-browser || true)"
    if [ -z "$bin" ]; then
        apt_install chromium
        bin="$(command -v chromium)" || die "chromium is not on the PATH after installing it"
    fi
    log "$("$bin" --version 2>/dev/null || echo "$bin")"
    export WARREN_CHROMIUM="$bin"
}

# The openssl command makes the CA and certificates of the TLS test
# (tests/e2e/tls.rs) at run time.
ensure_openssl() {
    if ! command -v openssl >/dev/null 2>&1; then
        apt_install openssl
        command -v openssl >/dev/null 2>&1 || die "openssl is not on the PATH after installing it"
    fi
}

# docker-compose (Debian's package) validates docker-compose.yml; no Docker
# engine is needed for `docker-compose config`.
ensure_compose() {
    if ! command -v docker-compose >/dev/null 2>&1; then
        apt_install docker-compose
        command -v docker-compose >/dev/null 2>&1 || die "docker-compose is not on the PATH after installing it"
    fi
}

# cargo-fuzz (libFuzzer targets, scripts/fuzz.sh), installed from crates.io
# when missing. It needs a C++ compiler to build libFuzzer itself.
ensure_cargo_fuzz() {
    if ! command -v c++ >/dev/null 2>&1; then
        apt_install g++
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
        cargo install cargo-fuzz --locked >&2 || die "cargo install cargo-fuzz failed"
    fi
    log "$(cargo fuzz --version)"
}

# The container test's tools (scripts/test-containers.sh): Debian's docker.io
# (dockerd, containerd, runc and a docker client with BuildKit built in) and
# debootstrap (the local base image). A failed install only warns: the
# container test then skips with the reason.
ensure_container_tools() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
    if [ "${#missing[@]}" -gt 0 ]; then
        # apt_install ends its shell on failure: run it in a subshell.
        (apt_install "${missing[@]}") || warn "could not install ${missing[*]}: the container test will be skipped"
    fi
    if command -v dockerd >/dev/null 2>&1; then
        log "$(dockerd --version 2>/dev/null || echo dockerd)"
    fi
}

# The Debian mirror apt uses (first deb.debian.org-style "debian" source of
# /etc/apt/sources.list*), for debootstrap; deb.debian.org when none is found.
debian_mirror() {
    local m
    m="$(
        {
            grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
            grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                sed -E 's/^deb (\[[^]]*\] )?//' | awk '{print $1}'
        } | grep -E '/debian/?$' | head -n 1
    )"
    echo "${m:-http://deb.debian.org/debian}"
}

# debian_base_tarball SUITE: prints the path of a cached root file system
# tarball of Debian SUITE (debootstrap --variant=minbase, with
# ca-certificates; documentation, manuals, locales and package caches
# removed), made on the first call and kept under
# ${XDG_CACHE_HOME:-~/.cache}/warren. Needs root and debootstrap.
debian_base_tarball() {
    local suite="$1"
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/warren"
    local tar="$cache/debian-$suite-minbase.tar"
    if [ -s "$tar" ]; then
        echo "$tar"
        return 0
    fi
    local deboot root mirror
    deboot="$(command -v debootstrap || echo /usr/sbin/debootstrap)"
    [ -x "$deboot" ] || die "debootstrap is not installed"
    mkdir -p "$cache"
    root="$(mktemp -d "$cache/rootfs.XXXXXX")"
    mirror="$(debian_mirror)"
    log "debootstrap --variant=minbase $suite from $mirror (once; cached in $tar)"
    if ! as_root "$deboot" --variant=minbase --include=ca-certificates "$suite" "$root" "$mirror" >"$root.log" 2>&1; then
        as_root rm -rf "$root"
        die "debootstrap failed: $(tail -n 1 "$root.log") (full output: $root.log)"
    fi
    as_root rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/var/log/*
    as_root tar --numeric-owner -C "$root" -cf "$tar.partial" . || die "tar of $root failed"
    mv "$tar.partial" "$tar"
    as_root rm -rf "$root" "$root.log"
    echo "$tar"
}
