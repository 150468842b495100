#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora into fuzz/seeds/<target>/ (checked in; a few KB each).

Seeds are valid inputs the fuzzer mutates from: requests in both encodings, small images of
every enabled format and colour type (cut from the reference fixture part when it is there),
and the project's example configs plus one that sets every section. Files named `found-*` are
inputs the fuzzer found, kept as regression seeds; this script leaves them. Run with the
project's Python environment (Pillow): `.venv/bin/python fuzz/make_seeds.py`.
"""

import base64
import io
import json
import struct
from pathlib import Path

from PIL import Image

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
SEEDS = FUZZ / "seeds"


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# --- requests: protobuf by hand (field numbers from proto/clipqc/v1/inspection.proto) -------


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, wire, payload):
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def timestamp(seconds, nanos):
    return field(1, 0, seconds) + field(2, 0, nanos)


def request(image_field, image, region=None, stamps=False, attributes=()):
    out = field(1, 2, b"r-1") + field(2, 2, b"cam-7") + field(3, 2, b"line-2")
    out += field(4, 2, b"default") + field(image_field, 2, image)
    if stamps:
        out += field(7, 2, timestamp(1_795_680_000, 250_000_000))
        out += field(10, 2, timestamp(1_795_680_060, 0))
    for k, v in attributes:
        out += field(8, 2, field(1, 2, k) + field(2, 2, v))
    if region:
        out += field(9, 2, b"".join(field(i + 1, 0, v) for i, v in enumerate(region)))
    return out


def requests(tiny_jpeg):
    write("request", "uri.pb", request(5, b"http://127.0.0.1:8080/a.jpg", attributes=[(b"sku", b"B-17")]))
    write("request", "inline.pb", request(6, tiny_jpeg, region=(1, 2, 30, 40), stamps=True))
    camel = {
        "requestId": "r-1", "cameraId": "cam-7", "lineId": "line-2", "profile": "default",
        "uri": "http://127.0.0.1:8080/a.jpg", "attributes": {"sku": "B-17"},
    }
    write("request", "camel.json", json.dumps(camel).encode())
    snake = {
        "request_id": "r-2", "inline_data": base64.b64encode(tiny_jpeg).decode(),
        "captured_at": "2026-11-26T08:00:00.250Z", "deadline": "2026-11-26T08:01:00Z",
        "region": {"x": 1, "y": 2, "width": 30, "height": 40},
    }
    write("request", "snake.json", json.dumps(snake).encode())
    # Refused ones: no image; a timestamp out of range (echoed without it).
    write("request", "no-image.json", b'{"requestId":"x"}')
    write("request", "bad-time.pb", request(5, b"u", stamps=False) + field(10, 2, timestamp(253_402_300_800, 0)))


# --- images: option byte, region (4 × u16 LE), then the image ------------------------------


def header(options, region=(0, 0, 0, 0)):
    return bytes([options]) + struct.pack("<4H", *region)


def encoded(image, fmt, **kw):
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def with_exif_rotation(jpeg):
    """`jpeg` with an EXIF block saying "rotate 90° clockwise to view" (orientation 6)."""
    app1 = b"\xff\xe1\x00\x22Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08"
    app1 += bytes([0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0])
    return jpeg[:2] + app1 + jpeg[2:]


def images():
    fixture = ROOT / "target/fixtures/images/part_small_150x100.jpg"
    if fixture.exists():
        part = Image.open(fixture).convert("RGB")
    else:  # a fresh clone without the fixtures: a gradient stands in for the part
        part = Image.linear_gradient("L").resize((150, 100)).convert("RGB")
    rgb = part.resize((48, 32))
    small = part.resize((24, 16))
    gray = small.convert("L")
    cases = [
        ("jpeg-pad", 0x00, (0, 0, 0, 0), encoded(rgb, "JPEG", quality=80)),
        ("jpeg-crop-dct", 0x11, (0, 0, 0, 0), encoded(part.resize((96, 64)), "JPEG", quality=60)),
        ("jpeg-progressive-squash", 0x02, (0, 0, 0, 0), encoded(small, "JPEG", progressive=True)),
        ("jpeg-exif-region", 0x08, (2, 2, 12, 16), with_exif_rotation(encoded(small, "JPEG"))),
        ("jpeg-gray-clahe", 0x04, (0, 0, 0, 0), encoded(gray, "JPEG")),
        ("jpeg-cmyk", 0x00, (0, 0, 0, 0), encoded(small.convert("CMYK"), "JPEG")),
        ("png-tiles", 0x20, (0, 0, 0, 0), encoded(rgb, "PNG")),
        ("png-gray16-tiles-region", 0x28, (4, 2, 36, 24),
         encoded(rgb.convert("L").point(lambda v: v * 256, "I").convert("I;16"), "PNG")),
        ("png-palette-siglip", 0x40, (0, 0, 0, 0), encoded(small.convert("P"), "PNG")),
        ("png-rgba-bilinear-clahe", 0x84, (0, 0, 0, 0), encoded(small.convert("RGBA"), "PNG")),
        ("png-elongated", 0x00, (0, 0, 0, 0), encoded(part.resize((200, 4)), "PNG")),
        ("bmp", 0x00, (0, 0, 0, 0), encoded(small, "BMP")),
        ("bmp-palette", 0x02, (0, 0, 0, 0), encoded(gray.convert("P"), "BMP")),
        ("tiff", 0x00, (0, 0, 0, 0), encoded(small, "TIFF")),
        ("tiff-lzw-region", 0x08, (1, 1, 20, 10), encoded(small, "TIFF", compression="tiff_lzw")),
        ("tiff-deflate-gray16", 0x04, (0, 0, 0, 0),
         encoded(gray.point(lambda v: v * 256, "I").convert("I;16"), "TIFF", compression="tiff_adobe_deflate")),
        ("tiff-jpeg", 0x01, (0, 0, 0, 0), encoded(small, "TIFF", compression="jpeg")),
    ]
    for name, options, region, data in cases:
        write("preprocess", name, header(options, region) + data)
    return encoded(Image.new("RGB", (8, 8), (120, 60, 30)), "JPEG")


# --- configs: the project's examples and one that sets every section ------------------------

FULL = """\
[kafka]
brokers = "localhost:9092"
group_id = "g"
input_topics = ["a", "b"]
default_encoding = "json"
verdict_encoding = "protobuf"
instance_id = "w-1"
properties = { "security.protocol" = "plaintext", "linger.ms" = "5" }

[fetch]
allowed_schemes = ["http", "file"]
allowed_hosts = ["*.plant.local", "10.0.0.7"]
allowed_networks = ["10.20.0.0/16", "fd00::1"]
max_redirects = 0
file_roots = ["/srv/images"]
max_bytes = 1048576
object_store = { aws_region = "eu-west-1" }

[batch]
max_size = 8
max_delay_ms = 3

[pipeline]
max_in_flight = 16
max_in_flight_bytes = 67108864
config_reload_ms = 0

[http]
listen = "127.0.0.1:0"

[model]
device = "cpu"

[preprocess]
jpeg_dct_headroom = 2.0
limits = { max_width = 4096, max_height = 4096, max_alloc_bytes = 67108864, max_aspect_ratio = 8 }

[exemplars]
max_per_profile = 10

[[notify.webhooks]]
name = "am"
url = "http://alertmanager:9093/api/v2/alerts"
defect_rate = { threshold = 0.15, window_seconds = 600, min_verdicts = 50 }

[profiles.lines]
view = "squash"
review_threshold = 0.55
tiles = { scales = [1.0, 0.5, 0.25], overlap = 0.25, max_windows = 128, max_aspect_ratio = 2.0, aggregate = "mean_max" }
states = { object = "steel bracket" }
line_memory = { size = 16, min_parts = 4, weight = 0.5 }
feedback = { learn = "corrections", max_per_class = 5 }
exemplars = { alpha = 0.5, beta = 4.0 }

[[profiles.lines.classes]]
name = "scratch"
prompts = ["a scratch"]
defect = true
threshold = 0.4

[[profiles.lines.classes]]
name = "good"
prompts = ["a clean part"]

[[routes]]
camera = "cam-[0-9]*"
profile = "lines"

[[routes]]
line = "line-?"
region = { x = 0, y = 0, width = 640, height = 480 }
"""


def configs():
    write("config", "example.toml", (ROOT / "deploy/clipqc.example.toml").read_bytes())
    write("config", "compose.toml", (ROOT / "deploy/compose/clipqc.toml").read_bytes())
    write("config", "full.toml", FULL.encode())
    write("config", "empty.toml", b"")


if __name__ == "__main__":
    # Inputs the fuzzer found (`found-*`, each a regression test of a fix) are kept.
    for old in SEEDS.glob("*/*"):
        if not old.name.startswith("found-"):
            old.unlink()
    tiny = images()
    requests(tiny)
    configs()
    total = sum(p.stat().st_size for p in SEEDS.rglob("*") if p.is_file())
    print(f"{sum(1 for p in SEEDS.rglob('*') if p.is_file())} seeds, {total} bytes, in {SEEDS}")
