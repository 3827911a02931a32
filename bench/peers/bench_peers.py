"""Celery and Dramatiq on the same broker and workloads as `warren bench`.

Run through scripts/bench-peers.sh, which makes the venv. Scenarios, matching
crates/warren-bench/src/scenarios.rs:

throughput  N echo tasks published with confirms into the peer's own queue
            from one thread (publish rate = N / publish time); then the
            peer's worker is started and drains the preloaded queue: drain
            rate = (N - 1) / (last task finished - first task finished), as
            Warren's (N - 1) / (last succeeded event - first). The worker's
            process tree is sampled from /proc every 100 ms: peak RSS = sum of
            VmHWM over the tree; CPU per task = utime+stime of the tree / N
            (start-up included, as Warren's), and again counting only from
            the first finished task on ("after start-up"). After the drain the
            worker is stopped and the queue must be empty: a message not acked
            would be back in it.
latency     a worker is started and one warm-up task run; then N = rate x
            duration tasks are sent on a fixed schedule (task i at i/rate)
            from --publishers threads, each task carrying its send time
            (time.time() just before the send); the task records its start
            time; enqueue->start percentiles (nearest rank, as Warren's).

Completions are counted through one fixed-width line appended per task to a
per-process file (peerrec.py), so nothing else is added to the task.

Every scenario also reports what else was going on: the CPU that other
processes of the machine used meanwhile (OtherLoad), and the most
connections of other clients seen on the broker (BrokerClients); either
one above its threshold prints a warning under the table. On a 2-core
machine a build next door, or someone else's tests on the same broker,
moves every figure. --wait-idle SECS waits for a quiet machine before each
measured phase.
"""

import argparse
import atexit
import base64
import contextlib
import glob
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/%2f"
MB = 1024.0 * 1024.0
TICK = os.sysconf("SC_CLK_TCK")
FINISH_WIDTH = 18  # peerrec.FINISH_WIDTH
START_WIDTH = 36  # peerrec.START_WIDTH
# Above this (% of a core) a scenario's figures are flagged as disturbed. The
# estimate itself is rough: in a VM, /proc/stat and the per-process times
# can disagree by a few tens of % of a core (steal time).
OTHER_LOAD_WARN = 25.0
PEERS = ("celery", "dramatiq")
SCENARIOS = ("throughput", "latency")
NOTE = (
    "note: neither peer emits a per-task status event (Celery's task events stay "
    "off, its default, and it has no result backend here; Dramatiq has none), "
    "while Warren publishes and confirms a succeeded event before each ack: "
    "the peers do less broker work per task."
)


class BenchError(Exception):
    pass


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


_progress_tty = sys.stderr.isatty()


def progress(label, done, total):
    if _progress_tty:
        print(f"\r    {label}: {done}/{total}   ", end="", file=sys.stderr, flush=True)


def progress_end():
    if _progress_tty:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)


@contextlib.contextmanager
def deadline(seconds, what):
    """Raises BenchError if the block takes longer than `seconds`."""

    def fire(signum, frame):
        raise BenchError(f"{what}: not done within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- broker


class Mgmt:
    """The RabbitMQ management HTTP API (listing, deleting, version)."""

    def __init__(self, base, user, password, vhost):
        self.base = base.rstrip("/")
        self.vhost = urllib.parse.quote(vhost, safe="")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.auth = f"Basic {token}"

    def _call(self, method, path):
        req = urllib.request.Request(self.base + "/api/" + path, method=method)
        req.add_header("Authorization", self.auth)
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
        return json.loads(body) if body else None

    def overview(self):
        return self._call("GET", "overview")

    def names(self, kind):
        return [x["name"] for x in self._call("GET", f"{kind}/{self.vhost}?columns=name")]

    def client_ports(self):
        """Client-side ports of the broker's AMQP connections."""
        return [c.get("peer_port") for c in self._call("GET", "connections?columns=peer_port")]

    def delete(self, kind, name):
        try:
            self._call("DELETE", f"{kind}/{self.vhost}/{urllib.parse.quote(name, safe='')}")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise


def vhost_of(url):
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def queue_depth(url, queue):
    """Messages ready in `queue` (passive declare: exact, no stats delay)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        return ch.queue_declare(queue=queue, passive=True).method.message_count
    finally:
        with contextlib.suppress(Exception):
            conn.close()


# ---------------------------------------------------------------- /proc


def _children(pid):
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def _proc_sample(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    kb = {}
    for line in status.splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            kb[line.split(":")[0]] = int(line.split()[1])
    return {
        "cpu_s": (int(fields[11]) + int(fields[12])) / TICK,
        "hwm": kb.get("VmHWM", 0) * 1024,
        "rss": kb.get("VmRSS", 0) * 1024,
    }


def _pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_by_process():
    """{pid: (start time, CPU seconds, kernel thread?)} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            fields = stat[stat.rfind(")") + 2 :].split()
            kthread = d == "2" or fields[1] == "2"  # kthreadd and its children
            out[int(d)] = (fields[19], (int(fields[11]) + int(fields[12])) / TICK, kthread)
    return out


def _local_ports(pids):
    """Local TCP ports of the sockets that processes `pids` hold."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[9] in inodes:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


class BrokerClients:
    """Largest number of other clients' connections seen on the broker (a
    shared broker busy with someone else's work moves the figures too)."""

    def __init__(self, mgmt, tree):
        self.mgmt, self.tree, self.most, self.last = mgmt, tree, 0, 0.0

    def sample(self, every_s=1.0):
        now = time.monotonic()
        if now - self.last < every_s:
            return
        self.last = now
        with contextlib.suppress(Exception):
            ours = _local_ports([os.getpid(), *self.tree.pids()])
            self.most = max(self.most, sum(1 for p in self.mgmt.client_ports() if p not in ours))


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _machine_busy_s():
    """CPU seconds all cores spent busy (user, nice, system), /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system = (int(x) for x in f.readline().split()[1:4])
    return (user + nice + system) / TICK


def _pid_cpu_s(pid):
    s = _proc_sample(pid)
    return s["cpu_s"] if s else 0.0


def _broker_pids():
    """A local RabbitMQ: beam.smp and its helpers (erl_child_setup and what
    it starts), whose CPU is part of the run."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "beam.smp":
                        out.extend(Tree(int(d)).pids())
    return out


def wait_idle(limit_s, label):
    """Waits (at most `limit_s`) for the machine to be nearly idle, busy under
    15% of a core over 2 s, before a measured phase; then measures anyway."""
    if limit_s <= 0:
        return
    end, said = time.monotonic() + limit_s, False
    while True:
        b0, t0 = _machine_busy_s(), time.monotonic()
        time.sleep(2.0)
        busy = (_machine_busy_s() - b0) / (time.monotonic() - t0) * 100.0
        if busy < 15.0:
            return
        if time.monotonic() > end:
            log(f"{label}: the machine is still busy ({busy:.0f}% of a core) after {limit_s:.0f} s; measuring anyway")
            return
        if not said:
            log(f"{label}: waiting up to {limit_s:.0f} s for the machine to be idle (busy {busy:.0f}% of a core)")
            said = True


class OtherLoad:
    """CPU that other processes of the machine used between start() and
    stop(), in % of one core. This run's own processes (the driver, the
    worker tree, a local broker and its helpers) and the kernel's threads
    (where the broker's disk flushes and the loopback traffic run) are left
    out. Two estimates, the larger reported: the machine's busy time
    (/proc/stat) less ours, which sees short-lived processes too, and the sum
    over the other processes alive at the end. On a 2-core machine a build
    next door moves every figure, so each scenario reports this. It is rough
    (see OTHER_LOAD_WARN), and it cannot see other clients' load on a shared
    broker: the broker's CPU in the log line shows that."""

    def __init__(self, tree):
        self.tree = tree

    def _ours(self):
        return {os.getpid(), os.getppid(), *self.tree.pids(), *self.tree.last, *_broker_pids()}

    def start(self):
        self.tree.sample()
        self.t0, self.snap0, self.busy0 = time.monotonic(), _cpu_by_process(), _machine_busy_s()

    def stop(self):
        self.tree.sample()
        snap1, busy1 = _cpu_by_process(), _machine_busy_s()
        wall = max(time.monotonic() - self.t0, 1e-9)
        ours = self._ours()
        used = {}
        for pid, (started, cpu, kthread) in snap1.items():
            before = self.snap0.get(pid)
            used[pid] = cpu - before[1] if before and before[0] == started else cpu
        ours_s = sum(used[p] for p in used if p in ours or snap1[p][2])
        others = sorted(((u, p) for p, u in used.items() if p not in ours and not snap1[p][2]), reverse=True)
        by_process = sum(u for u, _ in others)
        by_machine = (busy1 - self.busy0) - ours_s
        other = max(by_process, by_machine, 0.0)

        def pct(x):
            return f"{x / wall * 100:.0f}%"

        broker = sum(used.get(p, 0.0) for p in _broker_pids())
        self.detail = (
            f"{wall:.1f} s: machine busy {pct(busy1 - self.busy0)} of a core; other processes "
            f"{pct(by_machine)} (busy less ours) / {pct(by_process)} (summed), broker {pct(broker)}, "
            f"driver {pct(used.get(os.getpid(), 0.0))}, worker processes "
            + "+".join(pct(used.get(p, 0.0)) for p in self.tree.last)
        )
        top = [(u, p) for u, p in others[:4] if u > 0.05 * wall]
        if top:
            self.detail += "; others: " + ", ".join(f"{_comm(p)}[{p}] {pct(u)}" for u, p in top)
        return other / wall * 100.0


class Tree:
    """A process and its descendants; keeps each one's last sample, so a
    process that exits between samples still counts with what it used."""

    def __init__(self, root):
        self.root = root
        self.last = {}

    def pids(self):
        seen, stack = [], [self.root]
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.append(pid)
            stack.extend(_children(pid))
        return seen

    def sample(self):
        live = self.pids()
        for pid in live:
            s = _proc_sample(pid)
            if s:
                self.last[pid] = s
        return live

    def cpu_s(self):
        return sum(s["cpu_s"] for s in self.last.values())

    def hwm(self):
        return sum(s["hwm"] for s in self.last.values())

    def pss(self):
        return sum(_pss(pid) for pid in self.pids())


# ---------------------------------------------------------------- workers


class Workers:
    """Worker subprocesses, each in a session (process group) of its own,
    listed in a pid file that scripts/bench-peers.sh's trap also reads
    ("pgid N" lines), with the prefixes and record directories not yet
    cleaned up ("prefix P", "tmp DIR" lines), so that the trap can end the
    workers and delete the queues and files even if this driver is killed."""

    def __init__(self, pidfile):
        self.pidfile = pidfile
        self.live = {}
        self.prefixes = set()
        atexit.register(self.stop_all)

    def _write(self):
        if self.pidfile:
            with open(self.pidfile + ".tmp", "w") as f:
                f.writelines(f"pgid {pgid}\n" for pgid in self.live)
                f.writelines(f"prefix {p}\ntmp {t}\n" for p, t in sorted(self.prefixes))
            os.replace(self.pidfile + ".tmp", self.pidfile)

    def add_prefix(self, prefix, tmp):
        self.prefixes.add((prefix, tmp))
        self._write()

    def drop_prefix(self, prefix, tmp):
        self.prefixes.discard((prefix, tmp))
        self._write()

    def start(self, cmd, env, log_path):
        logf = open(log_path, "wb")
        proc = subprocess.Popen(
            cmd,
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()
        self.live[proc.pid] = proc
        self._write()
        return proc

    def stop(self, proc, grace=15.0):
        """SIGTERM to the worker's group; SIGKILL after `grace` seconds."""
        pgid = proc.pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"worker {pgid} still running {grace:.0f} s after SIGTERM: SIGKILL")
        # Anything of the group still there (children the parent left) goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.live.pop(pgid, None)
        self._write()

    def stop_all(self):
        for proc in list(self.live.values()):
            self.stop(proc, grace=5.0)


# ---------------------------------------------------------------- records


def _files(d, kind):
    return glob.glob(os.path.join(d, f"{kind}.*"))


def count_records(d, kind, width):
    total = 0
    for p in _files(d, kind):
        with contextlib.suppress(OSError):
            total += os.stat(p).st_size // width
    return total


def read_records(d, kind):
    out = []
    for p in _files(d, kind):
        with open(p) as f:
            out.extend([float(x) for x in line.split()] for line in f if line.strip())
    return out


def summarize(samples):
    """Nearest-rank percentiles, as crates/warren-bench/src/stats.rs."""
    if not samples:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    s = sorted(samples)
    n = len(s)

    def at(q):
        rank = min(max(math.ceil(q * n), 1), n)
        return s[rank - 1]

    return {"count": n, "p50": at(0.50), "p99": at(0.99), "p999": at(0.999), "max": s[-1]}


# ---------------------------------------------------------------- scenarios


class Run:
    """One peer's run: its module, prefix, worker starts and results."""

    def __init__(self, peer, args, workers, mgmt, url):
        self.peer = peer
        self.args = args
        self.workers = workers
        self.mgmt = mgmt
        self.url = url
        self.prefix = f"peerbench-{peer}-{uuid.uuid4().hex[:8]}"
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        workers.add_prefix(self.prefix, self.tmp)
        os.environ["PEER_BENCH_PREFIX"] = self.prefix
        os.environ["PEER_BENCH_BROKER"] = url
        os.environ["PEER_BENCH_DRAMATIQ_PROCESSES"] = str(args.dramatiq_processes)
        os.environ["PEER_BENCH_DRAMATIQ_THREADS"] = str(args.dramatiq_threads)
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        self.mod = importlib.import_module(f"{peer}_app")
        self.notes = []
        self.clients = None  # BrokerClients of the phase being measured

    def row(self, scenario, metric, unit, value):
        return {"peer": self.peer, "scenario": scenario, "metric": metric, "unit": unit, "value": value}

    def start_worker(self, name):
        out = os.path.join(self.tmp, name)
        os.makedirs(out)
        env = dict(os.environ, PEER_BENCH_OUT=out, PYTHONDONTWRITEBYTECODE="1")
        proc = self.workers.start(self.mod.worker_command(VENV_BIN), env, os.path.join(self.tmp, f"{name}.log"))
        return proc, Tree(proc.pid), out

    def worker_log_tail(self, name, lines=15):
        try:
            with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def wait_records(self, proc, tree, out, kind, width, want, label, start_limit=60.0, idle_limit=30.0, on_first=None):
        """Polls every 100 ms until `want` records; bounded by `start_limit`
        before the first and `idle_limit` without progress after it."""
        seen, last_change = 0, time.monotonic()
        while True:
            tree.sample()
            if self.clients:
                self.clients.sample()
            c = count_records(out, kind, width)
            now = time.monotonic()
            if c > seen:
                if seen == 0 and on_first:
                    on_first(c)
                seen, last_change = c, now
            progress(label, c, want)
            if c >= want:
                progress_end()
                return
            if proc.poll() is not None:
                progress_end()
                raise BenchError(f"{label}: the worker exited (code {proc.returncode}) after {c} of {want}")
            limit = start_limit if c == 0 else idle_limit
            if now - last_change > limit:
                progress_end()
                raise BenchError(f"{label}: only {c} of {want} done, nothing for {limit:.0f} s")
            time.sleep(0.1)

    def throughput(self):
        n = self.args.n
        q = self.mod.QUEUE
        wait_idle(self.args.wait_idle, f"{self.peer} publish")
        log(f"{self.peer}: throughput: publishing {n} tasks with confirms to {q}")
        with deadline(max(120.0, n / 50.0), f"{self.peer}: publish {n}"):
            t0 = time.perf_counter()
            for i in range(n):
                self.mod.publish_echo({"i": i})
                if i % 500 == 0:
                    progress("publish", i, n)
            publish_s = time.perf_counter() - t0
        progress_end()
        depth = queue_depth(self.url, q)
        if depth != n:
            raise BenchError(f"{self.peer}: after publishing {n} tasks the queue holds {depth}")
        log(f"{self.peer}: published {n} in {publish_s:.2f} s")
        wait_idle(self.args.wait_idle, f"{self.peer} drain")
        log(f"{self.peer}: starting the worker to drain the queue")
        proc, tree, out = self.start_worker("throughput")
        load = OtherLoad(tree)
        load.start()
        self.clients = BrokerClients(self.mgmt, tree)
        self.clients.sample(0)
        first = {}
        try:

            def on_first(c):
                first["cpu_s"], first["done"] = tree.cpu_s(), c

            self.wait_records(proc, tree, out, "finish", FINISH_WIDTH, n, f"{self.peer} drain", on_first=on_first)
            other = load.stop()
            self.clients.sample(0)
            cpu_s, hwm, pss = tree.cpu_s(), tree.hwm(), tree.pss()
            nprocs = len(tree.pids())
        except BenchError:
            tail = self.worker_log_tail("throughput")
            if tail:
                log(f"{self.peer} worker log (last lines):\n{tail}")
            raise
        finally:
            self.workers.stop(proc)
        left = queue_depth(self.url, q)
        if left:
            self.notes.append(f"{self.peer}: {left} messages were still in the queue after the worker stopped")
        stamps = [r[0] for r in read_records(out, "finish")]
        if len(stamps) != n:
            self.notes.append(f"{self.peer}: {len(stamps)} task completions recorded for {n} tasks published")
        span = max(stamps) - min(stamps)
        drain = (max(n, 2) - 1) / max(span, 1e-9)
        after = (cpu_s - first["cpu_s"]) / max(n - first["done"], 1) * 1000.0
        log(
            f"{self.peer}: drained {n} in {span:.2f} s; worker tree of {nprocs} processes; "
            f"queue depth after stop {left}"
        )
        log(f"{self.peer}: CPU from worker start to drained, {load.detail}")
        s = "throughput"
        return [
            self.row(s, "publish with confirms", "tasks/s", n / publish_s),
            self.row(s, "worker drain (no status events)", "tasks/s", drain),
            self.row(s, "worker CPU per task", "ms", cpu_s * 1000.0 / n),
            self.row(s, "worker CPU per task after start-up", "ms", after),
            self.row(s, "worker peak RSS (sum of VmHWM)", "MB", hwm / MB),
            self.row(s, "worker PSS at end of drain", "MB", pss / MB),
            self.row(s, "other processes' CPU during the drain", "% of a core", other),
            self.row(s, "other clients' broker connections (most seen)", "count", self.clients.most),
        ]

    def paced_publish(self, total, rate, limit_s):
        """Sends `total` latency tasks at `rate`/s from --publishers threads,
        task i from thread i mod K at t0 + i/rate, each carrying time.time()
        taken just before its send. The peers' publish calls wait for each
        confirm, so one thread cannot hold a rate above 1/(confirm round
        trip); several threads, each on its own connection, can. Returns the
        seconds from t0 to the last send."""
        k = self.args.publishers
        barrier = threading.Barrier(k + 1)
        halt = threading.Event()
        errors, ends = [], []
        t0 = [0.0]

        def publisher(j):
            try:
                self.mod.warm_publisher(barrier)
                for i in range(j, total, k):
                    if halt.is_set():
                        return
                    wait = t0[0] + i / rate - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    self.mod.publish_lat(time.time())
                ends.append(time.perf_counter())
            except Exception as e:  # reported by the main thread
                errors.append(e)
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.abort()

        threads = [threading.Thread(target=publisher, args=(j,), daemon=True) for j in range(k)]
        for t in threads:
            t.start()
        try:
            try:
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                raise BenchError(f"{self.peer}: publisher threads did not connect: {errors[:1]}") from None
            t0[0] = time.perf_counter() + 0.05
            end = time.monotonic() + limit_s
            for t in threads:
                while t.is_alive() and time.monotonic() < end:
                    t.join(timeout=0.25)
                    if self.clients:
                        self.clients.sample()
                    sent = min(total, int((time.perf_counter() - t0[0]) * rate))
                    progress(f"{self.peer} paced publish", max(sent, 0), total)
        finally:
            # On an error or an interrupt, no thread may publish (and so
            # declare the queue again) after the cleanup.
            halt.set()
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()
            for t in threads:
                t.join(timeout=5)
            progress_end()
        if errors:
            raise BenchError(f"{self.peer}: paced publish failed: {type(errors[0]).__name__}: {errors[0]}")
        if any(t.is_alive() for t in threads):
            raise BenchError(f"{self.peer}: paced publish not done within {limit_s:.0f} s")
        return max(ends) - t0[0]

    def latency(self):
        rate, duration = self.args.rate, self.args.duration
        total = int(rate * duration)
        log(f"{self.peer}: latency: starting the worker, {total} tasks at {rate:g}/s")
        proc, tree, out = self.start_worker("latency")
        load = OtherLoad(tree)
        try:
            # Warm-up: one task through, so the worker consumes before timing starts.
            with deadline(60.0, f"{self.peer}: warm-up publish"):
                self.mod.publish_lat(0.0)
            self.wait_records(proc, tree, out, "start", START_WIDTH, 1, f"{self.peer} warm-up")
            wait_idle(self.args.wait_idle, f"{self.peer} latency")
            load.start()
            self.clients = BrokerClients(self.mgmt, tree)
            self.clients.sample(0)
            cpu0 = time.process_time()
            publish_s = self.paced_publish(total, rate, duration * 3 + 60.0)
            publisher_cpu = (time.process_time() - cpu0) / publish_s * 100.0
            log(f"{self.peer}: published {total} in {publish_s:.2f} s (publisher CPU {publisher_cpu:.0f}% of a core)")
            self.wait_records(proc, tree, out, "start", START_WIDTH, total + 1, f"{self.peer} latency")
            other = load.stop()
            self.clients.sample(0)
            log(f"{self.peer}: CPU from the first paced send to the last start, {load.detail}")
        except BenchError:
            tail = self.worker_log_tail("latency")
            if tail:
                log(f"{self.peer} worker log (last lines):\n{tail}")
            raise
        finally:
            self.workers.stop(proc)
        lat = [max(start - sent, 0.0) * 1000.0 for sent, start in read_records(out, "start") if sent > 0]
        if len(lat) != total:
            self.notes.append(f"{self.peer}: {len(lat)} latency samples for {total} tasks sent")
        sm = summarize(lat)
        s = f"latency @{rate:g}/s"
        return [
            self.row(s, "paced publish rate achieved", "tasks/s", total / publish_s),
            self.row(s, "publisher CPU (same machine)", "% of a core", publisher_cpu),
            self.row(s, "enqueue->start p50", "ms", sm["p50"]),
            self.row(s, "enqueue->start p99", "ms", sm["p99"]),
            self.row(s, "enqueue->start p99.9", "ms", sm["p999"]),
            self.row(s, "enqueue->start max", "ms", sm["max"]),
            self.row(s, "other processes' CPU during the run", "% of a core", other),
            self.row(s, "other clients' broker connections (most seen)", "count", self.clients.most),
        ]

    def cleanup(self):
        """Deletes every queue and exchange named with this run's prefix."""
        with contextlib.suppress(Exception):
            close = getattr(self.mod, "close", None)
            if close:
                close()
        deleted = []
        try:
            for kind in ("queues", "exchanges"):
                for name in self.mgmt.names(kind):
                    if name.startswith(self.prefix):
                        self.mgmt.delete(kind, name)
                        deleted.append(name)
        except (urllib.error.URLError, OSError) as e:
            log(f"{self.peer}: management API cleanup failed ({e}); deleting the known names over AMQP")
            deleted += self._amqp_cleanup()
        log(f"{self.peer}: deleted {len(deleted)} queues/exchanges: {', '.join(sorted(deleted))}")
        self.workers.drop_prefix(self.prefix, self.tmp)
        if os.environ.get("PEER_BENCH_KEEP"):
            log(f"{self.peer}: kept the records and worker logs in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _amqp_cleanup(self):
        import pika

        q = self.mod.QUEUE
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        done = []
        try:
            for name in (q, f"{q}.DQ", f"{q}.XQ"):
                ch = conn.channel()
                with contextlib.suppress(Exception):
                    ch.queue_delete(queue=name)
                    done.append(name)
            ch = conn.channel()
            with contextlib.suppress(Exception):
                ch.exchange_delete(exchange=q)
                done.append(q)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return done


# ---------------------------------------------------------------- output


def fmt(v, unit=""):
    return f"{v:.0f}" if abs(v) >= 100 or unit == "count" else f"{v:.2f}"


def table(rows):
    head = ["peer", "scenario", "metric", "unit", "value"]
    cells = [[r["peer"], r["scenario"], r["metric"], r["unit"], fmt(r["value"], r["unit"])] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]

    def line(c):
        return "  ".join(
            (v.rjust(widths[i]) if i == 4 else v.ljust(widths[i])) for i, v in enumerate(c)
        ).rstrip()

    return "\n".join([line(head)] + [line(c) for c in cells])


def versions():
    out = {}
    for name in ("celery", "kombu", "amqp", "billiard", "dramatiq", "pika"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


# ---------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(
        prog="scripts/bench-peers.sh",
        description="Celery and Dramatiq on the same broker and workloads as `warren bench` "
        "(throughput and latency).",
    )
    p.add_argument("--quick", action="store_true", help="n=5000, duration 5 s (unless given)")
    p.add_argument("--n", type=int, help="tasks for throughput (default 20000; quick 5000)")
    p.add_argument("--rate", type=float, default=500.0, help="tasks/s for latency (default 500)")
    p.add_argument("--duration", type=float, help="seconds of paced publishing (default 10; quick 5)")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of celery,dramatiq")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of throughput,latency")
    p.add_argument("--dramatiq-processes", type=int, default=1, help="Dramatiq worker processes (default 1)")
    p.add_argument("--dramatiq-threads", type=int, default=8, help="Dramatiq threads per process (default 8)")
    p.add_argument(
        "--publishers",
        type=int,
        default=4,
        help="publisher threads holding the latency rate (default 4; each send waits for its confirm)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECS",
        help="before each measured phase, wait up to SECS for the machine to be idle (default 0: no wait)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    p.add_argument("--pidfile", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.n = a.n if a.n is not None else (5000 if a.quick else 20000)
    a.duration = a.duration if a.duration is not None else (5.0 if a.quick else 10.0)
    a.peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    a.scenarios = [x.strip() for x in a.scenarios.split(",") if x.strip()]
    for x in a.peers:
        if x not in PEERS:
            p.error(f"unknown peer {x!r} (choose from {', '.join(PEERS)})")
    for x in a.scenarios:
        if x not in SCENARIOS:
            p.error(f"unknown scenario {x!r} (choose from {', '.join(SCENARIOS)})")
    if a.n < 2 or a.rate <= 0 or a.duration <= 0 or a.publishers < 1 or a.dramatiq_processes < 1 or a.dramatiq_threads < 1:
        p.error("--n must be at least 2; --rate, --duration and the Dramatiq shape positive")
    return a


def main(argv):
    args = parse(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    url = os.environ.get("WARREN__BROKER__URL") or DEFAULT_BROKER
    host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
    mgmt_host = f"[{host}]" if ":" in host else host
    mgmt = Mgmt(
        os.environ.get("WARREN_MGMT_URL") or f"http://{mgmt_host}:15672",
        os.environ.get("WARREN_MGMT_USER") or urllib.parse.unquote(urllib.parse.urlsplit(url).username or "guest"),
        os.environ.get("WARREN_MGMT_PASS") or urllib.parse.unquote(urllib.parse.urlsplit(url).password or "guest"),
        vhost_of(url),
    )
    try:
        rabbit = mgmt.overview().get("rabbitmq_version", "?")
    except (urllib.error.URLError, OSError) as e:
        print(f"error: the management API does not answer at {mgmt.base} ({e})", file=sys.stderr)
        return 1
    workers = Workers(args.pidfile)
    rows, notes, failed = [], [], []
    header = [
        f"peers on RabbitMQ {rabbit} at {urllib.parse.urlsplit(url).hostname}, Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start",
        f"n={args.n} (one publisher thread); latency at {args.rate:g}/s for {args.duration:g} s "
        f"from {args.publishers} publisher threads; persistent messages, publisher confirms, "
        "acks after the task returns",
    ]
    for peer in args.peers:
        run = None
        try:
            run = Run(peer, args, workers, mgmt, url)
            header.append(run.mod.DESCRIPTION)
            if "throughput" in args.scenarios:
                rows.extend(run.throughput())
            if "latency" in args.scenarios:
                rows.extend(run.latency())
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(peer)
        except Exception as e:  # a library or broker error: report it, clean up, go on
            print(f"error: {peer}: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(peer)
        except KeyboardInterrupt:
            print("interrupted: stopping workers and cleaning up", file=sys.stderr)
            workers.stop_all()
            if run:
                run.cleanup()
            return 130
        finally:
            workers.stop_all()
        if run:
            notes.extend(run.notes)
            run.cleanup()
    out = sys.stderr if args.json else sys.stdout
    for h in header:
        print(h, file=out)
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(table(rows))
    for r in rows:
        if r["metric"].startswith("other processes") and r["value"] > OTHER_LOAD_WARN:
            notes.append(
                f"{r['peer']} {r['scenario']}: other processes used about {r['value']:.0f}% of a core "
                "meanwhile; its figures are disturbed (rerun on a quiet machine, or with --wait-idle)"
            )
    for r in rows:
        if r["metric"].startswith("other clients") and r["value"] > 0:
            notes.append(
                f"{r['peer']} {r['scenario']}: the broker had up to {r['value']:.0f} other clients' "
                "connections meanwhile; if they were busy, its figures are disturbed"
            )
    for n in notes:
        print(f"warning: {n}", file=out)
    print(NOTE, file=out)
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
