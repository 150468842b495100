"""Checks of the Helm chart helm/clipqc, with Helm's own engine (PyPI helm-sdkpy, Helm 4 as a
shared library). Run by scripts/check-helm.sh; `--write-schema` refreshes the generated part of
values.schema.json after the worker's config schema changed.

Manifests are rendered by a real `helm install` against an in-memory Kubernetes API
(helm_render.py).

What it checks:
  1. helm/clipqc/files/clipqc.rules.yml is a byte copy of deploy/prometheus/rules/clipqc.rules.yml;
  2. values.schema.json's `config` is the worker's config schema (schemas/clipqc-config.schema.json);
  3. `helm lint` of the chart passes, and fails for a copy with invalid values.yaml;
  4. value sets render, and the manifests say what they must (GPU limit, config checksum, grace
     period above the drain, KEDA capped at the partitions, HPA only without KEDA, rules equal
     to deploy/'s, the rendered worker config valid against the worker's schema...);
  5. invalid values are refused (schema) and inconsistent ones fail the render (template).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import helm_sdkpy as helm
import jsonschema
import yaml

from checks import check, summary
from helm_render import Renderer

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "clipqc"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "clipqc.rules.yml"
RULES_COPY = CHART / "files" / "clipqc.rules.yml"
WORKER_SCHEMA = ROOT / "schemas" / "clipqc-config.schema.json"
VALUES_SCHEMA = CHART / "values.schema.json"



# ----------------------------------------------------------------- the config schema part


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
    config, defs = config_schema_for_values()
    out = copy.deepcopy(schema)
    out["properties"]["config"] = config
    out["definitions"] = defs
    return out


def find(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = find(objs, kind)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}, got {len(found)}: {[o.get('kind') for o in objs]}")
    return found[0]


def container(deploy: dict) -> dict:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "clipqc")


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------ checks


def check_rules_copy():
    print("== rules copy")
    if not RULES.exists():
        check(False, f"{RULES.relative_to(ROOT)} exists")
        return
    check(RULES_COPY.exists() and RULES_COPY.read_bytes() == RULES.read_bytes(),
          f"{RULES_COPY.relative_to(ROOT)} equals {RULES.relative_to(ROOT)} "
          f"(fix: cp {RULES.relative_to(ROOT)} {RULES_COPY.relative_to(ROOT)})")


def check_schema_current():
    print("== values.schema.json")
    schema = json.loads(VALUES_SCHEMA.read_text())
    check(schema.get("$schema") == "http://json-schema.org/draft-07/schema#", "draft-07")
    check(schema.get("additionalProperties") is False, "unknown top-level keys refused")
    check(schema == schema_with_config(schema),
          "its `config` part matches schemas/clipqc-config.schema.json "
          "(fix: scripts/check-helm.sh --write-schema)")
    try:
        jsonschema.Draft7Validator.check_schema(schema)
        check(True, "a valid draft-07 schema")
    except jsonschema.SchemaError as e:
        check(False, f"a valid draft-07 schema: {e.message}")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(defaults)]
    check(not errors, "values.yaml valid against it" + (f": {errors[:3]}" if errors else ""))


def lint_ok(chart: Path) -> tuple[bool, list]:
    res = asyncio.run(helm.Lint(helm.Configuration(namespace="clipqc")).run(str(chart)))
    # Severity: 1 info, 2 warning, 3 error (helm's support.Severity).
    bad = [m for m in res.get("Messages") or [] if m.get("Severity", 0) >= 2]
    return not bad and not res.get("Errors"), bad


def check_lint():
    print("== helm lint")
    ok, bad = lint_ok(CHART)
    check(ok, "lint passes (no warning or error)" + (f": {bad}" if bad else ""))
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / "clipqc"
        shutil.copytree(CHART, broken)
        values = yaml.safe_load((broken / "values.yaml").read_text())
        values["replicaCount"] = "two"
        values["replicas"] = 2
        (broken / "values.yaml").write_text(yaml.safe_dump(values))
        ok, bad = lint_ok(broken)
        check(not ok and any(m.get("Path") == "values.yaml" for m in bad),
              "lint fails for values.yaml with replicaCount: \"two\" and an unknown key")


def check_renders(r: Renderer):
    worker_schema = json.loads(WORKER_SCHEMA.read_text())
    print("== default values")
    objs, err = r.render({})
    if not check(err is None, "renders" + (f": {err}" if err else "")):
        return
    kinds = sorted(o["kind"] for o in objs)
    check(kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"],
          f"objects: {kinds}")
    d = one(objs, "Deployment")
    pod = d["spec"]["template"]["spec"]
    c = container(d)
    check(c["resources"]["limits"].get("nvidia.com/gpu") in (1, "1"), "GPU limit nvidia.com/gpu: 1")
    ann = d["spec"]["template"]["metadata"].get("annotations", {})
    default_checksum = ann.get("checksum/config", "")
    check(len(default_checksum) == 64, "checksum/config annotation (sha256)")
    grace = pod.get("terminationGracePeriodSeconds")
    check(grace == 35, f"terminationGracePeriodSeconds {grace} = drain 20 s + 15 s margin")
    check(d["spec"].get("replicas") == 1, "replicas: 1 without an autoscaler")
    env = env_of(c)
    check(env.get("CLIPQC_CONFIG") == "/etc/clipqc/clipqc.yaml", "CLIPQC_CONFIG")
    check(env.get("CLIPQC_LOG_FORMAT") == "json", "CLIPQC_LOG_FORMAT=json")
    check("CLIPQC__KAFKA__INSTANCE_ID" not in env, "no static membership by default")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness /healthz")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness /readyz")
    sp = c["startupProbe"]
    check(sp["failureThreshold"] * sp["periodSeconds"] >= 300, "startup probe allows >= 5 min for model load + warm-up")
    check(pod["securityContext"].get("runAsNonRoot") is True and pod["securityContext"].get("runAsUser") == 10001,
          "pod runs as non-root uid 10001")
    check(c["securityContext"].get("allowPrivilegeEscalation") is False, "no privilege escalation")
    vols = {v["name"]: v for v in pod["volumes"]}
    check(vols["model"].get("persistentVolumeClaim", {}).get("readOnly") is True, "model from the PVC, read-only")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
    check(mount["mountPath"] == "/models/current" and mount.get("readOnly") is True, "model mounted read-only at /models/current")
    check("initContainers" not in pod, "no init container with a PVC")
    cm = one(objs, "ConfigMap")
    cfg = yaml.safe_load(cm["data"]["clipqc.yaml"])
    check(cfg["model"]["dir"] == "/models/current" and cfg["http"]["listen"] == "0.0.0.0:9400",
          "config: model.dir = the mount, http.listen on the container port")
    errors = [e.message for e in jsonschema.Draft202012Validator(worker_schema).iter_errors(cfg)]
    check(not errors, "rendered clipqc.yaml valid against schemas/clipqc-config.schema.json" + (f": {errors[:3]}" if errors else ""))
    svc = one(objs, "Service")
    check([(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("http-metrics", 9400)], "Service port 9400 http-metrics")
    check(one(objs, "PodDisruptionBudget")["spec"].get("maxUnavailable") == 1, "PDB maxUnavailable 1")

    print("== KEDA (maxReplicas 20, 6 partitions)")
    objs, err = r.render({"keda": {"enabled": True}, "autoscaling": {"enabled": True, "maxReplicas": 20, "partitions": 6}})
    if check(err is None, "renders" + (f": {err}" if err else "")):
        so = one(objs, "ScaledObject")
        check(so["spec"]["maxReplicaCount"] == 6, f"maxReplicaCount {so['spec']['maxReplicaCount']} = min(20, 6)")
        trig = so["spec"]["triggers"][0]
        md = trig["metadata"]
        check(trig["type"] == "kafka" and md.get("allowIdleConsumers") == "false", "kafka trigger, allowIdleConsumers: \"false\"")
        check(md.get("consumerGroup") == "clipqc" and md.get("topic") == "clipqc.requests"
              and md.get("bootstrapServers") == "kafka:9092", "trigger on group clipqc, topic clipqc.requests, brokers from config")
        check(not find(objs, "HorizontalPodAutoscaler"), "no HPA of the chart's own with KEDA on")
        check("replicas" not in one(objs, "Deployment")["spec"], "Deployment leaves replicas to the autoscaler")
    objs, err = r.render({"keda": {"enabled": True}, "autoscaling": {"maxReplicas": 3, "partitions": 12}})
    if check(err is None, "renders with maxReplicas 3, 12 partitions" + (f": {err}" if err else "")):
        check(one(objs, "ScaledObject")["spec"]["maxReplicaCount"] == 3, "maxReplicaCount = min(3, 12) = 3")

    print("== HPA (KEDA off, maxReplicas 4, 6 partitions)")
    objs, err = r.render({"autoscaling": {"enabled": True, "maxReplicas": 4, "partitions": 6,
                                          "targetCPUUtilizationPercentage": 70}})
    if check(err is None, "renders" + (f": {err}" if err else "")):
        hpa = one(objs, "HorizontalPodAutoscaler")
        check(hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["maxReplicas"] == 4, "autoscaling/v2, maxReplicas 4")
        types = sorted(m["type"] for m in hpa["spec"]["metrics"])
        check(types == ["Pods", "Resource"], f"lag (Pods) and CPU (Resource) metrics: {types}")
        check(not find(objs, "ScaledObject"), "no ScaledObject")
    objs, err = r.render({"autoscaling": {"enabled": True, "maxReplicas": 10, "partitions": 6}})
    if check(err is None, "renders with maxReplicas 10" + (f": {err}" if err else "")):
        check(one(objs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 6, "HPA maxReplicas = min(10, 6) = 6")

    print("== ServiceMonitor + PrometheusRule")
    objs, err = r.render({"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}})
    if check(err is None, "renders" + (f": {err}" if err else "")):
        sm = one(objs, "ServiceMonitor")
        ep = sm["spec"]["endpoints"][0]
        check(ep["port"] == "http-metrics" and ep["path"] == "/metrics", "ServiceMonitor scrapes http-metrics /metrics")
        check(any(rl.get("targetLabel") == "job" and rl.get("replacement") == "clipqc" for rl in ep.get("relabelings", [])),
              "scraped as job=\"clipqc\" (what the rules select)")
        pr = one(objs, "PrometheusRule")
        expected = yaml.safe_load(RULES.read_text())["groups"] if RULES.exists() else None
        check(pr["spec"]["groups"] == expected, "PrometheusRule groups == deploy/prometheus/rules/clipqc.rules.yml groups")
        alerts = [rule["alert"] for g in pr["spec"]["groups"] for rule in g["rules"] if "alert" in rule]
        check(len(alerts) > 0, f"alerts: {', '.join(alerts)}")

    print("== model from an init container; static membership; longer drain; no GPU")
    values = {
        "model": {"pvc": {"claimName": ""},
                  "init": {"image": "busybox:1.36", "command": ["sh", "-c", "cp -a /artifact/. \"$MODEL_DIR\"/"]}},
        "staticMembership": {"enabled": True},
        "config": {"pipeline": {"drain_timeout_ms": 60500}, "model": {"device": "cpu"}},
        "gpu": {"enabled": False},
    }
    objs, err = r.render(values)
    if check(err is None, "renders" + (f": {err}" if err else "")):
        d = one(objs, "Deployment")
        pod = d["spec"]["template"]["spec"]
        init = pod.get("initContainers", [])
        check(len(init) == 1 and init[0]["image"] == "busybox:1.36", "init container fetch-model")
        init_mount = next(m for m in init[0]["volumeMounts"] if m["name"] == "model")
        check(not init_mount.get("readOnly"), "init container writes the model volume")
        vols = {v["name"]: v for v in pod["volumes"]}
        check("emptyDir" in vols["model"], "model volume is an emptyDir")
        c = container(d)
        mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
        check(mount.get("readOnly") is True, "worker mounts it read-only")
        env = env_of(c)
        check(env.get("CLIPQC__KAFKA__INSTANCE_ID") == {"fieldRef": {"fieldPath": "metadata.name"}},
              "CLIPQC__KAFKA__INSTANCE_ID from the pod name")
        check(pod["terminationGracePeriodSeconds"] == 61 + 15, f"grace {pod['terminationGracePeriodSeconds']} = ceil(60.5) + 15")
        check(d["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != default_checksum,
              "checksum/config changes with the config")
        check("nvidia.com/gpu" not in (c["resources"].get("limits") or {}), "no GPU requested with gpu.enabled=false")
        cfg = yaml.safe_load(one(objs, "ConfigMap")["data"]["clipqc.yaml"])
        check(cfg["model"]["device"] == "cpu" and cfg["pipeline"]["drain_timeout_ms"] == 60500, "config carries the overrides")
    print("== Kafka SASL/TLS with the password from a mounted Secret")
    values = {
        "config": {"kafka": {
            "properties": {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                           "sasl.username": "clipqc", "ssl.ca.location": "/var/run/secrets/kafka/ca.pem"},
            "property_files": {"sasl.password": "/var/run/secrets/kafka/password"}}},
        "extraVolumes": [{"name": "kafka-secret", "secret": {"secretName": "clipqc-kafka"}}],
        "extraVolumeMounts": [{"name": "kafka-secret", "mountPath": "/var/run/secrets/kafka", "readOnly": True}],
    }
    objs, err = r.render(values)
    if check(err is None, "renders" + (f": {err}" if err else "")):
        pod = one(objs, "Deployment")["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in pod["volumes"]}
        check(vols.get("kafka-secret", {}).get("secret", {}).get("secretName") == "clipqc-kafka", "the Secret as a volume")
        mounts = {m["name"]: m for m in container(one(objs, "Deployment"))["volumeMounts"]}
        check(mounts.get("kafka-secret", {}).get("mountPath") == "/var/run/secrets/kafka", "mounted at /var/run/secrets/kafka")
        cfg = yaml.safe_load(one(objs, "ConfigMap")["data"]["clipqc.yaml"])
        check(cfg["kafka"]["property_files"] == {"sasl.password": "/var/run/secrets/kafka/password"}
              and "sasl.password" not in cfg["kafka"]["properties"], "config names the file, not the password")
        errors = [e.message for e in jsonschema.Draft202012Validator(worker_schema).iter_errors(cfg)]
        check(not errors, "valid against the worker's config schema" + (f": {errors[:3]}" if errors else ""))
    objs, err = r.render({"terminationGracePeriodSeconds": 90})
    if check(err is None, "renders with terminationGracePeriodSeconds 90" + (f": {err}" if err else "")):
        check(one(objs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90, "explicit grace kept")


def check_refusals(r: Renderer):
    print("== refused")
    cases = [
        ("replicaCount: \"two\" (schema)", {"replicaCount": "two"}, ["replicaCount"]),
        ("unknown top-level key (schema)", {"replicas": 2}, ["replicas"]),
        ("typo in a worker config key (schema from the worker)", {"config": {"pipeline": {"drain_timout_ms": 1000}}},
         ["drain_timout_ms"]),
        ("bad model.device (schema from the worker)", {"config": {"model": {"device": "tpu"}}}, ["device"]),
        ("unknown key under gpu (schema)", {"gpu": {"count": 1, "type": "a100"}}, ["type"]),
        ("terminationGracePeriodSeconds 20 with a 20 s drain (template)", {"terminationGracePeriodSeconds": 20},
         ["terminationGracePeriodSeconds (20) must be greater"]),
        ("no model source (template)", {"model": {"pvc": {"claimName": ""}}}, ["model artifact needs a source"]),
        ("minReplicas above the partitions (template)",
         {"keda": {"enabled": True}, "autoscaling": {"minReplicas": 8, "partitions": 6}}, ["autoscaling.minReplicas (8)"]),
    ]
    for what, values, needles in cases:
        objs, err = r.render(values)
        ok = err is not None and all(n in err for n in needles)
        check(ok, f"{what}: {(err or 'RENDERED').splitlines()[0][:160]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-schema", action="store_true",
                    help="refresh values.schema.json's config part from schemas/clipqc-config.schema.json")
    args = ap.parse_args()
    if args.write_schema:
        schema = json.loads(VALUES_SCHEMA.read_text())
        VALUES_SCHEMA.write_text(json.dumps(schema_with_config(schema), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {VALUES_SCHEMA.relative_to(ROOT)}")
        return 0
    print(f"helm-sdkpy {helm.__version__} ({helm.get_version()})")
    check_rules_copy()
    check_schema_current()
    check_lint()
    r = Renderer(CHART)
    try:
        check_renders(r)
        check_refusals(r)
    finally:
        r.close()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
