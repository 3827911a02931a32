#!/usr/bin/env python3
"""A Warren webhook receiver in Python, standard library only.

Warren POSTs each attempt of a [[webhook]] task type as one JSON object
    {"id": "...", "type": "...", "attempt": 1, "args": {...}}
with two headers a receiver checks before trusting it:
    X-Warren-Timestamp: 1700000000          (Unix seconds)
    X-Warren-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>
The answer decides the outcome: 2xx success (the body is the result, JSON
or text), 429 or 5xx retry later (Retry-After, in seconds or as an HTTP
date, sets the earliest retry), any other status a permanent failure.

This one sums a list of numbers, as examples/exec/report.py does:
    WARREN_WEBHOOK_SECRET=... python3 receiver.py [--host 127.0.0.1] [--port 8080]
With --port 0 it takes a free port. It prints "listening on http://HOST:PORT"
once it accepts requests.
"""

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Requests signed longer ago (or further ahead) than this are refused, so a
# captured request cannot be replayed later.
MAX_SKEW_SECONDS = 300
MAX_BODY_BYTES = 10 * 1024 * 1024


def verify(secret: bytes, timestamp: str, signature: str, body: bytes, now: float) -> str:
    """Returns why the request is refused, or "" when it is genuine."""
    if not timestamp.isdigit():
        return "missing or malformed X-Warren-Timestamp"
    if abs(now - int(timestamp)) > MAX_SKEW_SECONDS:
        return "stale X-Warren-Timestamp"
    expected = "v1=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "signature mismatch"
    return ""


def handle(task: dict):
    """The task's work: (status, result)."""
    args = task.get("args")
    if not isinstance(args, dict) or not isinstance(args.get("items"), list):
        return 422, {"error": "args must be an object with a list 'items'"}
    total = 0
    for i, x in enumerate(args["items"], 1):
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            return 422, {"error": f"item {i} is not a number: {x!r}"}
        total += x
    return 200, {
        "task_id": task["id"],
        "attempt": task["attempt"],
        "count": len(args["items"]),
        "sum": total,
    }


class Receiver(BaseHTTPRequestHandler):
    secret = b""

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return self.answer(413, {"error": "body too large"})
        body = self.rfile.read(length)
        why = verify(
            self.secret,
            self.headers.get("X-Warren-Timestamp", ""),
            self.headers.get("X-Warren-Signature", ""),
            body,
            time.time(),
        )
        if why:
            # 401 is permanent: the task goes to the dead letters with this text.
            return self.answer(401, {"error": why})
        status, result = handle(json.loads(body))
        self.answer(status, result)

    def answer(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        sys.stderr.write("receiver: " + (fmt % args) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    a = p.parse_args()
    secret = os.environ.get("WARREN_WEBHOOK_SECRET", "")
    if not secret:
        sys.exit("receiver: set WARREN_WEBHOOK_SECRET to the webhook's secret")
    Receiver.secret = secret.encode()
    server = ThreadingHTTPServer((a.host, a.port), Receiver)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
