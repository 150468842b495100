"""Static checks of the compose stack (deploy/compose.yaml + deploy/compose.cpu.yaml) where no
Docker daemon is at hand: the YAML parses (compose's !reset/!override tags included), every
host path it mounts or builds from exists with the right kind (file or directory), the worker
config is valid against schemas/clipqc-config.schema.json, the stop grace period covers the
drain, and the hosts named by the Prometheus, Alertmanager and Grafana configs are services of
the stack. Run by scripts/check-helm.sh (needs PyYAML, jsonschema, Python >= 3.11).
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

from checks import check, summary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CPU = DEPLOY / "compose.cpu.yaml"
# Host paths that are inputs of the person running the stack, not files of the repository.
USER_INPUTS = {ROOT / "models"}



class ComposeLoader(yaml.SafeLoader):
    pass


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
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    for n, u in re.findall(r"([0-9.]+)(ms|us|h|m|s)", duration):
        total += float(n) * units[u]
    return total


def main() -> int:
    print("== compose")
    base = yaml.load(COMPOSE.read_text(), Loader=ComposeLoader)
    cpu = yaml.load(CPU.read_text(), Loader=ComposeLoader)
    services = base.get("services", {})
    check({"kafka", "kafka-init", "clipqc", "prometheus", "alertmanager", "grafana"} <= set(services),
          f"services: {', '.join(services)}")
    named_volumes = set(base.get("volumes") or {})

    for name, svc in services.items():
        build = svc.get("build")
        if build:
            ctx = (DEPLOY / interpolate(build.get("context", "."))).resolve()
            check((ctx / build.get("dockerfile", "Dockerfile")).is_file(),
                  f"{name}: build context {ctx.relative_to(ROOT)} has {build.get('dockerfile', 'Dockerfile')}")
        for vol in svc.get("volumes", []):
            spec = interpolate(vol if isinstance(vol, str) else f"{vol.get('source')}:{vol.get('target')}")
            src, dst = spec.split(":")[:2]
            if not (src.startswith(".") or src.startswith("/")):
                check(src in named_volumes, f"{name}: named volume {src} declared")
                continue
            host = (DEPLOY / src).resolve()
            rel = host.relative_to(ROOT) if host.is_relative_to(ROOT) else host
            if host in USER_INPUTS:
                print(f"  note {name}: {rel} -> {dst} is the user's (exported models), not checked")
                continue
            want_dir = src.endswith("/") or dst.endswith("/") or not Path(dst).suffix
            ok = host.is_dir() if want_dir else host.is_file()
            check(ok, f"{name}: {rel} -> {dst} exists ({'directory' if want_dir else 'file'})")
            if isinstance(vol, str) and not vol.endswith(":ro") and host.is_relative_to(ROOT):
                check(False, f"{name}: repository path {rel} mounted read-only")

    worker = services.get("clipqc", {})
    env = worker.get("environment", {})
    check(env.get("CLIPQC_LOG_FORMAT") == "json", "worker logs JSON (CLIPQC_LOG_FORMAT)")
    check(env.get("CLIPQC__MODEL__DEVICE") == "cuda", "worker on CUDA by default")
    devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    check(any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices),
          "worker reserves an NVIDIA GPU")
    cpu_worker = cpu.get("services", {}).get("clipqc", {})
    check("!reset" in (cpu_worker.get("deploy") or {}) and cpu_worker.get("environment", {}).get("CLIPQC__MODEL__DEVICE") == "cpu",
          "compose.cpu.yaml drops the GPU reservation (!reset) and sets CLIPQC__MODEL__DEVICE=cpu")
    check(set(cpu.get("services", {})) <= set(services), "compose.cpu.yaml overrides existing services only")

    # The worker config mounted at CLIPQC_CONFIG.
    cfg_mount = next((interpolate(v).split(":")[0] for v in worker.get("volumes", [])
                      if interpolate(v).split(":")[1] == env.get("CLIPQC_CONFIG")), None)
    if check(cfg_mount is not None, f"CLIPQC_CONFIG {env.get('CLIPQC_CONFIG')} is mounted"):
        cfg = tomllib.loads((DEPLOY / cfg_mount).read_text())
        schema = json.loads((ROOT / "schemas" / "clipqc-config.schema.json").read_text())
        errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(cfg)]
        check(not errors, f"{cfg_mount} valid against schemas/clipqc-config.schema.json" + (f": {errors[:3]}" if errors else ""))
        drain = cfg.get("pipeline", {}).get("drain_timeout_ms", 20000) / 1000
        grace = seconds(worker.get("stop_grace_period", "10s"))
        check(grace > drain, f"stop_grace_period {grace:g} s > drain_timeout {drain:g} s")
        topics = set(cfg["kafka"]["input_topics"]) | {cfg["kafka"]["verdict_topic"], cfg["kafka"]["dlq_topic"]}
        init_cmd = " ".join(services.get("kafka-init", {}).get("command", []))
        check(all(t in init_cmd for t in topics), f"kafka-init creates {sorted(topics)}")
        broker_host = cfg["kafka"]["brokers"].split(",")[0].split(":")[0]
        check(broker_host in services, f"kafka.brokers host {broker_host} is a service")

    # Hosts named by the monitoring configs are services of the stack.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for sc in prom.get("scrape_configs", []) for st in sc.get("static_configs", []) for t in st.get("targets", [])]
    targets += [t for am in prom.get("alerting", {}).get("alertmanagers", []) for st in am.get("static_configs", []) for t in st.get("targets", [])]
    for t in targets:
        host = t.split(":")[0]
        check(host == "localhost" or host in services, f"prometheus.yml target {t} is a service")
    check(any(t.startswith("clipqc:") for t in targets), "Prometheus scrapes the worker")
    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    for r in am.get("receivers", []):
        for w in r.get("webhook_configs", []):
            host = re.sub(r"^https?://", "", w["url"]).split("/")[0].split(":")[0]
            check(host in services, f"alertmanager receiver {r['name']} -> {host} is a service")
    for f in (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.y*ml"):
        for ds in yaml.safe_load(f.read_text()).get("datasources", []):
            host = re.sub(r"^https?://", "", ds.get("url", "")).split("/")[0].split(":")[0]
            check(host in services, f"grafana datasource {ds.get('name')} -> {host} is a service")
    home = services.get("grafana", {}).get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        check((DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file(), f"Grafana home dashboard {home} exists")

    return summary()


if __name__ == "__main__":
    sys.exit(main())
