"""Static checks of the compose stack (deploy/compose.yaml + deploy/compose.cpu.yaml) where no
Docker daemon is at hand, run by scripts/check-helm.sh: the YAML parses (compose's
!reset/!override tags included), every host path it mounts or builds from exists with the
right kind (file or directory), the worker config is valid against
schemas/clipqc-config.schema.json, the stop grace period covers the drain, and the hosts named
by the Prometheus, Alertmanager and Grafana configs are services of the stack. A broken mount
or a renamed service would otherwise only show when someone runs `docker compose up`.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CPU = DEPLOY / "compose.cpu.yaml"
# Host paths that are inputs of the person running the stack, not files of the repository.
USER_INPUTS = {ROOT / "models"}


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads compose's merge tags (!reset, !override) as
    {tag: value}, so an override file's intent can be checked."""


def _tagged(tag):
    def construct(loader, node):
        if isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return {tag: value}
    return construct


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged(_tag))


def interpolate(s: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with the defaults (env unset)."""
    def sub(m):
        inner = m.group(1)
        for sep in (":-", "-", ":?", "?"):
            if sep in inner:
                return inner.split(sep, 1)[1] if sep in (":-", "-") else ""
        return ""
    return re.sub(r"\$\{([^}]+)\}", sub, s).replace("$$", "$")


def seconds(duration: str) -> float:
    """A compose duration ("1m30s", "45s") in seconds."""
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    for n, u in re.findall(r"([0-9.]+)(ms|us|h|m|s)", duration):
        total += float(n) * units[u]
    return total


def host_of(url: str) -> str:
    return re.sub(r"^https?://", "", url).split("/")[0].split(":")[0]


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.load(COMPOSE.read_text(), Loader=ComposeLoader)


@pytest.fixture(scope="module")
def cpu() -> dict:
    return yaml.load(CPU.read_text(), Loader=ComposeLoader)


@pytest.fixture(scope="module")
def services(base) -> dict:
    return base.get("services", {})


@pytest.fixture(scope="module")
def worker(services) -> dict:
    return services.get("clipqc", {})


def volume_specs(services: dict):
    """(service, volume as written, source, target) for every volume of every service."""
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            spec = interpolate(vol if isinstance(vol, str) else f"{vol.get('source')}:{vol.get('target')}")
            src, dst = spec.split(":")[:2]
            yield name, vol, src, dst


@pytest.fixture(scope="module")
def worker_config(worker) -> tuple[str, dict]:
    """(host path, parsed TOML) of the worker config mounted at CLIPQC_CONFIG."""
    env = worker.get("environment", {})
    mount = next((interpolate(v).split(":")[0] for v in worker.get("volumes", [])
                  if interpolate(v).split(":")[1] == env.get("CLIPQC_CONFIG")), None)
    assert mount is not None, f"CLIPQC_CONFIG {env.get('CLIPQC_CONFIG')} is mounted"
    return mount, tomllib.loads((DEPLOY / mount).read_text())


def test_stack_services(services):
    assert {"kafka", "kafka-init", "clipqc", "prometheus", "alertmanager", "grafana"} <= set(services)


def test_build_contexts_have_dockerfiles(services):
    missing = []
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            ctx = (DEPLOY / interpolate(build.get("context", "."))).resolve()
            dockerfile = build.get("dockerfile", "Dockerfile")
            if not (ctx / dockerfile).is_file():
                missing.append(f"{name}: {ctx.relative_to(ROOT)} has no {dockerfile}")
    assert not missing


def test_named_volumes_declared(base, services):
    declared = set(base.get("volumes") or {})
    undeclared = [f"{name}: {src}" for name, _, src, _ in volume_specs(services)
                  if not src.startswith((".", "/")) and src not in declared]
    assert not undeclared


def test_bind_mounts_exist_with_right_kind(services):
    wrong = []
    for name, _, src, dst in volume_specs(services):
        if not src.startswith((".", "/")):
            continue
        host = (DEPLOY / src).resolve()
        if host in USER_INPUTS:
            continue  # the user's exported models
        want_dir = src.endswith("/") or dst.endswith("/") or not Path(dst).suffix
        if not (host.is_dir() if want_dir else host.is_file()):
            rel = host.relative_to(ROOT) if host.is_relative_to(ROOT) else host
            wrong.append(f"{name}: {rel} -> {dst} is not a {'directory' if want_dir else 'file'}")
    assert not wrong


def test_repository_paths_mounted_read_only(services):
    writable = []
    for name, vol, src, _ in volume_specs(services):
        if not src.startswith((".", "/")):
            continue
        host = (DEPLOY / src).resolve()
        if host not in USER_INPUTS and isinstance(vol, str) and not vol.endswith(":ro") and host.is_relative_to(ROOT):
            writable.append(f"{name}: {host.relative_to(ROOT)}")
    assert not writable


def test_worker_logs_json_on_cuda_with_a_gpu(worker):
    env = worker.get("environment", {})
    assert env.get("CLIPQC_LOG_FORMAT") == "json"
    assert env.get("CLIPQC__MODEL__DEVICE") == "cuda", "worker on CUDA by default"
    devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), \
        "worker reserves an NVIDIA GPU"


def test_cpu_override_drops_gpu(cpu, services):
    cpu_worker = cpu.get("services", {}).get("clipqc", {})
    assert "!reset" in (cpu_worker.get("deploy") or {}), "compose.cpu.yaml drops the GPU reservation (!reset)"
    assert cpu_worker.get("environment", {}).get("CLIPQC__MODEL__DEVICE") == "cpu"
    assert set(cpu.get("services", {})) <= set(services), "compose.cpu.yaml overrides existing services only"


def test_worker_config_valid_against_schema(worker_config):
    _, cfg = worker_config
    schema = json.loads((ROOT / "schemas" / "clipqc-config.schema.json").read_text())
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(cfg)]
    assert not errors


def test_stop_grace_period_covers_drain(worker, worker_config):
    _, cfg = worker_config
    drain = cfg.get("pipeline", {}).get("drain_timeout_ms", 20000) / 1000
    grace = seconds(worker.get("stop_grace_period", "10s"))
    assert grace > drain, f"stop_grace_period {grace:g} s > drain_timeout {drain:g} s"


def test_kafka_init_creates_the_topics(services, worker_config):
    _, cfg = worker_config
    topics = set(cfg["kafka"]["input_topics"]) | {cfg["kafka"]["verdict_topic"], cfg["kafka"]["dlq_topic"]}
    init_cmd = " ".join(services.get("kafka-init", {}).get("command", []))
    assert all(t in init_cmd for t in topics), f"kafka-init creates {sorted(topics)}"


def test_kafka_brokers_host_is_a_service(services, worker_config):
    _, cfg = worker_config
    assert cfg["kafka"]["brokers"].split(",")[0].split(":")[0] in services


def test_prometheus_targets_are_services(services):
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for sc in prom.get("scrape_configs", []) for st in sc.get("static_configs", [])
               for t in st.get("targets", [])]
    targets += [t for am in prom.get("alerting", {}).get("alertmanagers", [])
                for st in am.get("static_configs", []) for t in st.get("targets", [])]
    assert [t for t in targets if t.split(":")[0] not in set(services) | {"localhost"}] == []
    assert any(t.startswith("clipqc:") for t in targets), "Prometheus scrapes the worker"


def test_alertmanager_receivers_are_services(services):
    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    hosts = {f"{r['name']} -> {host_of(w['url'])}": host_of(w["url"])
             for r in am.get("receivers", []) for w in r.get("webhook_configs", [])}
    assert [what for what, host in hosts.items() if host not in services] == []


def test_grafana_datasources_and_home_dashboard(services):
    for f in (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.y*ml"):
        for ds in yaml.safe_load(f.read_text()).get("datasources", []):
            assert host_of(ds.get("url", "")) in services, f"grafana datasource {ds.get('name')} is a service"
    home = services.get("grafana", {}).get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file(), f"Grafana home dashboard {home}"
