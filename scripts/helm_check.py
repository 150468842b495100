"""The generated part of the Helm chart's values.schema.json: its `config` property is the
worker's own config schema (schemas/clipqc-config.schema.json, draft 2020-12) turned into the
draft-07 that Helm validates values with, so a key the worker would refuse is refused by
`helm install` too, before anything starts.

    scripts/check-helm.sh --write-schema    (runs: helm_check.py --write-schema)

refreshes it after the worker's config schema changed; scripts/tests/test_helm_chart.py checks
that it is current, with the chart's other checks.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "clipqc"
WORKER_SCHEMA = ROOT / "schemas" / "clipqc-config.schema.json"
VALUES_SCHEMA = CHART / "values.schema.json"


def config_schema_for_values() -> tuple[dict, dict]:
    """The worker's draft 2020-12 config schema as draft-07: (config property, definitions)."""
    worker = json.loads(WORKER_SCHEMA.read_text())
    nonstandard_formats = {"uint", "uint32", "uint64", "int32", "int64", "float", "double", "uint8", "uint16"}

    def convert(o):
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                if k == "format" and isinstance(v, str) and v in nonstandard_formats:
                    continue  # schemars' numeric formats; draft-07 validators do not know them
                if k == "$ref" and isinstance(v, str):
                    out[k] = v.replace("#/$defs/", "#/definitions/")
                    continue
                out[k] = convert(v)
            return out
        if isinstance(o, list):
            return [convert(x) for x in o]
        return o

    defs = convert(worker.get("$defs", {}))
    root = convert({k: v for k, v in worker.items() if k not in ("$defs", "$schema", "title")})
    root = {"$comment": "generated from schemas/clipqc-config.schema.json by scripts/helm_check.py --write-schema", **root}
    return root, defs


def schema_with_config(schema: dict) -> dict:
    """`schema` (values.schema.json) with its `config` part regenerated."""
    config, defs = config_schema_for_values()
    out = copy.deepcopy(schema)
    out["properties"]["config"] = config
    out["definitions"] = defs
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-schema", action="store_true", required=True,
                    help="refresh values.schema.json's config part from schemas/clipqc-config.schema.json")
    ap.parse_args(argv)
    schema = json.loads(VALUES_SCHEMA.read_text())
    VALUES_SCHEMA.write_text(json.dumps(schema_with_config(schema), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {VALUES_SCHEMA.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
