#!/usr/bin/env python3
"""Publish inspection requests for image files and print the verdicts that come back.

    python deploy/samples/demo_client.py --brokers HOST:PORT IMAGE...

Requests are JSON (proto3 JSON mapping, content-type application/json): every other image is
sent inline (base64), the rest by file:// URI (the worker must list their folder in
fetch.file_roots). Verdicts are read from the verdicts topic; JSON verdicts are printed as
they are, protobuf ones as their size (use a JSON verdict_encoding for reading by eye).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer


def outcome_word(outcome):
    """PASS, DEFECT, REVIEW or ERROR, as an operator says it: proto3 JSON spells the enum value
    OUTCOME_DEFECT, and omits the enum's zero value (OUTCOME_UNSPECIFIED)."""
    return (outcome or "OUTCOME_UNSPECIFIED").removeprefix("OUTCOME_")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers", required=True)
    p.add_argument("--requests-topic", default="clipqc.requests")
    p.add_argument("--verdicts-topic", default="clipqc.verdicts")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("images", nargs="+", type=Path)
    args = p.parse_args()

    producer = Producer({"bootstrap.servers": args.brokers})
    sent = {}
    for i, path in enumerate(args.images):
        rid = f"demo-{uuid.uuid4().hex[:8]}"
        req = {"requestId": rid, "cameraId": f"cam-{i % 3}", "lineId": "line-1",
               "capturedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "attributes": {"file": path.name}}
        if i % 2:
            req["uri"] = path.resolve().as_uri()
        else:
            req["inlineData"] = base64.b64encode(path.read_bytes()).decode()
        producer.produce(args.requests_topic, json.dumps(req).encode(), key=req["cameraId"],
                         headers={"content-type": "application/json"})
        sent[rid] = path.name
    producer.flush(10)
    print(f"published {len(sent)} requests to {args.requests_topic}", file=sys.stderr)

    consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": f"demo-reader-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([args.verdicts_topic])
    seen = 0
    deadline = time.time() + args.timeout
    while seen < len(sent) and time.time() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        try:
            v = json.loads(msg.value())
        except ValueError:
            print(f"(protobuf verdict, {len(msg.value())} bytes)")
            continue
        if v.get("requestId") not in sent:
            continue
        seen += 1
        scores = " ".join(f"{s['name']}={s.get('probability', 0):.3f}" for s in v.get("scores", []))
        err = v.get("error", {}).get("message", "")
        print(f"{sent[v['requestId']]:<28} {outcome_word(v.get('outcome')):<8} {v.get('topClass', ''):<16} {scores}{err}")
    consumer.close()
    if seen < len(sent):
        print(f"only {seen} of {len(sent)} verdicts within {args.timeout}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
