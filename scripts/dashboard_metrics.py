#!/usr/bin/env python3
"""The metric names a Grafana dashboard or a Prometheus rules file queries.

    dashboard_metrics.py DASHBOARD.json            sorted unique series names, one a line
    dashboard_metrics.py --rules RULES.yml         the same for the rules' expressions
    dashboard_metrics.py --with-where FILE         'name<TAB>where' for every use

Names are printed exactly as queried (clipqc_capture_to_verdict_seconds_bucket, not the
histogram's base name), so they can be compared with the names a live /metrics exposes
(tests/it/ops_stack.rs does) or with the names the worker's code defines
(scripts/tests/test_monitoring.py does). Left out: `up` (Prometheus' own series) and, for a
rules file, the series its recording rules define.

Expressions are parsed with promql-parser (the Python binding of GreptimeTeam's Rust PromQL
parser), so a name is what Prometheus would select: a vector selector's name or its
`__name__` matcher, never a function, keyword, label or string. Grafana's additions are
resolved first: a variable's query `label_values(EXPR, label)` is EXPR, and `$variables`
outside strings become something PromQL accepts in their place (see `substitute_variables`).
Needs promql-parser and PyYAML (scripts/checks-requirements.txt; tests/requirements.txt for
the Rust tests that run this script).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator

import promql_parser
import yaml

# Series that are not the worker's: Prometheus' own per-target health.
NOT_WORKER = {"up"}

# A Grafana variable: ${name}, ${name:format}, $name, or the deprecated [[name]].
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+(?::\w+)?\]\]")
# Where a variable stands for a label name (grouping lists): by/without/on/ignoring/group_*(...).
_GROUPING_OPEN = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*$")
_NAME_CHAR = re.compile(r"[A-Za-z0-9_:]")
# Grafana's variable-query functions (Prometheus data source): the wrapper of a variable query.
_VARIABLE_QUERY = re.compile(r"^\s*(label_values|query_result|metrics|label_names)\s*\((.*)\)\s*$", re.S)
_LABEL_NAME = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*$")

# What a variable becomes, by where it stands: a duration in a range or after `offset`, a
# label name in a grouping list, a number anywhere else (topk($n, ...), x > $threshold).
DURATION_PLACEHOLDER = "5m"
LABEL_PLACEHOLDER = "grafana_variable"
NUMBER_PLACEHOLDER = "1"


class QueryError(ValueError):
    """An expression that does not parse, or whose metric names cannot be known statically."""


def substitute_variables(expr: str) -> str:
    """`expr` with Grafana's variables replaced by placeholders PromQL accepts.

    Variables inside string literals stay as they are: there they are label values or regexes
    (`job=~"$job"`), which the parser takes as any other string. Outside strings a variable
    stands for a range duration (`[$__rate_interval]`), an offset, a grouping label or a
    number; it becomes a placeholder of that kind. A variable glued to a name
    (`clipqc_${kind}_total`) is refused: the metric it selects is not known until Grafana
    expands it, so the check could not vouch for it.
    """
    out: list[str] = []
    i, n = 0, len(expr)
    quote: str | None = None
    bracket_depth = 0
    while i < n:
        ch = expr[i]
        if quote:
            out.append(ch)
            if ch == "\\" and quote != "`" and i + 1 < n:
                out.append(expr[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
            i += 1
            continue
        if ch in "\"'`":
            quote = ch
            out.append(ch)
            i += 1
            continue
        m = _GRAFANA_VAR.match(expr, i)
        if m:
            before = expr[i - 1] if i else ""
            after = expr[m.end()] if m.end() < n else ""
            if _NAME_CHAR.match(before or " ") or _NAME_CHAR.match(after or " "):
                raise QueryError(f"variable {m.group()} is part of a name in {expr!r}")
            prefix = "".join(out).rstrip()
            if bracket_depth > 0 or re.search(r"\boffset$", prefix):
                out.append(DURATION_PLACEHOLDER)
            elif _GROUPING_OPEN.search(prefix):
                out.append(LABEL_PLACEHOLDER)
            else:
                out.append(NUMBER_PLACEHOLDER)
            i = m.end()
            continue
        if ch == "[":
            bracket_depth += 1
        elif ch == "]" and bracket_depth:
            bracket_depth -= 1
        elif ch == "#":  # a comment runs to the end of the line
            end = expr.find("\n", i)
            end = n if end < 0 else end
            out.append(expr[i:end])
            i = end
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _selector_names(selector: promql_parser.VectorSelector, expr: str) -> set[str]:
    """The metric names one vector selector selects: its name, or its `__name__` matcher.

    An equality matcher names one metric; a regex matcher that is a plain alternation of names
    (`__name__=~"a_total|b_total"`) names those. A selector whose names are open (any other
    regex, or no name at all, as in `{job="x"}`) is refused: nothing could be checked.
    """
    if selector.name:
        return {selector.name}
    names: set[str] = set()
    for matcher in selector.matchers.matchers:
        if matcher.name != "__name__":
            continue
        if matcher.op == promql_parser.MatchOp.Equal:
            names.add(matcher.value)
        elif matcher.op == promql_parser.MatchOp.Re and all(
                re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", alt) for alt in matcher.value.split("|")):
            names.update(matcher.value.split("|"))
    if not names:
        raise QueryError(f"selector {selector} in {expr!r} selects no one named metric")
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names one PromQL expression selects (Grafana variables allowed)."""
    text = substitute_variables(expr)
    try:
        tree = promql_parser.parse(text)
    except ValueError as e:
        shown = expr if text == expr else f"{expr!r} (as {text!r})"
        raise QueryError(f"not PromQL: {shown}: {e}") from e
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.update(_selector_names(node, expr))

    promql_parser.walk(tree, visit)
    return names


def grafana_variable_query(query) -> str | None:
    """A template variable's query as PromQL, or None when it queries no series.

    `label_values(EXPR, label)` and `query_result(EXPR)` are EXPR; `label_values(label)`,
    `label_names()` and `metrics(regex)` ask Prometheus for names, not series. Anything else
    is a PromQL expression as it stands.
    """
    if isinstance(query, dict):
        query = query.get("query", "")
    query = query or ""
    m = _VARIABLE_QUERY.match(query)
    if not m:
        return query or None
    function, args = m.group(1), m.group(2)
    if function == "query_result":
        return args
    if function == "label_values":
        expr, _, label = args.rpartition(",")
        return expr if expr and _LABEL_NAME.match(label) else None
    return None


def walk_panels(panels: Iterable[dict] | None) -> Iterator[dict]:
    """Every panel, those inside collapsed rows included."""
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def dashboard_queries(dash: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query template variable."""
    for p in walk_panels(dash.get("panels")):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") == "query":
            expr = grafana_variable_query(v.get("query"))
            if expr:
                yield f"variable {v.get('name')}", expr


def rules_queries(doc: dict) -> tuple[list[tuple[str, str]], set[str]]:
    """(where, PromQL) for every rule of a rules file, and the names its recording rules define."""
    queries, recorded = [], set()
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            if rule.get("record"):
                recorded.add(rule["record"])
            queries.append((f"rule {rule.get('alert') or rule.get('record')}", str(rule.get("expr", ""))))
    return queries, recorded


def metric_uses(queries: Iterable[tuple[str, str]], exclude: set[str] = frozenset()) -> set[tuple[str, str]]:
    """(name, where) for every metric the queries select, less `up` and `exclude`."""
    uses = set()
    for where, expr in queries:
        try:
            names = promql_metric_names(expr)
        except QueryError as e:
            raise QueryError(f"{where}: {e}") from None  # the message says it all
        uses.update((name, where) for name in names if name not in NOT_WORKER | set(exclude))
    return uses


def dashboard_metric_uses(path: str) -> set[tuple[str, str]]:
    """(name, where) for a Grafana dashboard JSON file."""
    with open(path, encoding="utf-8") as f:
        return metric_uses(dashboard_queries(json.load(f)))


def rules_metric_uses(path: str) -> set[tuple[str, str]]:
    """(name, where) for a Prometheus rules file, the series it records itself left out."""
    with open(path, encoding="utf-8") as f:
        queries, recorded = rules_queries(yaml.safe_load(f) or {})
    return metric_uses(queries, recorded)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a Grafana dashboard JSON, or with --rules a rules YAML")
    ap.add_argument("--rules", action="store_true", help="FILE is a Prometheus rules file")
    ap.add_argument("--with-where", action="store_true",
                    help="print 'name<TAB>where' (every use) instead of the unique names")
    args = ap.parse_args(argv)
    try:
        uses = rules_metric_uses(args.file) if args.rules else dashboard_metric_uses(args.file)
    except (QueryError, ValueError, OSError) as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    if args.with_where:
        for name, where in sorted(uses):
            print(f"{name}\t{where}")
    else:
        for name in sorted({name for name, _ in uses}):
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
