"""Checks of the Helm chart helm/clipqc with Helm's own engine (scripts/helm_render.py: `helm lint`
and `helm template` through helm-python-sdk, no cluster), run by scripts/check-helm.sh.

The chart is only ever installed on clusters we do not have here, so what must hold is pinned
on its renders: the rules it ships are deploy/'s, its values schema carries the worker's config
schema, and each value set renders what the worker needs (GPU limit, config checksum, grace
period above the drain, KEDA capped at the partitions, HPA only without KEDA, a rendered worker
config the worker accepts...) while invalid or inconsistent values are refused before anything
is applied.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml

from helm_check import CHART, ROOT, VALUES_SCHEMA, WORKER_SCHEMA, schema_with_config
from helm_render import RenderError, Renderer, lint

RULES = ROOT / "deploy" / "prometheus" / "rules" / "clipqc.rules.yml"
RULES_COPY = CHART / "files" / "clipqc.rules.yml"


# ------------------------------------------------------------------------------ helpers


def find(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = find(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}: {[o.get('kind') for o in objs]}"
    return found[0]


def deployment(objs: list[dict]) -> dict:
    return one(objs, "Deployment")


def pod_spec(objs: list[dict]) -> dict:
    return deployment(objs)["spec"]["template"]["spec"]


def worker_container(objs: list[dict]) -> dict:
    return next(c for c in pod_spec(objs)["containers"] if c["name"] == "clipqc")


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def mounts_of(container: dict) -> dict:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def volumes_of(objs: list[dict]) -> dict:
    return {v["name"]: v for v in pod_spec(objs)["volumes"]}


def worker_config(objs: list[dict]) -> dict:
    return yaml.safe_load(one(objs, "ConfigMap")["data"]["clipqc.yaml"])


def worker_config_errors(config: dict) -> list[str]:
    schema = json.loads(WORKER_SCHEMA.read_text())
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(config)]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def renderer():
    r = Renderer(CHART)
    yield r
    r.close()


@pytest.fixture(scope="module")
def default(renderer):
    return renderer.render({})


@pytest.fixture(scope="module")
def keda(renderer):
    return renderer.render({"keda": {"enabled": True},
                            "autoscaling": {"enabled": True, "maxReplicas": 20, "partitions": 6}})


@pytest.fixture(scope="module")
def hpa(renderer):
    return renderer.render({"autoscaling": {"enabled": True, "maxReplicas": 4, "partitions": 6,
                                            "targetCPUUtilizationPercentage": 70}})


@pytest.fixture(scope="module")
def monitoring(renderer):
    return renderer.render({"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}})


@pytest.fixture(scope="module")
def init_model(renderer):
    """Model from an init container, static membership, a longer drain, no GPU."""
    return renderer.render({
        "model": {"pvc": {"claimName": ""},
                  "init": {"image": "busybox:1.36", "command": ["sh", "-c", "cp -a /artifact/. \"$MODEL_DIR\"/"]}},
        "staticMembership": {"enabled": True},
        "config": {"pipeline": {"drain_timeout_ms": 60500}, "model": {"device": "cpu"}},
        "gpu": {"enabled": False},
    })


@pytest.fixture(scope="module")
def kafka_secret(renderer):
    """Kafka SASL/TLS with the password from a mounted Secret."""
    return renderer.render({
        "config": {"kafka": {
            "properties": {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                           "sasl.username": "clipqc", "ssl.ca.location": "/var/run/secrets/kafka/ca.pem"},
            "property_files": {"sasl.password": "/var/run/secrets/kafka/password"}}},
        "extraVolumes": [{"name": "kafka-secret", "secret": {"secretName": "clipqc-kafka"}}],
        "extraVolumeMounts": [{"name": "kafka-secret", "mountPath": "/var/run/secrets/kafka", "readOnly": True}],
    })


# ------------------------------------------------------------- rules copy and values schema


def test_rules_copy_equals_deploy_rules():
    assert RULES.exists(), f"{RULES.relative_to(ROOT)} exists"
    assert RULES_COPY.exists() and RULES_COPY.read_bytes() == RULES.read_bytes(), \
        f"fix: cp {RULES.relative_to(ROOT)} {RULES_COPY.relative_to(ROOT)}"


def test_values_schema_is_draft07_and_refuses_unknown_keys():
    schema = json.loads(VALUES_SCHEMA.read_text())
    assert schema.get("$schema") == "http://json-schema.org/draft-07/schema#"
    assert schema.get("additionalProperties") is False, "unknown top-level keys refused"
    jsonschema.Draft7Validator.check_schema(schema)


def test_values_schema_config_matches_worker_schema():
    schema = json.loads(VALUES_SCHEMA.read_text())
    assert schema == schema_with_config(schema), \
        "its `config` part is not schemas/clipqc-config.schema.json's (fix: scripts/check-helm.sh --write-schema)"


def test_values_yaml_valid_against_schema():
    schema = json.loads(VALUES_SCHEMA.read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(defaults)]
    assert not errors


# ------------------------------------------------------------------------------ helm lint


def test_lint_passes():
    assert lint(CHART) == [], "helm lint: no warning or error"


def test_lint_fails_for_invalid_values_yaml(tmp_path):
    broken = tmp_path / "clipqc"
    shutil.copytree(CHART, broken)
    values = yaml.safe_load((broken / "values.yaml").read_text())
    values["replicaCount"] = "two"
    values["replicas"] = 2
    (broken / "values.yaml").write_text(yaml.safe_dump(values))
    problems = lint(broken)
    assert any(m.get("path") == "values.yaml" for m in problems), \
        f"lint fails for values.yaml with replicaCount: \"two\" and an unknown key: {problems}"


# ------------------------------------------------------------------------- default values


def test_default_objects(default):
    assert sorted(o["kind"] for o in default) == \
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]


def test_default_gpu_limit(default):
    assert worker_container(default)["resources"]["limits"].get("nvidia.com/gpu") in (1, "1")


def test_default_config_checksum_annotation(default):
    annotations = deployment(default)["spec"]["template"]["metadata"].get("annotations", {})
    assert len(annotations.get("checksum/config", "")) == 64, "checksum/config annotation (sha256)"


def test_default_grace_period_covers_drain(default):
    assert pod_spec(default).get("terminationGracePeriodSeconds") == 35, "drain 20 s + 15 s margin"


def test_default_single_replica_without_autoscaler(default):
    assert deployment(default)["spec"].get("replicas") == 1


def test_default_environment(default):
    env = env_of(worker_container(default))
    assert env.get("CLIPQC_CONFIG") == "/etc/clipqc/clipqc.yaml"
    assert env.get("CLIPQC_LOG_FORMAT") == "json"
    assert "CLIPQC__KAFKA__INSTANCE_ID" not in env, "no static membership by default"


def test_default_probes(default):
    c = worker_container(default)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sp = c["startupProbe"]
    assert sp["failureThreshold"] * sp["periodSeconds"] >= 300, "startup allows >= 5 min for model load + warm-up"


def test_default_security_context(default):
    pod = pod_spec(default)
    assert pod["securityContext"].get("runAsNonRoot") is True and pod["securityContext"].get("runAsUser") == 10001
    assert worker_container(default)["securityContext"].get("allowPrivilegeEscalation") is False


def test_default_model_from_pvc_read_only(default):
    assert volumes_of(default)["model"].get("persistentVolumeClaim", {}).get("readOnly") is True
    mount = mounts_of(worker_container(default))["model"]
    assert mount["mountPath"] == "/models/current" and mount.get("readOnly") is True
    assert "initContainers" not in pod_spec(default), "no init container with a PVC"


def test_default_worker_config(default):
    cfg = worker_config(default)
    assert cfg["model"]["dir"] == "/models/current", "model.dir = the mount"
    assert cfg["http"]["listen"] == "0.0.0.0:9400", "http.listen on the container port"
    assert not worker_config_errors(cfg), "rendered clipqc.yaml valid against schemas/clipqc-config.schema.json"


def test_default_service_and_pdb(default):
    svc = one(default, "Service")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("http-metrics", 9400)]
    assert one(default, "PodDisruptionBudget")["spec"].get("maxUnavailable") == 1


# ---------------------------------------------------------------------------- autoscaling


def test_keda_max_replicas_capped_at_partitions(keda, renderer):
    assert one(keda, "ScaledObject")["spec"]["maxReplicaCount"] == 6, "min(maxReplicas 20, 6 partitions)"
    capped = renderer.render({"keda": {"enabled": True}, "autoscaling": {"maxReplicas": 3, "partitions": 12}})
    assert one(capped, "ScaledObject")["spec"]["maxReplicaCount"] == 3, "min(maxReplicas 3, 12 partitions)"


def test_keda_kafka_trigger(keda):
    trigger = one(keda, "ScaledObject")["spec"]["triggers"][0]
    md = trigger["metadata"]
    assert trigger["type"] == "kafka" and md.get("allowIdleConsumers") == "false"
    assert (md.get("consumerGroup"), md.get("topic"), md.get("bootstrapServers")) == \
        ("clipqc", "clipqc.requests", "kafka:9092"), "group, topic and brokers from the config"


def test_keda_leaves_replicas_to_the_autoscaler(keda):
    assert not find(keda, "HorizontalPodAutoscaler"), "no HPA of the chart's own with KEDA on"
    assert "replicas" not in deployment(keda)["spec"]


def test_hpa_without_keda(hpa, renderer):
    h = one(hpa, "HorizontalPodAutoscaler")
    assert h["apiVersion"] == "autoscaling/v2" and h["spec"]["maxReplicas"] == 4
    assert sorted(m["type"] for m in h["spec"]["metrics"]) == ["Pods", "Resource"], "lag (Pods) and CPU (Resource)"
    assert not find(hpa, "ScaledObject")
    capped = renderer.render({"autoscaling": {"enabled": True, "maxReplicas": 10, "partitions": 6}})
    assert one(capped, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 6, "min(maxReplicas 10, 6 partitions)"


# ----------------------------------------------------------- ServiceMonitor, PrometheusRule


def test_service_monitor_scrapes_as_job_clipqc(monitoring):
    endpoint = one(monitoring, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["port"] == "http-metrics" and endpoint["path"] == "/metrics"
    assert any(r.get("targetLabel") == "job" and r.get("replacement") == "clipqc"
               for r in endpoint.get("relabelings", [])), "scraped as job=\"clipqc\" (what the rules select)"


def test_prometheus_rule_is_deploy_rules(monitoring):
    groups = one(monitoring, "PrometheusRule")["spec"]["groups"]
    assert groups == yaml.safe_load(RULES.read_text())["groups"]
    assert [r["alert"] for g in groups for r in g["rules"] if "alert" in r], "it has alerts"


# ---------------------------------------- init container, static membership, drain, no GPU


def test_init_container_fetches_model_into_emptydir(init_model):
    init = pod_spec(init_model).get("initContainers", [])
    assert len(init) == 1 and init[0]["image"] == "busybox:1.36"
    assert not mounts_of(init[0])["model"].get("readOnly"), "the init container writes the model volume"
    assert "emptyDir" in volumes_of(init_model)["model"]
    assert mounts_of(worker_container(init_model))["model"].get("readOnly") is True, "the worker reads it"


def test_static_membership_from_pod_name(init_model):
    assert env_of(worker_container(init_model)).get("CLIPQC__KAFKA__INSTANCE_ID") == \
        {"fieldRef": {"fieldPath": "metadata.name"}}


def test_grace_period_follows_drain(init_model, renderer):
    assert pod_spec(init_model)["terminationGracePeriodSeconds"] == 61 + 15, "ceil(60.5 s) + 15 s"
    explicit = renderer.render({"terminationGracePeriodSeconds": 90})
    assert pod_spec(explicit)["terminationGracePeriodSeconds"] == 90, "an explicit grace is kept"


def test_config_checksum_changes_with_config(init_model, default):
    def checksum(objs):
        return deployment(objs)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum(init_model) != checksum(default)


def test_no_gpu_requested_when_disabled(init_model):
    assert "nvidia.com/gpu" not in (worker_container(init_model)["resources"].get("limits") or {})


def test_config_carries_overrides(init_model):
    cfg = worker_config(init_model)
    assert cfg["model"]["device"] == "cpu" and cfg["pipeline"]["drain_timeout_ms"] == 60500


# -------------------------------------------------------- Kafka password from a Secret


def test_kafka_secret_mounted(kafka_secret):
    assert volumes_of(kafka_secret).get("kafka-secret", {}).get("secret", {}).get("secretName") == "clipqc-kafka"
    assert mounts_of(worker_container(kafka_secret)).get("kafka-secret", {}).get("mountPath") == \
        "/var/run/secrets/kafka"


def test_kafka_config_names_password_file(kafka_secret):
    cfg = worker_config(kafka_secret)
    assert cfg["kafka"]["property_files"] == {"sasl.password": "/var/run/secrets/kafka/password"}
    assert "sasl.password" not in cfg["kafka"]["properties"], "the config names the file, not the password"
    assert not worker_config_errors(cfg)


# ------------------------------------------------------------------------------- refused


REFUSED = [
    ("replicaCount-string", "schema", {"replicaCount": "two"}, ["replicaCount"]),
    ("unknown-top-level-key", "schema", {"replicas": 2}, ["replicas"]),
    ("worker-config-key-typo", "schema from the worker",
     {"config": {"pipeline": {"drain_timout_ms": 1000}}}, ["drain_timout_ms"]),
    ("bad-model-device", "schema from the worker", {"config": {"model": {"device": "tpu"}}}, ["device"]),
    ("unknown-key-under-gpu", "schema", {"gpu": {"count": 1, "type": "a100"}}, ["type"]),
    ("grace-not-above-drain", "template", {"terminationGracePeriodSeconds": 20},
     ["terminationGracePeriodSeconds (20) must be greater"]),
    ("no-model-source", "template", {"model": {"pvc": {"claimName": ""}}}, ["model artifact needs a source"]),
    ("min-replicas-above-partitions", "template",
     {"keda": {"enabled": True}, "autoscaling": {"minReplicas": 8, "partitions": 6}}, ["autoscaling.minReplicas (8)"]),
]


@pytest.mark.parametrize("by, values, needles", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_refused(renderer, by, values, needles):
    """Refused by the values schema or by the templates' own `fail`, with a message that names
    the culprit."""
    with pytest.raises(RenderError) as refused:
        renderer.render(copy.deepcopy(values))
    message = str(refused.value)
    assert all(n in message for n in needles), f"refused ({by}), but the message lacks {needles}: {message}"
