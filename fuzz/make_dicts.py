#!/usr/bin/env python3
"""Writes libFuzzer dictionaries for the fuzz targets into the directory given (fuzz/target/dicts).

Without a sanitizer, libFuzzer does not see string comparisons (it intercepts memcmp only
under ASan), so it would rarely guess a config key or a JSON field name: the dictionaries give
it the words, taken from the checked-in JSON Schemas (kept in step with the code by the
worker's tests), plus the markers of the image formats.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def words(schema):
    """Property names and string enum values anywhere in a JSON Schema."""
    keys, values = set(), set()

    def walk(o):
        if isinstance(o, dict):
            keys.update(o.get("properties", {}).keys())
            values.update(v for v in o.get("enum", []) if isinstance(v, str))
            if isinstance(o.get("const"), str):
                values.add(o["const"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(json.loads(schema.read_text()))
    return keys, values


def entry(token):
    """One dictionary line: printable ASCII as is, every other byte escaped."""
    escaped = "".join(
        chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token
    )
    return f'"{escaped}"'


def write(out, name, tokens, encoding="utf-8"):
    lines = sorted({entry(t.encode(encoding)) for t in tokens})
    (out / f"{name}.dict").write_text("".join(line + "\n" for line in lines))


def main(out):
    out.mkdir(parents=True, exist_ok=True)
    keys, values = words(ROOT / "schemas/clipqc-config.schema.json")
    config = set(keys) | {f'"{v}"' for v in values}
    config |= {f"{k} = " for k in keys} | {f"[{k}]" for k in keys} | {f"[[{k}]]" for k in keys}
    config |= {"[profiles.", "[[profiles.", ".classes]]", "true", "false", '"""', "'''", "{ ", " }", "[", "]", ","}
    write(out, "config", config)

    keys, values = words(ROOT / "schemas/clipqc.v1.inspection-request.schema.json")
    request = {f'"{k}":' for k in keys} | {f'"{v}"' for v in values}
    # The proto3 JSON mapping accepts the proto field names too.
    snake = {"".join("_" + c.lower() if c.isupper() else c for c in k) for k in keys}
    request |= {f'"{k}":' for k in snake}
    request |= {'"1970-01-01T00:00:00Z"', '"9999-12-31T23:59:59.999999999Z"', "null", "true", "{}", "[]"}
    write(out, "request", request)

    image = [
        "\xff\xd8\xff", "\xff\xc0", "\xff\xc2", "\xff\xc4", "\xff\xda", "\xff\xdb", "\xff\xdd",
        "\xff\xd9", "\xff\xe1", "Exif\x00\x00", "\x89PNG\r\n\x1a\n", "IHDR", "PLTE", "IDAT",
        "IEND", "tRNS", "eXIf", "acTL", "fcTL", "BM", "II*\x00", "MM\x00*", "II+\x00",
    ]
    write(out, "preprocess", image, encoding="latin-1")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
