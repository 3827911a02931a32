#!/usr/bin/env python3
"""Publish a Warren task (or any message) with Python pika, as a non-Rust
producer would, and optionally wait for the reply on direct reply-to.

    publish_pika.py --url amqp://guest:guest@127.0.0.1:5672/%2f \
        --exchange warren.tasks --routing-key diag.echo --body '{"hello": "world"}' \
        [--message-id ID] [--content-type CT] [--priority N] [--expiration MS] \
        [--reply-to Q] [--correlation-id C] [--header K=V ...] [--count N] \
        [--header-bytes K=N] [--many-headers N] [--nested-header K=DEPTH] \
        [--wait-reply-timeout S]

Every message is persistent (delivery_mode 2) and published with publisher
confirms. Header values that parse as integers are sent as AMQP integers, the
rest as strings. `--content-type ''` publishes without a content type.

With `--reply-to amq.rabbitmq.reply-to` the script consumes from direct
reply-to (auto-ack) before publishing, then waits up to --wait-reply-timeout
seconds for one reply per published message and prints each reply body to
stdout as one JSON line. Nothing else goes to stdout.

Hostile headers, as an attacker with publish rights would send them:
`--header-bytes K=N` adds header K holding a string of N bytes,
`--many-headers N` adds N small headers (`h-0` .. `h-<N-1>`), and
`--nested-header K=DEPTH` adds header K holding a table nested DEPTH deep.

With --count N > 1 and --message-id ID, the messages get ids ID-1 .. ID-N.

Exit status: 0 when every message was confirmed (and every awaited reply
arrived), 1 with a one-line message on stderr otherwise.
"""

import argparse
import json
import re
import sys
import time

import pika
import pika.exceptions

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
INT_RE = re.compile(r"^[+-]?[0-9]+$")
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


class Failure(Exception):
    """A failure reported as one line on stderr, exit 1."""


def parse_header(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"header must be K=V, got {text!r}")
    if INT_RE.match(value):
        number = int(value)
        if I64_MIN <= number <= I64_MAX:
            return key, number
    return key, value


def key_and_count(text):
    key, sep, value = text.partition("=")
    if not sep or not key or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected K=N, got {text!r}")
    return key, int(value)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(1, f"publish_pika: {message} (see --help)\n")


def parse_args(argv):
    p = Parser(
        description="Publish messages with pika and publisher confirms.")
    p.add_argument("--url", required=True, help="AMQP URI, e.g. amqp://guest:guest@127.0.0.1:5672/%%2f")
    p.add_argument("--exchange", required=True, help="exchange name ('' for the default exchange)")
    p.add_argument("--routing-key", required=True)
    body = p.add_mutually_exclusive_group(required=True)
    body.add_argument("--body", help="message body, sent verbatim as UTF-8 (normally JSON)")
    body.add_argument("--body-file", help="read the body from this file (bytes, verbatim)")
    p.add_argument("--message-id")
    p.add_argument("--content-type", default="application/json",
                   help="default application/json; '' sends none")
    p.add_argument("--content-encoding")
    p.add_argument("--type", dest="msg_type", help="AMQP type property")
    p.add_argument("--priority", type=int)
    p.add_argument("--expiration", help="per-message TTL in ms (string property)")
    p.add_argument("--reply-to")
    p.add_argument("--correlation-id")
    p.add_argument("--header", action="append", type=parse_header, default=[],
                   metavar="K=V", help="repeatable; integer-looking values are sent as integers")
    p.add_argument("--header-bytes", action="append", type=key_and_count, default=[],
                   metavar="K=N", help="header K holding a string of N bytes")
    p.add_argument("--many-headers", type=int, default=0, metavar="N",
                   help="add N small headers h-0 .. h-<N-1>")
    p.add_argument("--nested-header", type=key_and_count, metavar="K=DEPTH",
                   help="header K holding a table nested DEPTH deep")
    p.add_argument("--mandatory", action="store_true",
                   help="publish mandatory: an unroutable message is a failure")
    p.add_argument("--count", type=positive_int, default=1)
    p.add_argument("--wait-reply-timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S")
    return p.parse_args(argv)


def redact(url):
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def connect(args):
    try:
        params = pika.URLParameters(args.url)
    except Exception as exc:  # pika raises various types for bad URLs
        raise Failure(f"bad --url {redact(args.url)}: {exc}") from exc
    params.socket_timeout = args.connect_timeout
    params.stack_timeout = args.connect_timeout
    params.blocked_connection_timeout = max(args.wait_reply_timeout, 30.0)
    params.connection_attempts = 1
    try:
        return pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        raise Failure(f"cannot connect to {redact(args.url)}: {exc!r}") from exc
    except OSError as exc:
        raise Failure(f"cannot connect to {redact(args.url)}: {exc}") from exc


def headers_of(args):
    headers = dict(args.header)
    for key, size in args.header_bytes:
        headers[key] = "x" * size
    for i in range(args.many_headers):
        headers[f"h-{i}"] = i
    if args.nested_header:
        key, depth = args.nested_header
        # pika encodes tables recursively: allow it the depth asked for.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * depth + 1000))
        value = {}
        for _ in range(depth):
            value = {"n": value}
        headers[key] = value
    return headers or None


def message_properties(args, index):
    message_id = args.message_id
    if message_id is not None and args.count > 1:
        message_id = f"{message_id}-{index}"
    return pika.BasicProperties(
        content_type=args.content_type or None,
        content_encoding=args.content_encoding,
        delivery_mode=2,
        priority=args.priority,
        expiration=args.expiration,
        message_id=message_id,
        reply_to=args.reply_to,
        correlation_id=args.correlation_id,
        type=args.msg_type,
        headers=headers_of(args),
    )


def reply_line(body):
    """(line, is_json): the reply as one line, compact JSON when it parses."""
    try:
        return json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=False), True
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").replace("\n", "\\n"), False


def run(args):
    if args.body_file is not None:
        try:
            with open(args.body_file, "rb") as f:
                body = f.read()
        except OSError as exc:
            raise Failure(f"cannot read --body-file: {exc}") from exc
    else:
        body = args.body.encode("utf-8")

    want_reply = args.reply_to == DIRECT_REPLY_TO
    replies = []
    connection = connect(args)
    try:
        channel = connection.channel()
        if want_reply:
            # Must consume from direct reply-to before publishing with it.
            channel.basic_consume(
                queue=DIRECT_REPLY_TO,
                on_message_callback=lambda _ch, _m, _p, reply: replies.append(reply),
                auto_ack=True,
            )
        channel.confirm_delivery()
        for i in range(1, args.count + 1):
            try:
                channel.basic_publish(
                    exchange=args.exchange,
                    routing_key=args.routing_key,
                    body=body,
                    properties=message_properties(args, i),
                    mandatory=args.mandatory,
                )
            except pika.exceptions.UnroutableError as exc:
                raise Failure(f"message {i} was returned unroutable by the broker") from exc
            except pika.exceptions.NackError as exc:
                raise Failure(f"message {i} was nacked by the broker") from exc
        print(f"published {args.count} message(s) to exchange {args.exchange!r} "
              f"with routing key {args.routing_key!r}: confirmed", file=sys.stderr)

        if want_reply:
            deadline = time.monotonic() + args.wait_reply_timeout
            while len(replies) < args.count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"got {len(replies)} of {args.count} replies "
                                  f"within {args.wait_reply_timeout:g}s")
                connection.process_data_events(time_limit=min(left, 0.5))
            all_json = True
            for reply in replies[: args.count]:
                line, is_json = reply_line(reply)
                print(line, flush=True)
                all_json = all_json and is_json
            if not all_json:
                raise Failure("a reply body is not JSON")
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise Failure(f"broker closed the channel: {exc.reply_code} {exc.reply_text}") from exc
    except pika.exceptions.ConnectionClosed as exc:
        raise Failure(f"connection closed: {exc!r}") from exc
    except pika.exceptions.AMQPError as exc:
        raise Failure(f"AMQP error: {exc!r}") from exc
    finally:
        if connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except Failure as exc:
        print(f"publish_pika: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("publish_pika: interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
