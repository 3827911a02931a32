"""The Dramatiq side of the peer benchmark: two actors on the bench's own queue.

Configured from the environment (set by bench_peers.py for the driver and for
the worker it starts):
  PEER_BENCH_BROKER   AMQP URL
  PEER_BENCH_PREFIX   unique prefix; the queue is <prefix>.tasks (Dramatiq
                      adds <queue>.DQ and <queue>.XQ beside it)
  PEER_BENCH_OUT      directory for the tasks' records (worker only)
  PEER_BENCH_DRAMATIQ_PROCESSES / PEER_BENCH_DRAMATIQ_THREADS
                      worker shape (default 1 process x 8 threads, which with
                      Dramatiq's default prefetch of 2 x threads is prefetch 16:
                      the shape of one Warren worker at its defaults,
                      concurrency 8 and prefetch 16)

Guarantees: persistent messages (Dramatiq's RabbitMQ broker always sends
delivery_mode 2), publisher confirms (confirm_delivery=True: each send waits
for the broker's ack), acks after the actor returns (Dramatiq's only mode),
default middleware, no results backend. Dramatiq emits no per-task status.
"""

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import peerrec

PREFIX = os.environ["PEER_BENCH_PREFIX"]
QUEUE = f"{PREFIX}.tasks"
PROCESSES = int(os.environ.get("PEER_BENCH_DRAMATIQ_PROCESSES", "1"))
THREADS = int(os.environ.get("PEER_BENCH_DRAMATIQ_THREADS", "8"))

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


def worker_command(venv_bin):
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
    f"dramatiq: {PROCESSES} process(es) x {THREADS} threads "
    f"(prefetch {2 * THREADS} per process, Dramatiq's default), "
    "publish via actor.send with confirm_delivery=True (one confirm awaited per task)"
)
