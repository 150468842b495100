"""Renders the Helm chart with Helm's own engine (PyPI helm-sdkpy, Helm 4 as a shared library),
for scripts/helm_check.py.

helm-sdkpy has lint but no `helm template`: manifests are rendered by a real `Install` (schema
validation included) against a minimal in-memory Kubernetes API on 127.0.0.1 that answers
discovery and stores what it is sent; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_sdkpy as helm
import yaml


# ------------------------------------------------------------ a minimal Kubernetes API

KINDS = {
    # group/version: [(plural, kind, namespaced)]
    "v1": [
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("pods", "Pod", True),
        ("persistentvolumeclaims", "PersistentVolumeClaim", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    "keda.sh/v1alpha1": [
        ("scaledobjects", "ScaledObject", True),
        ("triggerauthentications", "TriggerAuthentication", True),
    ],
    "monitoring.coreos.com/v1": [
        ("servicemonitors", "ServiceMonitor", True),
        ("prometheusrules", "PrometheusRule", True),
    ],
}


class FakeKube:
    """Answers discovery and stores objects in memory (create, get, list, update, delete)."""

    def __init__(self):
        self.objects: dict[str, dict] = {}  # collection path + "/" + name -> object
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) or b"{}"
                if "protobuf" in (self.headers.get("Content-Type") or ""):
                    # Helm's release storage (a typed client) writes Secrets as protobuf; keep
                    # a stub with the name, which is all that is read back here.
                    m = re.search(rb"sh\.helm\.release\.v1\.[A-Za-z0-9.-]+", raw)
                    return {"kind": "Secret", "apiVersion": "v1",
                            "metadata": {"name": m.group().decode() if m else "unknown"}}
                return json.loads(raw)

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

            def do_PUT(self):
                fake.handle(self, "PUT")

            def do_PATCH(self):
                fake.handle(self, "PATCH")

            def do_DELETE(self):
                fake.handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        with self.lock:
            self.objects.clear()

    @staticmethod
    def status(code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}

    @staticmethod
    def resource_list(gv: str) -> dict:
        return {
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
            "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": ns, "kind": kind,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                for plural, kind, ns in KINDS[gv]
            ],
        }

    def handle(self, h, method: str):
        url = urllib.parse.urlsplit(h.path)
        path = url.path.rstrip("/")
        query = urllib.parse.parse_qs(url.query)
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/version":
            return h.reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0",
                                 "platform": "linux/amd64", "goVersion": "go1.22.0"})
        if method == "GET" and path == "/api":
            return h.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                 "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        if method == "GET" and path == "/apis":
            groups = {}
            for gv in KINDS:
                if "/" in gv:
                    g, v = gv.split("/")
                    groups.setdefault(g, []).append({"groupVersion": gv, "version": v})
            return h.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": vs, "preferredVersion": vs[0]} for g, vs in groups.items()]})
        # /api/v1[/namespaces/NS]/PLURAL[/NAME] or /apis/G/V[/namespaces/NS]/PLURAL[/NAME]
        if parts[0] == "api":
            gv, rest = parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return h.reply(404, self.status(404, "NotFound", f"no route {path}"))
        if gv not in KINDS:
            return h.reply(404, self.status(404, "NotFound", f"no group version {gv}"))
        if not rest:
            return h.reply(200, self.resource_list(gv))
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        plural, name = rest[0], (rest[1] if len(rest) > 1 else None)
        collection = f"{gv}/{ns or ''}/{plural}"
        with self.lock:
            if name is None and method == "GET":
                items = [o for k, o in self.objects.items() if k.rsplit("/", 1)[0] == collection]
                selector = query.get("labelSelector", [""])[0]
                for term in filter(None, selector.split(",")):
                    if "=" in term:
                        k, v = term.split("=", 1)
                        items = [o for o in items if o.get("metadata", {}).get("labels", {}).get(k.rstrip("=!")) == v]
                kind = next(k for p, k, _ in KINDS[gv] if p == plural)
                return h.reply(200, {"kind": f"{kind}List", "apiVersion": gv, "metadata": {"resourceVersion": "1"},
                                     "items": items})
            if name is None and method == "POST":
                obj = h.body()
                name = obj.get("metadata", {}).get("name")
                key = f"{collection}/{name}"
                if key in self.objects:
                    return h.reply(409, self.status(409, "AlreadyExists", f"{plural} {name} exists"))
                meta = obj.setdefault("metadata", {})
                meta.setdefault("namespace", ns) if ns else None
                meta.update({"uid": f"uid-{len(self.objects)}", "resourceVersion": "1",
                             "creationTimestamp": "2026-01-01T00:00:00Z"})
                self.objects[key] = obj
                return h.reply(201, obj)
            key = f"{collection}/{name}"
            if method == "GET":
                if key in self.objects:
                    return h.reply(200, self.objects[key])
                return h.reply(404, self.status(404, "NotFound", f"{plural} {name} not found"))
            if method in ("PUT", "PATCH"):
                obj = h.body()
                if method == "PATCH" and key in self.objects:
                    return h.reply(200, self.objects[key])
                self.objects[key] = obj
                return h.reply(200, obj)
            if method == "DELETE":
                self.objects.pop(key, None)
                return h.reply(200, self.status(200, "", "deleted") | {"status": "Success"})
        return h.reply(405, self.status(405, "MethodNotAllowed", method))


# --------------------------------------------------------------------------- rendering


class Renderer:
    """Installs `chart` with given values into a fresh FakeKube and returns what was applied."""

    def __init__(self, chart: Path):
        self.chart = chart
        self.kube = FakeKube()
        kubeconfig = yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.kube.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "clipqc"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
        })
        self.config = helm.Configuration(namespace="clipqc", kubeconfig=kubeconfig)
        self.n = 0

    def render(self, values: dict) -> tuple[list[dict] | None, str | None]:
        """(manifests, None) or (None, error message)."""
        self.kube.reset()
        self.n += 1
        try:
            asyncio.run(helm.Install(self.config).run(
                f"r{self.n}", str(self.chart), values=values, wait=False, timeout=60))
        except helm.HelmError as e:
            return None, str(e)
        with self.kube.lock:
            objs = [o for k, o in self.kube.objects.items() if not k.startswith("v1/clipqc/secrets/sh.helm.release")]
        return objs, None

    def close(self):
        self.kube.close()
