#!/usr/bin/env python3
"""The metric names a Grafana dashboard or a Prometheus rules file queries (python3 stdlib only).

    dashboard_metrics.py DASHBOARD.json            sorted unique series names, one a line
    dashboard_metrics.py --rules RULES.yml         the same for the rules' expressions
    dashboard_metrics.py --check DASHBOARD.json    also validates the dashboard (exit 1 if not)

Names are printed exactly as queried (clipqc_capture_to_verdict_seconds_bucket, not the
histogram's base name), so they can be compared with the names a live /metrics exposes.
Left out: PromQL functions and keywords, label names, `up` (Prometheus' own series) and, for a
rules file, the series its recording rules define.

The PromQL "parser" is lexical: strings, label matchers {...}, ranges [...], grouping label
lists (by/without/on/ignoring/group_left/group_right (...)) and Grafana variables are cut out,
then every identifier not followed by "(" is a metric name. It covers the queries these files
use; it is not a full PromQL grammar.
"""

import argparse
import json
import re
import sys

DASHBOARD_UID = "clipqc-overview"
DATASOURCE = "${datasource}"

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and",
    "or", "unless", "inf", "nan", "atan2", "start", "end",
}
NOT_WORKER = {"up"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(\s*\()?")
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_LABEL_VALUES = re.compile(r"\blabel_values\s*\(\s*(.*?)\s*,\s*[A-Za-z_]\w*\s*\)\s*$", re.S)
_LABEL_VALUES_BARE = re.compile(r"\blabel_values\s*\(\s*[A-Za-z_]\w*\s*\)")


def _strip_brackets(expr, open_ch, close_ch):
    out, depth = [], 0
    for ch in expr:
        if ch == open_ch:
            depth += 1
            out.append(" ")
        elif ch == close_ch and depth:
            depth -= 1
            out.append(" ")
        elif depth:
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def promql_metric_names(expr):
    """The metric names one PromQL expression selects (a set)."""
    e = _STRING.sub(" ", expr)  # strings (label values, label_replace arguments) first:
    e = re.sub(r"#[^\n]*", " ", e)  # a '#' inside a string would otherwise start a comment
    e = _GRAFANA_VAR.sub(" ", e)
    e = _strip_brackets(e, "{", "}")
    e = _strip_brackets(e, "[", "]")
    e = _GROUPING.sub(" ", e)
    names = set()
    for m in _IDENT.finditer(e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def grafana_query(q):
    """A template variable's query as PromQL: label_values(EXPR, label) -> EXPR."""
    if isinstance(q, dict):
        q = q.get("query", "")
    q = q or ""
    m = _LABEL_VALUES.search(q)
    if m:
        return m.group(1)
    q = _LABEL_VALUES_BARE.sub(" ", q)
    for fn in ("query_result", "metrics", "label_names"):
        q = re.sub(r"\b%s\s*\(" % fn, "(", q)
    return q


def walk_panels(panels):
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def dashboard_queries(dash):
    """(where, PromQL) for every panel target and every query template variable."""
    for p in walk_panels(dash.get("panels")):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield "panel %r target %s" % (p.get("title"), t.get("refId")), t["expr"]
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") == "query":
            yield "variable %s" % v.get("name"), grafana_query(v.get("query"))


def check_dashboard(dash):
    """Problems with the dashboard (a list of strings; empty when it is fine)."""
    errors = []
    if dash.get("uid") != DASHBOARD_UID:
        errors.append("uid is %r, not %r" % (dash.get("uid"), DASHBOARD_UID))
    variables = (dash.get("templating") or {}).get("list") or []
    ds = [v for v in variables if v.get("name") == "datasource"]
    if not ds or ds[0].get("type") != "datasource" or ds[0].get("query") != "prometheus":
        errors.append("no template variable 'datasource' of type datasource (query prometheus)")
    names = {v.get("name") for v in variables}
    for want in ("line", "profile"):
        if want not in names:
            errors.append("no template variable %r" % want)

    def uses_variable(obj, what):
        d = obj.get("datasource")
        if not isinstance(d, dict) or d.get("uid") != DATASOURCE or d.get("type") != "prometheus":
            errors.append("%s: datasource is %r, not the ${datasource} variable" % (what, d))

    for v in variables:
        if v.get("type") == "query":
            uses_variable(v, "variable %s" % v.get("name"))
    ids = set()
    panels = list(walk_panels(dash.get("panels")))
    if not panels:
        errors.append("no panels")
    for p in panels:
        what = "panel %r" % p.get("title")
        if p.get("id") in ids:
            errors.append("%s: duplicate id %r" % (what, p.get("id")))
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        uses_variable(p, what)
        targets = p.get("targets") or []
        if not targets:
            errors.append("%s: no targets" % what)
        for t in targets:
            uses_variable(t, "%s target %s" % (what, t.get("refId")))
            if not t.get("expr"):
                errors.append("%s target %s: no expr" % (what, t.get("refId")))
    return errors


def _load_yaml_rules(path):
    """[(where, expr)] and the recorded names, from a rules file (PyYAML if present)."""
    text = open(path, encoding="utf-8").read()
    try:
        import yaml  # noqa: WPS433 (optional)
    except ImportError:
        return _scan_yaml_rules(text)
    doc = yaml.safe_load(text) or {}
    exprs, recorded = [], set()
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            if rule.get("record"):
                recorded.add(rule["record"])
            exprs.append(("rule %s" % name, str(rule.get("expr", ""))))
    return exprs, recorded


def _scan_yaml_rules(text):
    """The same without PyYAML: `expr:` values, inline or as block scalars (| or >)."""
    exprs, recorded, current = [], set(), "?"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)(?:-\s+)?(alert|record|expr)\s*:\s*(.*?)\s*$", line)
        i += 1
        if not m:
            continue
        indent, key, value = len(m.group(1)), m.group(2), m.group(3)
        if key in ("alert", "record"):
            current = value.strip("'\"")
            if key == "record":
                recorded.add(current)
            continue
        if value[:1] in ("|", ">"):
            block = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i])
                i += 1
            value = "\n".join(block)
        elif value[:1] in ("'", '"'):
            q = value[0]
            value = value[1:-1] if value.endswith(q) else value[1:]
            if q == "'":
                value = value.replace("''", "'")
        exprs.append(("rule %s" % current, value))
    return exprs, recorded


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a Grafana dashboard JSON, or with --rules a rules YAML")
    ap.add_argument("--rules", action="store_true", help="FILE is a Prometheus rules file")
    ap.add_argument("--check", action="store_true",
                    help="validate the dashboard (uid, ${datasource} everywhere) first")
    ap.add_argument("--with-where", action="store_true",
                    help="print 'name<TAB>where' (every use) instead of the unique names")
    args = ap.parse_args(argv)

    if args.rules:
        queries, exclude = _load_yaml_rules(args.file)
    else:
        try:
            dash = json.load(open(args.file, encoding="utf-8"))
        except ValueError as e:
            print("%s: not valid JSON: %s" % (args.file, e), file=sys.stderr)
            return 1
        if args.check:
            errors = check_dashboard(dash)
            for e in errors:
                print("%s: %s" % (args.file, e), file=sys.stderr)
            if errors:
                return 1
            panels = [p for p in walk_panels(dash.get("panels")) if p.get("type") != "row"]
            print("%s: OK: uid %s, %d panels and %d targets on ${datasource}" % (
                args.file, dash["uid"], len(panels),
                sum(len(p.get("targets") or []) for p in panels)), file=sys.stderr)
        queries, exclude = list(dashboard_queries(dash)), set()

    uses = []
    for where, expr in queries:
        for name in promql_metric_names(expr):
            if name not in NOT_WORKER and name not in exclude:
                uses.append((name, where))
    if args.with_where:
        for name, where in sorted(set(uses)):
            print("%s\t%s" % (name, where))
    else:
        for name in sorted({n for n, _ in uses}):
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
