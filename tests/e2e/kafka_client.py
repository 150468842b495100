#!/usr/bin/env python3
"""The end-to-end tests' independent Kafka client (confluent-kafka from PyPI, its own librdkafka).

    kafka_client.py produce --brokers B --topic T --count N --image-url URL [--bad-every K] [--rate R]
        Publishes N JSON inspection requests (content-type application/json) whose image is a
        URL, R per second if given; every K-th request names an image the server does not have
        (HTTP 404). Each carries a W3C `traceparent` header, as from a traced camera gateway.
        Prints one JSON line per acknowledged record: {"partition", "offset", "requestId", "bad",
        "traceparent"}.

    kafka_client.py consume --brokers B --topic T [--expect N] [--idle S] [--to-end]
        Reads the topic from the beginning in a group of its own and prints one JSON line per
        record: its partition and offset, headers, and the verdict (JSON) when it is one. Stops
        after N records with distinct source coordinates, or after S seconds without a record,
        or with --to-end once every partition has reached its end (for a read_committed reader,
        the default, its last stable offset).

    Both take --property K=V (repeatable): more librdkafka properties, e.g. security.protocol,
    sasl.* and ssl.ca.location for a broker that requires a login or TLS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer


def properties(args: argparse.Namespace) -> dict:
    """The --property K=V pairs."""
    return dict(kv.split("=", 1) for kv in args.property)


def produce(args: argparse.Namespace) -> int:
    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True, "linger.ms": 5,
                         **properties(args)})
    failures = []
    traces = {}

    def report(err, msg):
        if err is not None:
            failures.append(str(err))
            return
        rid = msg.key().decode()
        print(json.dumps({"partition": msg.partition(), "offset": msg.offset(), "requestId": rid,
                          "bad": rid.endswith("-bad"), "traceparent": traces.pop(rid)}), flush=True)

    start = time.time()
    for i in range(args.count):
        if args.rate > 0:
            # Like cameras: a steady rate, not everything at once.
            pause = start + i / args.rate - time.time()
            if pause > 0:
                producer.poll(pause)
        bad = args.bad_every > 0 and i % args.bad_every == args.bad_every - 1
        rid = f"{args.prefix}-{i}" + ("-bad" if bad else "")
        url = args.image_url.replace(".jpg", "-missing.jpg") if bad else args.image_url
        req = {"requestId": rid, "cameraId": f"cam-{i % 7}", "lineId": f"line-{i % 2}",
               "profile": "default", "uri": url,
               "capturedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "attributes": {"sku": "bracket-7", "lot": str(i // 100)}}
        traces[rid] = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
        while True:
            try:
                producer.produce(args.topic, json.dumps(req).encode(), key=rid.encode(),
                                 headers={"content-type": "application/json", "traceparent": traces[rid]},
                                 on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60)
    if failures or left:
        print(f"produce: {len(failures)} failed, {left} not delivered: {failures[:3]}", file=sys.stderr)
        return 1
    return 0


def consume(args: argparse.Namespace) -> int:
    consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": f"e2e-reader-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "enable.partition.eof": args.to_end, **properties(args)})
    consumer.subscribe([args.topic])
    partitions = set(consumer.list_topics(args.topic, timeout=30).topics[args.topic].partitions) if args.to_end else set()
    ended = set()
    sources = set()
    last = time.time()
    try:
        while (args.expect is None or len(sources) < args.expect) and time.time() - last < args.idle:
            if args.to_end and ended >= partitions:
                break
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    ended.add(msg.partition())
                    continue
                if msg.error().fatal():
                    raise KafkaException(msg.error())
                continue
            last = time.time()
            headers = {k: (v.decode(errors="replace") if v is not None else None) for k, v in (msg.headers() or [])}
            record = {"partition": msg.partition(), "offset": msg.offset(), "headers": headers}
            if headers.get("content-type") == "application/json":
                record["verdict"] = json.loads(msg.value())
            source = (headers.get("clipqc-source-partition") or headers.get("__connect.errors.partition"),
                      headers.get("clipqc-source-offset") or headers.get("__connect.errors.offset"))
            sources.add(source)
            print(json.dumps(record), flush=True)
    finally:
        consumer.close()
    if args.to_end and not ended >= partitions:
        print(f"consume --to-end: partitions {sorted(partitions - ended)} of {args.topic} not read to their end "
              f"within {args.idle} s without a record", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("produce")
    pr.add_argument("--brokers", required=True)
    pr.add_argument("--topic", required=True)
    pr.add_argument("--count", type=int, required=True)
    pr.add_argument("--image-url", required=True)
    pr.add_argument("--bad-every", type=int, default=0)
    pr.add_argument("--prefix", default="e2e")
    pr.add_argument("--rate", type=float, default=0, help="requests per second (0: as fast as possible)")
    co = sub.add_parser("consume")
    co.add_argument("--brokers", required=True)
    co.add_argument("--topic", required=True)
    co.add_argument("--expect", type=int)
    co.add_argument("--idle", type=float, default=20.0)
    co.add_argument("--to-end", action="store_true", help="stop once every partition is read to its end")
    for command in (pr, co):
        command.add_argument("--property", action="append", default=[], metavar="K=V")
    args = p.parse_args()
    return produce(args) if args.command == "produce" else consume(args)


if __name__ == "__main__":
    raise SystemExit(main())
