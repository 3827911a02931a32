"""Warren, Celery and Dramatiq on the same broker and workloads, in one run.

Run through scripts/bench-peers.sh, which makes the venv and builds warren.
The run is --rounds rounds; each round runs every peer (in an order rotated
by one each round, so no peer always follows the same one), first the
throughput scenario of each, then the latency scenario of each. The table
gives, per metric and peer, the median over the rounds and the median of the
per-round ratios to Warren's figure of the same round; a second table gives
the ranges. Peers:

warren         `warren bench throughput --n N --rounds 1` and `warren bench
               latency --rate R --duration D --rounds 1` (the release binary,
               shipped settings); each also measures the raw-lapin baseline
               worker of `warren bench`, reported as its own column.
celery         Celery's worker, task events off (its default).
celery-events  the same with -E (worker_send_task_events): task-received,
               task-started and task-succeeded per task, counted on the
               broker through a queue bound to the event exchange.
dramatiq       Dramatiq's worker (it has no task events).

Scenarios for Celery and Dramatiq, matching crates/warren-bench/src/scenarios.rs:

throughput  N echo tasks published with confirms into the peer's own queue
            from one thread (publish rate = N / publish time; publisher CPU
            per task = this driver's CPU time over the publish / N); then the
            peer's worker is started and drains the preloaded queue: drain
            rate = (N - 1) / (last task finished - first task finished), as
            Warren's (N - 1) / (last succeeded event - first). The worker's
            process tree is sampled from /proc every 100 ms: peak RSS = sum of
            VmHWM over the tree; CPU per task = utime+stime of the tree / N
            (start-up included, as Warren's). After the drain the worker is
            stopped and the queue must be empty: a message not acked would be
            back in it.
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
import statistics
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
SCENARIOS = ("throughput", "latency")
NOTE = (
    "note: broker work per task differs: Warren (and the raw-lapin baseline) publish two persistent status "
    "events per task and wait for their confirms before the ack; Celery without -E and Dramatiq publish "
    "nothing per task (Dramatiq has no task events at all); Celery -E publishes three transient, unconfirmed "
    "task events (task-received, task-started, task-succeeded), batched up to 24 to a message."
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
        # Processes of the tree that exited before now (a bench's workers, or
        # the bench itself) count with their last sample.
        for pid, last in self.tree.last.items():
            if pid not in snap1:
                before = self.snap0.get(pid)
                used[pid] = max(last["cpu_s"] - (before[1] if before else 0.0), 0.0)
                snap1[pid] = (None, last["cpu_s"], False)
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

    def start(self, cmd, env, log_path, stdout_path=None):
        logf = open(log_path, "wb")
        outf = open(stdout_path, "wb") if stdout_path else None
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=outf or logf,
                stderr=logf,
                start_new_session=True,
            )
        finally:
            logf.close()
            if outf:
                outf.close()
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
    """One peer library's runs (Celery or Dramatiq), every round and variant:
    its module, its prefix (one queue, reused: each drain leaves it empty),
    worker starts and results."""

    def __init__(self, lib, args, workers, mgmt, url):
        self.lib = lib
        self.args = args
        self.workers = workers
        self.mgmt = mgmt
        self.url = url
        self.prefix = f"peerbench-{lib}-{uuid.uuid4().hex[:8]}"
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        workers.add_prefix(self.prefix, self.tmp)
        # The module reads these when imported here; its workers get the same.
        self.env = {
            "PEER_BENCH_PREFIX": self.prefix,
            "PEER_BENCH_BROKER": url,
            "PEER_BENCH_CELERY_POOL": args.celery_pool,
            "PEER_BENCH_CELERY_CONCURRENCY": str(args.celery_concurrency),
            "PEER_BENCH_CELERY_MULTIPLIER": str(args.celery_prefetch_multiplier),
            "PEER_BENCH_DRAMATIQ_PROCESSES": str(args.dramatiq_processes),
            "PEER_BENCH_DRAMATIQ_THREADS": str(args.dramatiq_threads),
            "PEER_BENCH_DRAMATIQ_PREFETCH": str(args.dramatiq_prefetch),
        }
        os.environ.update(self.env)
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        self.mod = importlib.import_module(f"{lib}_app")
        self.notes = []
        self.clients = None  # BrokerClients of the phase being measured
        self.starts = 0

    def start_worker(self, name, events):
        self.starts += 1
        name = f"{name}-{self.starts}"
        out = os.path.join(self.tmp, name)
        os.makedirs(out)
        env = dict(os.environ, **self.env, **getattr(self.mod, "WORKER_ENV", {}))
        env.update(PEER_BENCH_OUT=out, PYTHONDONTWRITEBYTECODE="1")
        cmd = self.mod.worker_command(VENV_BIN, events)
        proc = self.workers.start(cmd, env, os.path.join(self.tmp, f"{name}.log"))
        return proc, Tree(proc.pid), out, name

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

    def _event_queue(self):
        """Celery only: declares (and empties) a queue bound to the app's
        event exchange for the task events (routing keys task.*), as a
        monitor such as Flower binds one, so the broker routes and stores
        them and they can be counted. The exchange is declared with the
        arguments kombu declares it with (topic, durable)."""
        import pika

        ex, q = self.mod.EVENT_EXCHANGE, f"{self.prefix}.evcount"
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ch = conn.channel()
            ch.exchange_declare(exchange=ex, exchange_type="topic", durable=True)
            ch.queue_declare(queue=q, durable=False)
            ch.queue_bind(queue=q, exchange=ex, routing_key="task.#")
            ch.queue_purge(queue=q)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _count_events(self, limit_s=60.0):
        """Reads the counting queue empty; returns (messages, task events).
        Celery's worker batches task events (up to 24 in one task.multi
        message, a JSON list), so messages and events differ."""
        import pika

        q = f"{self.prefix}.evcount"
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        messages = events = 0
        try:
            ch = conn.channel()
            want = ch.queue_declare(queue=q, passive=True).method.message_count
            end = time.monotonic() + limit_s
            for _method, _props, body in ch.consume(q, auto_ack=True, inactivity_timeout=5.0):
                if body is None or time.monotonic() > end:
                    break
                messages += 1
                payload = json.loads(body)
                batch = payload if isinstance(payload, list) else [payload]
                events += sum(1 for e in batch if str(e.get("type", "")).startswith("task-"))
                if messages >= want:
                    break
            if messages < want:
                raise BenchError(f"{self.lib}: read {messages} of {want} event messages within {limit_s:.0f} s")
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return messages, events

    def throughput(self, peer, rnd, events):
        n = self.args.n
        q = self.mod.QUEUE
        wait_idle(self.args.wait_idle, f"{peer} publish")
        log(f"{peer}: round {rnd + 1}: throughput: publishing {n} tasks with confirms to {q}")
        with deadline(max(120.0, n / 50.0), f"{peer}: publish {n}"):
            cpu0, t0 = time.process_time(), time.perf_counter()
            for i in range(n):
                self.mod.publish_echo({"i": i})
                if i % 500 == 0:
                    progress("publish", i, n)
            publish_s = time.perf_counter() - t0
            publish_cpu = time.process_time() - cpu0
        progress_end()
        depth = queue_depth(self.url, q)
        if depth != n:
            raise BenchError(f"{peer}: after publishing {n} tasks the queue holds {depth}")
        log(f"{peer}: published {n} in {publish_s:.2f} s")
        if self.lib == "celery":
            self._event_queue()
        wait_idle(self.args.wait_idle, f"{peer} drain")
        log(f"{peer}: starting the worker to drain the queue")
        proc, tree, out, name = self.start_worker("throughput", events)
        load = OtherLoad(tree)
        load.start()
        self.clients = BrokerClients(self.mgmt, tree)
        self.clients.sample(0)
        first = {}
        try:

            def on_first(c):
                first["cpu_s"], first["done"] = tree.cpu_s(), c

            self.wait_records(proc, tree, out, "finish", FINISH_WIDTH, n, f"{peer} drain", on_first=on_first)
            other = load.stop()
            self.clients.sample(0)
            cpu_s, hwm = tree.cpu_s(), tree.hwm()
            nprocs = len(tree.pids())
        except BenchError:
            tail = self.worker_log_tail(name)
            if tail:
                log(f"{peer} worker log (last lines):\n{tail}")
            raise
        finally:
            self.workers.stop(proc)
        left = queue_depth(self.url, q)
        if left:
            self.notes.append(f"{peer}: {left} messages were still in the queue after the worker stopped")
        stamps = [r[0] for r in read_records(out, "finish")]
        if len(stamps) != n:
            self.notes.append(f"{peer}: {len(stamps)} task completions recorded for {n} tasks published")
        span = max(stamps) - min(stamps)
        drain = (max(n, 2) - 1) / max(span, 1e-9)
        after = (cpu_s - first["cpu_s"]) / max(n - first["done"], 1) * 1000.0
        log(
            f"{peer}: drained {n} in {span:.2f} s ({drain:.0f}/s); worker tree of {nprocs} processes; "
            f"CPU per task {cpu_s * 1000.0 / n:.3f} ms ({after:.3f} ms after start-up); queue depth after stop {left}"
        )
        log(f"{peer}: CPU from worker start to drained, {load.detail}")
        rows = [
            row(peer, rnd, "publish", n / publish_s),
            row(peer, rnd, "publish_cpu", publish_cpu * 1e6 / n),
            row(peer, rnd, "drain", drain),
            row(peer, rnd, "cpu", cpu_s * 1000.0 / n),
            row(peer, rnd, "rss", hwm / MB),
            row(peer, rnd, "other_tp", other),
            row(peer, rnd, "clients", self.clients.most),
        ]
        if self.lib == "celery":
            msgs, got = self._count_events()
            log(f"{peer}: {got} task events in {msgs} messages (task.*) reached the counting queue for {n} tasks")
            if events and got < n:
                raise BenchError(f"{peer}: events on, but only {got} task events for {n} tasks")
            if not events and got:
                raise BenchError(f"{peer}: events off, but {got} task events were sent")
            rows += [row(peer, rnd, "events", got / n), row(peer, rnd, "event_msgs", msgs / n)]
        return rows

    def paced_publish(self, peer, total, rate, limit_s):
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
                raise BenchError(f"{peer}: publisher threads did not connect: {errors[:1]}") from None
            t0[0] = time.perf_counter() + 0.05
            end = time.monotonic() + limit_s
            for t in threads:
                while t.is_alive() and time.monotonic() < end:
                    t.join(timeout=0.25)
                    if self.clients:
                        self.clients.sample()
                    sent = min(total, int((time.perf_counter() - t0[0]) * rate))
                    progress(f"{peer} paced publish", max(sent, 0), total)
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
            raise BenchError(f"{peer}: paced publish failed: {type(errors[0]).__name__}: {errors[0]}")
        if any(t.is_alive() for t in threads):
            raise BenchError(f"{peer}: paced publish not done within {limit_s:.0f} s")
        return max(ends) - t0[0]

    def latency(self, peer, rnd, events):
        rate, duration = self.args.rate, self.args.duration
        total = int(rate * duration)
        log(f"{peer}: round {rnd + 1}: latency: starting the worker, {total} tasks at {rate:g}/s")
        proc, tree, out, name = self.start_worker("latency", events)
        load = OtherLoad(tree)
        try:
            # Warm-up: one task through, so the worker consumes before timing starts.
            with deadline(60.0, f"{peer}: warm-up publish"):
                self.mod.publish_lat(0.0)
            self.wait_records(proc, tree, out, "start", START_WIDTH, 1, f"{peer} warm-up")
            wait_idle(self.args.wait_idle, f"{peer} latency")
            load.start()
            self.clients = BrokerClients(self.mgmt, tree)
            self.clients.sample(0)
            cpu0 = time.process_time()
            publish_s = self.paced_publish(peer, total, rate, duration * 3 + 60.0)
            publisher_cpu = (time.process_time() - cpu0) / publish_s * 100.0
            log(f"{peer}: published {total} in {publish_s:.2f} s (publisher CPU {publisher_cpu:.0f}% of a core)")
            self.wait_records(proc, tree, out, "start", START_WIDTH, total + 1, f"{peer} latency")
            other = load.stop()
            self.clients.sample(0)
            log(f"{peer}: CPU from the first paced send to the last start, {load.detail}")
        except BenchError:
            tail = self.worker_log_tail(name)
            if tail:
                log(f"{peer} worker log (last lines):\n{tail}")
            raise
        finally:
            self.workers.stop(proc)
        lat = [max(start - sent, 0.0) * 1000.0 for sent, start in read_records(out, "start") if sent > 0]
        if len(lat) != total:
            self.notes.append(f"{peer}: {len(lat)} latency samples for {total} tasks sent")
        sm = summarize(lat)
        log(f"{peer}: enqueue->start p50 {sm['p50']:.2f} ms, p99 {sm['p99']:.2f} ms, max {sm['max']:.2f} ms")
        return [
            row(peer, rnd, "paced", total / publish_s),
            row(peer, rnd, "p50", sm["p50"]),
            row(peer, rnd, "p99", sm["p99"]),
            row(peer, rnd, "p999", sm["p999"]),
            row(peer, rnd, "other_lat", other),
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
            log(f"{self.lib}: management API cleanup failed ({e}); deleting the known names over AMQP")
            deleted += self._amqp_cleanup()
        log(f"{self.lib}: deleted {len(deleted)} queues/exchanges: {', '.join(sorted(deleted))}")
        self.workers.drop_prefix(self.prefix, self.tmp)
        if os.environ.get("PEER_BENCH_KEEP"):
            log(f"{self.lib}: kept the records and worker logs in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _amqp_cleanup(self):
        import pika

        q = self.mod.QUEUE
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        done = []
        try:
            for name in (q, f"{q}.DQ", f"{q}.XQ", f"{self.prefix}.evcount"):
                ch = conn.channel()
                with contextlib.suppress(Exception):
                    ch.queue_delete(queue=name)
                    done.append(name)
            for name in (q, getattr(self.mod, "EVENT_EXCHANGE", None)):
                if name:
                    ch = conn.channel()
                    with contextlib.suppress(Exception):
                        ch.exchange_delete(exchange=name)
                        done.append(name)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return done


class WarrenRun:
    """Warren and its raw-lapin baseline, measured by `warren bench` (the
    release binary) at the shipped settings: `warren bench throughput --n N
    --rounds 1` and `warren bench latency --rate R --duration D --rounds 1`,
    each on a prefix of its own under this run's (WARREN__PREFIX), with the
    bench's process tree sampled like a peer's worker for the other load.
    Any WARREN__WORKER__* variable is dropped from its environment, so the
    worker runs with the configuration Warren ships."""

    def __init__(self, args, workers, mgmt, url):
        self.args = args
        self.workers = workers
        self.mgmt = mgmt
        self.url = url
        self.bin = args.warren_bin
        if not (os.path.isfile(self.bin) and os.access(self.bin, os.X_OK)):
            raise BenchError(f"warren: no executable at {self.bin} (cargo build --release -p warren, or --warren-bin)")
        self.prefix = f"peerbench-warren-{uuid.uuid4().hex[:8]}"
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        workers.add_prefix(self.prefix, self.tmp)
        self.notes = []
        self.clients = None
        self.starts = 0
        dropped = sorted(k for k in os.environ if k.startswith("WARREN__WORKER__"))
        if dropped:
            log(f"warren: ignoring {', '.join(dropped)} (the bench measures the shipped settings)")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WARREN__WORKER__")}
        self.env.update(WARREN__PREFIX=self.prefix, WARREN__BROKER__URL=url)

    def version(self):
        try:
            out = subprocess.run([self.bin, "--version"], capture_output=True, text=True, timeout=10).stdout
            return out.strip() or "warren (version unknown)"
        except (OSError, subprocess.SubprocessError):
            return "warren (version unknown)"

    def bench(self, scenario, flags, limit_s):
        """Runs `warren bench SCENARIO FLAGS --rounds 1 --json`; returns its
        rows by metric, and the other load meanwhile."""
        self.starts += 1
        name = f"{scenario}-{self.starts}"
        out, err = os.path.join(self.tmp, f"{name}.json"), os.path.join(self.tmp, f"{name}.log")
        cmd = [self.bin, "bench", scenario, *flags, "--rounds", "1", "--json"]
        proc = self.workers.start(cmd, self.env, err, stdout_path=out)
        tree = Tree(proc.pid)
        load = OtherLoad(tree)
        load.start()
        self.clients = BrokerClients(self.mgmt, tree)
        end = time.monotonic() + limit_s
        try:
            while proc.poll() is None:
                if time.monotonic() > end:
                    raise BenchError(f"warren bench {scenario}: not done within {limit_s:.0f} s")
                tree.sample()
                self.clients.sample()
                time.sleep(0.1)
            other = load.stop()
        finally:
            self.workers.stop(proc)
        rows = {}
        with contextlib.suppress(OSError):
            with open(out) as f:
                for line in f:
                    if line.startswith("{"):
                        r = json.loads(line)
                        rows[r["metric"]] = r
        if proc.returncode != 0 or not rows:
            tail = ""
            with contextlib.suppress(OSError):
                with open(err, errors="replace") as f:
                    tail = " | ".join(x.strip() for x in f.readlines()[-3:])
            raise BenchError(f"warren bench {scenario} failed (exit {proc.returncode}): {tail or 'no output'}")
        log(f"warren: bench {scenario}: {load.detail}")
        return rows, other

    @staticmethod
    def _pick(rows, metric):
        r = rows.get(metric)
        if r is None:
            raise BenchError(f"warren bench printed no {metric!r} row")
        return r["warren"], r["baseline"]

    def throughput(self, peer, rnd, events):
        wait_idle(self.args.wait_idle, "warren throughput")
        log(f"warren: round {rnd + 1}: warren bench throughput --n {self.args.n} (baseline, then Warren)")
        rows, other = self.bench("throughput", ["--n", str(self.args.n)], max(300.0, self.args.n / 50.0))
        out = []
        for key, metric in (
            ("publish", "publish with confirms"),
            ("publish_cpu", "publisher CPU per task"),
            ("drain", "worker drain, events confirmed before ack"),
            ("cpu", "worker CPU per task"),
            ("rss", "worker peak RSS"),
        ):
            w, b = self._pick(rows, metric)
            out += [row("warren", rnd, key, w), row("lapin", rnd, key, b)]
        w, b = self._pick(rows, "worker drain, events confirmed before ack")
        log(f"warren: drain {w:.0f}/s, baseline {b:.0f}/s")
        out += [row("warren", rnd, "other_tp", other), row("lapin", rnd, "other_tp", other)]
        out += [row("warren", rnd, "clients", self.clients.most), row("lapin", rnd, "clients", self.clients.most)]
        return out

    def latency(self, peer, rnd, events):
        a = self.args
        wait_idle(a.wait_idle, "warren latency")
        log(f"warren: round {rnd + 1}: warren bench latency --rate {a.rate:g} --duration {a.duration:g}")
        rows, other = self.bench(
            "latency", ["--rate", f"{a.rate:g}", "--duration", f"{a.duration:g}"], a.duration * 6 + 120.0
        )
        out = []
        for key, metric in (("p50", "enqueue->start p50"), ("p99", "enqueue->start p99"), ("p999", "enqueue->start p99.9")):
            w, b = self._pick(rows, metric)
            out += [row("warren", rnd, key, w), row("lapin", rnd, key, b)]
        out += [row("warren", rnd, "other_lat", other), row("lapin", rnd, "other_lat", other)]
        return out

    def cleanup(self):
        """Deletes whatever `warren bench` left under this run's prefix."""
        deleted = []
        with contextlib.suppress(urllib.error.URLError, OSError):
            for kind in ("queues", "exchanges"):
                for name in self.mgmt.names(kind):
                    if name.startswith(self.prefix):
                        self.mgmt.delete(kind, name)
                        deleted.append(name)
        if deleted:
            log(f"warren: deleted {len(deleted)} leftover queues/exchanges")
        self.workers.drop_prefix(self.prefix, self.tmp)
        if os.environ.get("PEER_BENCH_KEEP"):
            log(f"warren: kept the bench output in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def row(peer, rnd, key, value):
    return {"peer": peer, "round": rnd + 1, "key": key, "value": float(value)}


# ---------------------------------------------------------------- output

# Which runner measures each peer, and whether its task events are on.
PEER_LIB = {"warren": "warren", "celery": "celery", "celery-events": "celery", "dramatiq": "dramatiq"}
PEER_EVENTS = {"celery-events": True}
# Table columns: the raw-lapin baseline comes with every Warren measurement.
COLUMNS = ("warren", "lapin", "celery", "celery-events", "dramatiq")
TITLES = {
    "warren": "Warren",
    "lapin": "raw lapin",
    "celery": "Celery",
    "celery-events": "Celery -E",
    "dramatiq": "Dramatiq",
}
# (key, metric, unit, ratio to Warren?)
METRICS = (
    ("publish", "publish with confirms", "tasks/s", True),
    ("publish_cpu", "publisher CPU per task", "us", True),
    ("drain", "worker drain of N preloaded tasks", "tasks/s", True),
    ("cpu", "worker CPU per task", "ms", True),
    ("rss", "worker peak RSS", "MB", True),
    ("events", "task events per task (read back from the broker)", "count", False),
    ("event_msgs", "event messages per task", "count", False),
    ("paced", "latency: paced publish rate achieved", "tasks/s", False),
    ("p50", "latency: enqueue->start p50", "ms", True),
    ("p99", "latency: enqueue->start p99", "ms", True),
    ("p999", "latency: enqueue->start p99.9", "ms", True),
    ("other_tp", "other processes' CPU, throughput", "% of a core", False),
    ("other_lat", "other processes' CPU, latency", "% of a core", False),
)


def fmt(v, unit=""):
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100 or unit == "count":
        return f"{v:.0f}" if unit != "count" or v == int(v) else f"{v:.2f}"
    return f"{v:.2f}"


def by_peer_key(rows):
    out = {}
    for r in rows:
        out.setdefault((r["peer"], r["key"]), {})[r["round"]] = r["value"]
    return out


def summary(rows):
    """Per (peer, key): the median over the rounds, the range, and the
    median of the per-round ratios to Warren's figure of the same round."""
    got = by_peer_key(rows)
    out = {}
    for (peer, key), per_round in got.items():
        vals = list(per_round.values())
        s = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "rounds": len(vals)}
        w = got.get(("warren", key), {})
        ratios = [v / w[r] for r, v in per_round.items() if w.get(r)]
        if peer != "warren" and ratios:
            s["ratio"] = statistics.median(ratios)
            s["ratio_min"], s["ratio_max"] = min(ratios), max(ratios)
        out[(peer, key)] = s
    return out


def render(head, cells):
    widths = [max(len(c[i]) for c in [head] + cells) for i in range(len(head))]

    def line(c):
        return "  ".join(v.rjust(widths[i]) if i >= 2 else v.ljust(widths[i]) for i, v in enumerate(c)).rstrip()

    return "\n".join([line(head)] + [line(c) for c in cells])


def tables(rows):
    """Two tables: medians with their ratio to Warren, and the ranges."""
    s = summary(rows)
    cols = [c for c in COLUMNS if any(p == c for p, _ in s)]
    head = ["metric", "unit"] + [TITLES[c] for c in cols]
    med, rng = [], []
    for key, metric, unit, ratio in METRICS:
        if not any((c, key) in s for c in cols):
            continue
        m, r = [metric, unit], [metric, unit]
        for c in cols:
            x = s.get((c, key))
            if x is None:
                m.append("-")
                r.append("-")
                continue
            cell = fmt(x["median"], unit)
            if ratio and "ratio" in x:
                cell += f" ({x['ratio']:.0f}x)" if x["ratio"] >= 100 else f" ({x['ratio']:.2f}x)"
            m.append(cell)
            r.append(fmt(x["min"], unit) if x["min"] == x["max"] else f"{fmt(x['min'], unit)}-{fmt(x['max'], unit)}")
        med.append(m)
        rng.append(r)
    return render(head, med), render(head, rng), s


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
        description="Warren (with its raw-lapin baseline), Celery and Dramatiq on the same broker and "
        "workloads, in alternating rounds of one run; one table of medians and ratios to Warren.",
    )
    p.add_argument("--quick", action="store_true", help="n=5000, duration 5 s, 2 rounds (unless given)")
    p.add_argument("--n", type=int, help="tasks for throughput (default 20000; quick 5000)")
    p.add_argument("--rate", type=float, default=500.0, help="tasks/s for latency (default 500)")
    p.add_argument("--duration", type=float, help="seconds of paced publishing (default 10; quick 5)")
    p.add_argument("--rounds", type=int, help="rounds; each runs every peer, in a rotated order (default 3; quick 2)")
    p.add_argument(
        "--peers", default=",".join(PEER_LIB), help=f"comma-separated subset of {','.join(PEER_LIB)} (default all)"
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of throughput,latency")
    p.add_argument(
        "--warren-bin",
        default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "target", "release", "warren"),
        help="the warren binary measured (default target/release/warren; relative to the repository root)",
    )
    p.add_argument(
        "--celery-pool",
        default="prefork",
        choices=("prefork", "threads", "solo"),
        help="Celery's pool (default prefork, the pool Celery's documentation recommends)",
    )
    p.add_argument(
        "--celery-concurrency",
        type=int,
        default=os.cpu_count() or 1,
        help="Celery's pool size (default: the number of CPUs, Celery's default)",
    )
    p.add_argument(
        "--celery-prefetch-multiplier",
        type=int,
        default=64,
        help="worker_prefetch_multiplier (default 64, as Celery's optimizing guide advises for many short tasks)",
    )
    p.add_argument(
        "--dramatiq-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="Dramatiq worker processes (default: the number of CPUs, Dramatiq's default)",
    )
    p.add_argument("--dramatiq-threads", type=int, default=8, help="Dramatiq threads per process (default 8, its default)")
    p.add_argument(
        "--dramatiq-prefetch",
        type=int,
        default=0,
        help="dramatiq_queue_prefetch per process (default 0: Dramatiq's default, 2 x threads)",
    )
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
    a.rounds = a.rounds if a.rounds is not None else (2 if a.quick else 3)
    a.warren_bin = os.path.abspath(a.warren_bin)  # scripts/bench-peers.sh runs from the repository root
    a.peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    a.scenarios = [x.strip() for x in a.scenarios.split(",") if x.strip()]
    for x in a.peers:
        if x not in PEER_LIB:
            p.error(f"unknown peer {x!r} (choose from {', '.join(PEER_LIB)})")
    for x in a.scenarios:
        if x not in SCENARIOS:
            p.error(f"unknown scenario {x!r} (choose from {', '.join(SCENARIOS)})")
    if a.n < 2 or a.rate <= 0 or a.duration <= 0 or a.rounds < 1 or a.publishers < 1:
        p.error("--n must be at least 2; --rate, --duration, --rounds and --publishers positive")
    if min(a.celery_concurrency, a.celery_prefetch_multiplier, a.dramatiq_processes, a.dramatiq_threads) < 1:
        p.error("the Celery and Dramatiq shapes (concurrency, multiplier, processes, threads) must be positive")
    if a.dramatiq_prefetch < 0:
        p.error("--dramatiq-prefetch must be 0 (Dramatiq's default) or positive")
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
    runners, rows, notes, failed = {}, [], [], {}
    loads = [os.getloadavg()[0]]
    started = time.monotonic()

    def runner(peer):
        lib = PEER_LIB[peer]
        if lib not in runners:
            runners[lib] = (
                WarrenRun(args, workers, mgmt, url) if lib == "warren" else Run(lib, args, workers, mgmt, url)
            )
        return runners[lib]

    try:
        for rnd in range(args.rounds):
            k = rnd % len(args.peers)
            order = args.peers[k:] + args.peers[:k]
            for scenario in args.scenarios:
                for peer in order:
                    if peer in failed:
                        continue
                    try:
                        r = runner(peer)
                        rows.extend(getattr(r, scenario)(peer, rnd, PEER_EVENTS.get(peer, False)))
                    except BenchError as e:
                        failed[peer] = str(e)
                        print(f"error: {e}", file=sys.stderr)
                    except Exception as e:  # a library or broker error: report it, go on with the others
                        failed[peer] = f"{peer}: {type(e).__name__}: {e}"
                        print(f"error: {failed[peer]}", file=sys.stderr)
                    finally:
                        workers.stop_all()
                        loads.append(os.getloadavg()[0])
    except KeyboardInterrupt:
        print("interrupted: stopping workers and cleaning up", file=sys.stderr)
        workers.stop_all()
        for r in runners.values():
            r.cleanup()
        return 130
    for r in runners.values():
        notes.extend(r.notes)
        r.cleanup()
    minutes = (time.monotonic() - started) / 60.0
    out = sys.stderr if args.json else sys.stdout
    header = [
        f"RabbitMQ {rabbit} at {host}; Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions().items())
        + (f"; {runners['warren'].version()} ({args.warren_bin})" if "warren" in runners else ""),
        f"machine: {os.cpu_count()} cores; 1-minute load average {min(loads):.2f}-{max(loads):.2f} "
        f"(sampled between phases); {args.rounds} rounds in {minutes:.1f} min, peers in a rotated order each round",
        f"throughput: n={args.n} preloaded echo tasks, published one at a time with confirms (Warren: its "
        f"publish_batch, confirms pipelined); latency: {args.rate:g}/s for {args.duration:g} s "
        f"(peers from {args.publishers} publisher threads); persistent messages, acks after the task returns",
    ]
    if "warren" in runners:
        header.append(
            "warren: `warren bench` at the shipped settings (concurrency 8, prefetch 256); per task a persistent "
            "started and succeeded event, both confirmed before the ack; raw lapin: warren bench's baseline worker "
            "(same broker work, pipelined confirms, prefetch 1000); enqueue->start at 1 ms resolution"
        )
    for lib in ("celery", "dramatiq"):
        if lib in runners:
            header.append(runners[lib].mod.DESCRIPTION)
    med, rng, s = tables(rows)
    for h in header:
        print(h, file=out)
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
        for (peer, key), x in sorted(s.items()):
            print(json.dumps({"peer": peer, "key": key, "summary": x}), flush=True)
    else:
        print("\nmedian over the rounds (median of the per-round ratios to Warren):", file=out)
        print(med, file=out)
        print("\nrange over the rounds:", file=out)
        print(rng, file=out)
    for (peer, key), x in sorted(s.items()):
        if peer == "lapin":
            continue  # measured in the same phases as Warren: its notes are Warren's
        if key.startswith("other_") and x["max"] > OTHER_LOAD_WARN:
            notes.append(
                f"{TITLES[peer]}: other processes used up to {x['max']:.0f}% of a core during a "
                f"{key[6:].replace('tp', 'throughput').replace('lat', 'latency')} phase; those figures are disturbed"
            )
        if key == "clients" and x["max"] > 0:
            notes.append(
                f"{TITLES[peer]}: the broker had up to {x['max']:.0f} other clients' connections during a phase; "
                "if they were busy, its figures are disturbed"
            )
    for n in notes:
        print(f"warning: {n}", file=out)
    print(NOTE, file=out)
    if failed:
        print(f"error: failed: {'; '.join(failed.values())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
