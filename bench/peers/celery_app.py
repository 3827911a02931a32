"""The Celery side of the peer benchmark: one app on the bench's own queue.

Configured from the environment (set by bench_peers.py for the driver and for
the worker it starts):
  PEER_BENCH_BROKER  AMQP URL
  PEER_BENCH_PREFIX  unique prefix; every queue and exchange Celery declares
                     here is named with it, so cleanup can delete them all
  PEER_BENCH_OUT     directory for the tasks' records (worker only)
  PEER_BENCH_CELERY_POOL / _CONCURRENCY / _MULTIPLIER
                     pool (default prefork), pool size (default: CPUs) and
                     worker_prefetch_multiplier (default 64)

Settings for throughput with late acks, from Celery's documentation: the
prefork pool (the default, recommended unless there is a specific need for
another; eventlet and gevent are for I/O-bound tasks), one process per CPU
(Celery's default concurrency), and a large prefetch multiplier, as the
optimizing guide advises for many short tasks ("Say 64, or 128"). Persistent
messages (Celery's default delivery mode), publisher confirms on every
publish from the driver (kombu's confirm_publish: each apply_async waits for
the broker's ack), acks_late (the ack follows the task's return), no result
backend (task_ignore_result), worker gossip, mingle, heartbeat and remote
control off. Task events off by default; the worker command takes -E for the
"events on" variant. The worker's own connection does not use
confirm_publish: the events it sends with -E are transient and unconfirmed,
as Celery sends them by default.
"""

import os

from celery import Celery

import peerrec

PREFIX = os.environ["PEER_BENCH_PREFIX"]
QUEUE = f"{PREFIX}.tasks"
EVENT_EXCHANGE = f"{PREFIX}.events"
POOL = os.environ.get("PEER_BENCH_CELERY_POOL", "prefork")
PROCESSES = int(os.environ.get("PEER_BENCH_CELERY_CONCURRENCY") or os.cpu_count() or 1)
PREFETCH_MULTIPLIER = int(os.environ.get("PEER_BENCH_CELERY_MULTIPLIER", "64"))
IN_WORKER = "PEER_BENCH_OUT" in os.environ

app = Celery("peerbench", broker=os.environ["PEER_BENCH_BROKER"], set_as_current=True)
app.conf.update(
    # Confirms for the driver's publishes; the worker publishes only events.
    broker_transport_options={"confirm_publish": not IN_WORKER},
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_default_delivery_mode="persistent",
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_ignore_result=True,
    task_send_sent_event=False,
    worker_send_task_events=False,
    worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
    worker_concurrency=PROCESSES,
    worker_pool=POOL,
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    # Named under the prefix in case anything declares them.
    control_exchange=f"{PREFIX}.control",
    event_exchange=EVENT_EXCHANGE,
    event_queue_prefix=f"{PREFIX}.ev",
)


@app.task(name="peer.echo", acks_late=True)
def echo(x):
    """Returns its argument (recording the finish for the drain timing)."""
    peerrec.finished()
    return x


@app.task(name="peer.lat", acks_late=True)
def lat(sent):
    """Records send time and start time; returns the send time."""
    peerrec.started(sent)
    return sent


def publish_echo(x):
    echo.apply_async(args=(x,))


def publish_lat(sent):
    lat.apply_async(args=(sent,))


def close():
    app.pool.force_close_all()


def warm_publisher(barrier):
    """Connects this thread's producer before paced publishing starts; holds
    it until every publisher thread has one, so each gets its own."""
    with app.producer_or_acquire() as p:
        p.connection.ensure_connection(max_retries=3)
        p.channel  # noqa: B018 (opens the channel)
        barrier.wait(timeout=30)


def worker_command(venv_bin, events=False):
    return [
        os.path.join(venv_bin, "celery"),
        "-A",
        "celery_app",
        "worker",
        "-P",
        POOL,
        "-c",
        str(PROCESSES),
        "--prefetch-multiplier",
        str(PREFETCH_MULTIPLIER),
        "-Q",
        QUEUE,
        "-n",
        f"{PREFIX}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "WARNING",
        *(["-E"] if events else []),
    ]


DESCRIPTION = (
    f"celery: {POOL} pool, concurrency {PROCESSES}, acks_late, worker_prefetch_multiplier "
    f"{PREFETCH_MULTIPLIER} (prefetch {PREFETCH_MULTIPLIER * PROCESSES}), task_ignore_result, no result backend, "
    "gossip/mingle/heartbeat/remote control off; events off, or on with -E (Celery -E); "
    "publish via apply_async with confirm_publish (one confirm awaited per task)"
)
