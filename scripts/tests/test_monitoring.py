"""Checks of the Grafana dashboards and the Prometheus rules under deploy/ that promtool and
amtool cannot make (scripts/check-monitoring.sh runs those first): the dashboards are valid,
keep their fixed uid and query through the `${datasource}` variable, whose default is the
provisioned data source; and every series the dashboards and the rules query is one the
worker defines, so a renamed metric cannot leave a panel or an alert silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dashboard_metrics import QueryError, dashboard_metric_uses, rules_metric_uses, walk_panels

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
WORKER_SRC = ROOT / "worker" / "src"
# Links, bookmarks and the alert runbooks name dashboards by uid: a uid must not change.
DASHBOARD_UIDS = {"clipqc.json": "clipqc-overview"}
DATASOURCE = "${datasource}"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def variables(dash: dict) -> list[dict]:
    return (dash.get("templating") or {}).get("list") or []


def graph_panels(dash: dict) -> list[dict]:
    """The panels that query (rows only group them)."""
    return [p for p in walk_panels(dash.get("panels")) if p.get("type") != "row"]


def on_datasource_variable(obj: dict) -> bool:
    d = obj.get("datasource")
    return isinstance(d, dict) and d.get("uid") == DATASOURCE and d.get("type") == "prometheus"


dashboards = pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)


def test_there_are_dashboards_and_rules():
    assert DASHBOARDS and RULES


@dashboards
def test_dashboard_is_valid_json(path):
    try:
        load_dashboard(path)
    except ValueError as e:
        pytest.fail(f"{path.name}: not valid JSON: {e}")


@dashboards
def test_dashboard_uid_is_fixed(path):
    assert path.name in DASHBOARD_UIDS, "a new dashboard: give it a fixed uid in DASHBOARD_UIDS"
    assert load_dashboard(path).get("uid") == DASHBOARD_UIDS[path.name]


@dashboards
def test_dashboard_has_datasource_line_and_profile_variables(path):
    by_name = {v.get("name"): v for v in variables(load_dashboard(path))}
    ds = by_name.get("datasource", {})
    assert ds.get("type") == "datasource" and ds.get("query") == "prometheus", \
        "a template variable 'datasource' of type datasource (query prometheus)"
    assert {"line", "profile"} <= set(by_name)


@dashboards
def test_every_query_goes_through_the_datasource_variable(path):
    dash = load_dashboard(path)
    wrong = [f"variable {v.get('name')}: {v.get('datasource')!r}"
             for v in variables(dash) if v.get("type") == "query" and not on_datasource_variable(v)]
    for p in graph_panels(dash):
        if not on_datasource_variable(p):
            wrong.append(f"panel {p.get('title')!r}: {p.get('datasource')!r}")
        wrong += [f"panel {p.get('title')!r} target {t.get('refId')}: {t.get('datasource')!r}"
                  for t in p.get("targets") or [] if not on_datasource_variable(t)]
    assert not wrong, f"data source not {DATASOURCE}: {wrong}"


@dashboards
def test_panel_ids_are_unique(path):
    ids = [p.get("id") for p in walk_panels(load_dashboard(path).get("panels"))]
    assert ids, "no panels"
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}"


@dashboards
def test_every_panel_has_targets_with_an_expression(path):
    empty = []
    for p in graph_panels(load_dashboard(path)):
        targets = p.get("targets") or []
        if not targets:
            empty.append(f"panel {p.get('title')!r}: no targets")
        empty += [f"panel {p.get('title')!r} target {t.get('refId')}: no expr"
                  for t in targets if not t.get("expr")]
    assert not empty


def test_provisioned_datasource_is_the_dashboard_default():
    dash = load_dashboard(ROOT / "deploy" / "grafana" / "dashboards" / "clipqc.json")
    var = next(v for v in variables(dash) if v.get("name") == "datasource")
    default = (var.get("current") or {}).get("value")
    uids = [d.get("uid") for d in yaml.safe_load(DATASOURCES.read_text()).get("datasources") or []]
    assert default in uids, f"dashboard default {default!r}, provisioned uids {uids!r}"


def queried_series() -> set[tuple[str, str]]:
    """(name, where) for every series the dashboards and the rules query (parsing them all)."""
    uses, error = set(), None
    try:
        for path in DASHBOARDS:
            uses |= {(name, f"{path.name}: {where}") for name, where in dashboard_metric_uses(str(path))}
        for path in RULES:
            uses |= {(name, f"{path.name}: {where}") for name, where in rules_metric_uses(str(path))}
    except QueryError as e:
        error = f"{path.name}: {e}"
    if error:
        pytest.fail(error, pytrace=False)
    return uses


def test_queries_parse_and_select_series():
    assert len({name for name, _ in queried_series()}) > 10, "the extractor found the queries"


def test_queried_series_are_defined_by_the_worker():
    """A histogram's series count by its base name; the worker names every metric as a string
    literal ("clipqc_...") in worker/src."""
    sources = "\n".join(p.read_text(encoding="utf-8", errors="replace")
                         for p in WORKER_SRC.rglob("*") if p.is_file())
    missing = []
    for name, where in sorted(queried_series()):
        base = re.sub("(%s)$" % "|".join(HISTOGRAM_SUFFIXES), "", name)
        if f'"{base}"' not in sources:
            missing.append(f'{name} ({where}): no "{base}" in worker/src')
    if missing:
        pytest.fail("\n".join(missing), pytrace=False)
