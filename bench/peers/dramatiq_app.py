"""The Dramatiq side of the peer benchmark: two actors on the bench's own queue.

Configured from the environment (set by bench_peers.py for the driver and for
the worker it starts):
  PEER_BENCH_BROKER   AMQP URL
  PEER_BENCH_PREFIX   unique prefix; the queue is <prefix>.tasks (Dramatiq
                      adds <queue>.DQ and <queue>.XQ beside it)
  PEER_BENCH_OUT      directory for the tasks' records (worker only)
  PEER_BENCH_DRAMATIQ_PROCESSES / _THREADS / _PREFETCH
                      worker shape: processes (default: CPUs, Dramatiq's
                      default), threads per process (default 8, Dramatiq's
                      default) and dramatiq_queue_prefetch per process (0,
                      the default: Dramatiq then prefetches 2 x threads)

Guarantees: persistent messages (Dramatiq's RabbitMQ broker always sends
delivery_mode 2), publisher confirms (confirm_delivery=True: each send waits
for the broker's ack), acks after the actor returns (Dramatiq's only mode).
Middleware: Dramatiq's default list (AgeLimit, TimeLimit,
ShutdownNotifications, Callbacks, Pipelines, Retries); no Prometheus (not a
default middleware in Dramatiq 2) and no Results middleware or backend.
Dramatiq emits no per-task status events.
"""

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import peerrec

PREFIX = os.environ["PEER_BENCH_PREFIX"]
QUEUE = f"{PREFIX}.tasks"
PROCESSES = int(os.environ.get("PEER_BENCH_DRAMATIQ_PROCESSES") or os.cpu_count() or 1)
THREADS = int(os.environ.get("PEER_BENCH_DRAMATIQ_THREADS", "8"))
PREFETCH = int(os.environ.get("PEER_BENCH_DRAMATIQ_PREFETCH", "0"))
# Dramatiq reads its prefetch from the environment when it is imported, so
# the driver passes it in the worker's environment.
WORKER_ENV = {"dramatiq_queue_prefetch": str(PREFETCH)} if PREFETCH else {}

broker = RabbitmqBroker(url=os.environ["PEER_BENCH_BROKER"], confirm_delivery=True)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, actor_name="peer_echo")
def echo(x):
    """Returns its argument (recording the finish for the drain timing)."""
    peerrec.finished()
    return x


@dramatiq.actor(queue_name=QUEUE, actor_name="peer_lat")
def lat(sent):
    """Records send time and start time; returns the send time."""
    peerrec.started(sent)
    return sent


def publish_echo(x):
    echo.send(x)


def publish_lat(sent):
    lat.send(sent)


def warm_publisher(barrier):
    """Opens this thread's connection and channel (Dramatiq keeps one per
    thread) before paced publishing starts."""
    broker.channel  # noqa: B018
    barrier.wait(timeout=30)


def close():
    broker.close()


def worker_command(venv_bin, events=False):
    # Dramatiq has no task events: `events` has nothing to switch.
    return [
        os.path.join(venv_bin, "dramatiq"),
        "dramatiq_app",
        "--processes",
        str(PROCESSES),
        "--threads",
        str(THREADS),
        "--queues",
        QUEUE,
        "--worker-shutdown-timeout",
        "10000",
    ]


DESCRIPTION = (
    f"dramatiq: {PROCESSES} process(es) x {THREADS} threads, prefetch "
    + (f"{PREFETCH} per process (dramatiq_queue_prefetch)" if PREFETCH else f"{2 * THREADS} per process (its default)")
    + ", default middleware (no Prometheus, no Results), no task events; "
    "publish via actor.send with confirm_delivery=True (one confirm awaited per task)"
)
