"""Drain rate of `[[exec]]` task types: a trivial program (/bin/true) and a
trivial Python handler (trivial.py), each run by `warren worker` at the
shipped settings (worker.concurrency = 8). Run through scripts/bench-exec.sh,
which builds the release binary, makes the venv (pika) and adds Celery's
figure for the same count from scripts/bench-peers.sh.

Per handler and round: N tasks are published with confirms to P.tasks under
a prefix of their own; then the worker is started and drains the preloaded
queue. Drain rate = (N - 1) / (last `succeeded` event's `at` - first's), as
`warren bench throughput` computes it; worker CPU per task = utime + stime of
the worker and of the programs it ran and reaped (cutime + cstime), start-up
included, / N. Every task must end `succeeded`. The prefix's queues and
exchanges are deleted afterwards, also on failure.

Prints one JSON object per handler and round on stdout, the rest on stderr.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from datetime import datetime

import pika

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"bench-exec: {msg}", file=sys.stderr, flush=True)


class Mgmt:
    def __init__(self, url, user, password, vhost):
        self.url = url.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.vhost = urllib.parse.quote(vhost, safe="")

    def _call(self, method, path):
        req = urllib.request.Request(f"{self.url}/api/{path}", method=method, headers={"Authorization": self.auth})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()

    def delete_prefix(self, prefix):
        for kind in ("queues", "exchanges"):
            for item in json.loads(self._call("GET", f"{kind}/{self.vhost}?columns=name")):
                name = item["name"]
                if name.startswith(prefix + "."):
                    self._call("DELETE", f"{kind}/{self.vhost}/{urllib.parse.quote(name, safe='')}")


def cpu_ticks(pid):
    """utime + stime + cutime + cstime of a process, in ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])


def at_seconds(event):
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def run_one(args, mgmt, label, command, rnd):
    prefix = f"benchexec-{uuid.uuid4().hex[:8]}"
    task_type = f"bench.{label}"
    tmp = tempfile.mkdtemp(prefix=f"{prefix}-")
    cfg = os.path.join(tmp, "warren.toml")
    with open(cfg, "w") as f:
        f.write(
            f"[[exec]]\ntype = {json.dumps(task_type)}\ncommand = {json.dumps(command)}\n"
            '[[routes]]\npattern = "bench.#"\nqueue = "cpu"\n'
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARREN__")}
    env.update(WARREN__PREFIX=prefix, WARREN__BROKER__URL=args.url, WARREN__WORKER__LISTEN="127.0.0.1:0")
    worker = None
    conn = None
    try:
        subprocess.run(
            [args.warren_bin, "--config", cfg, "topology", "apply"], env=env, check=True, capture_output=True, timeout=60
        )
        conn = pika.BlockingConnection(pika.URLParameters(args.url))
        ch = conn.channel()
        events = ch.queue_declare(queue="", exclusive=True).method.queue
        for state in ("succeeded", "dead"):
            ch.queue_bind(events, f"{prefix}.events", routing_key=f"{state}.{task_type}")
        ch.confirm_delivery()
        log(f"{label}: round {rnd + 1}: publishing {args.n} tasks with confirms")
        for _ in range(args.n):
            ch.basic_publish(
                exchange=f"{prefix}.tasks",
                routing_key=task_type,
                body=b"{}",
                properties=pika.BasicProperties(
                    content_type="application/json", delivery_mode=2, message_id=str(uuid.uuid4())
                ),
            )
        log(f"{label}: starting `warren worker` to drain {args.n} tasks running {command}")
        worker = subprocess.Popen(
            [args.warren_bin, "--config", cfg, "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(tmp, "worker.log"), "w"),
        )
        started = time.monotonic()
        times = []
        dead = 0
        deadline = started + args.limit
        for method, props, body in ch.consume(events, auto_ack=True, inactivity_timeout=5):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: only {len(times)} of {args.n} tasks ended within {args.limit:.0f} s")
            if method is None:
                if worker.poll() is not None:
                    raise RuntimeError(f"{label}: the worker exited ({worker.returncode}); see {tmp}/worker.log")
                continue
            ev = json.loads(body)
            if ev["state"] == "dead":
                dead += 1
            times.append(at_seconds(ev))
            if len(times) >= args.n:
                break
        ch.cancel()
        if dead:
            raise RuntimeError(f"{label}: {dead} tasks ended dead; see {tmp}/worker.log")
        cpu_s = cpu_ticks(worker.pid) / TICK
        span = max(times) - min(times)
        drain = (args.n - 1) / max(span, 1e-9)
        row = {
            "handler": label,
            "command": command,
            "round": rnd + 1,
            "n": args.n,
            "drain_per_s": round(drain, 1),
            "worker_cpu_ms_per_task": round(cpu_s * 1000 / args.n, 2),
            "loadavg_after": open("/proc/loadavg").read().split()[0],
        }
        log(f"{label}: drained {args.n} in {span:.2f} s: {drain:.0f}/s, {row['worker_cpu_ms_per_task']} ms CPU per task")
        return row
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if conn is not None and conn.is_open:
            conn.close()
        try:
            mgmt.delete_prefix(prefix)
        except OSError as e:
            log(f"warning: could not delete the queues of {prefix}: {e}")
        subprocess.run(["rm", "-rf", "--", tmp], check=False)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warren-bin", required=True)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--limit", type=float, default=600.0, help="seconds allowed per drain")
    p.add_argument("--handlers", default="true,python")
    p.add_argument(
        "--python",
        default="/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3",
        help="interpreter of the Python handler (default /usr/bin/python3: a version manager's shim, "
        "such as pyenv's, would add its own start-up to every task)",
    )
    a = p.parse_args()
    a.url = os.environ.get("WARREN__BROKER__URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    vhost = urllib.parse.unquote(urllib.parse.urlparse(a.url).path[1:] or "/")
    mgmt = Mgmt(
        os.environ.get("WARREN_MGMT_URL", "http://127.0.0.1:15672"),
        os.environ.get("WARREN_MGMT_USER", "guest"),
        os.environ.get("WARREN_MGMT_PASS", "guest"),
        vhost,
    )
    commands = {
        "true": ["/bin/true"],
        "python": [a.python, os.path.join(HERE, "trivial.py")],
    }
    for rnd in range(a.rounds):
        for label in a.handlers.split(","):
            print(json.dumps(run_one(a, mgmt, label, commands[label], rnd)), flush=True)


if __name__ == "__main__":
    main()
