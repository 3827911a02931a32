"""Worker-side recording for the peer benchmark: one append per task.

A task calls `finished()` (throughput) or `started(sent)` (latency); each call
is a single os.write of a fixed-width line to a file of its own process
(`<dir>/<kind>.<pid>`, opened O_APPEND once per process), so the driver can
count completions from file sizes and read the times afterwards. That is one
small syscall per task and nothing else: no broker traffic, no locks held
while the task runs.

The directory comes from PEER_BENCH_OUT in the worker's environment.
"""

import os
import threading
import time

# "%017.6f" of a Unix time is 17 characters until the year 2286.
STAMP = b"%017.6f"
FINISH_WIDTH = 18  # stamp + "\n"
START_WIDTH = 36  # sent stamp + " " + start stamp + "\n"

_fds = {}
_lock = threading.Lock()


def _reset_after_fork():
    global _lock
    _fds.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _fd(kind):
    fd = _fds.get(kind)
    if fd is None:
        with _lock:
            fd = _fds.get(kind)
            if fd is None:
                path = os.path.join(os.environ["PEER_BENCH_OUT"], f"{kind}.{os.getpid()}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                _fds[kind] = fd
    return fd


def finished():
    """Records that a throughput task finished, now."""
    os.write(_fd("finish"), STAMP % time.time() + b"\n")


def started(sent):
    """Records a latency task's send time and its start, now."""
    now = time.time()
    os.write(_fd("start"), STAMP % float(sent) + b" " + STAMP % now + b"\n")
