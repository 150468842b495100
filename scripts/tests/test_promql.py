"""Tests of the metric-name extraction itself (scripts/dashboard_metrics.py): the monitoring
checks are only as good as the names it finds, so what it must find and what it must refuse is
pinned here."""

import pytest

from dashboard_metrics import (
    DURATION_PLACEHOLDER,
    QueryError,
    grafana_variable_query,
    metric_uses,
    promql_metric_names,
    rules_queries,
    substitute_variables,
)


@pytest.mark.parametrize("expr, names", [
    ("clipqc_verdicts_total", {"clipqc_verdicts_total"}),
    # functions, aggregations, grouping labels, keywords and strings are not metrics
    ('histogram_quantile(0.99, sum by (le, stage) (rate(x_seconds_bucket{job="a"}[5m])))',
     {"x_seconds_bucket"}),
    ('sum without (instance) (a) / on (line) group_left (profile) b unless c offset 5m', {"a", "b", "c"}),
    ('label_replace(a, "dst", "$1", "src", "(.*)") and bool_total', {"a", "bool_total"}),
    ("max_over_time(rate(a_total[1m])[10m:1m]) > 0.5", {"a_total"}),
    ('count(a{b="sum(c)", d=~"e|f"})  # a comment naming g', {"a"}),
    # __name__ matchers
    ('{__name__="a_total", job="x"}', {"a_total"}),
    ('{__name__=~"a_total|b_total"}', {"a_total", "b_total"}),
    ('{__name__="a_total", __name__!="b_total"}', {"a_total"}),
])
def test_metric_names_from_promql(expr, names):
    assert promql_metric_names(expr) == names


@pytest.mark.parametrize("expr", [
    '{job="x"}',  # every series of a job: no one metric to check
    '{__name__=~"clipqc_.*"}',  # an open pattern
    "sum(rate(a[5m])",  # unbalanced
    "a +",  # incomplete
])
def test_unverifiable_or_invalid_queries_are_refused(expr):
    with pytest.raises(QueryError):
        promql_metric_names(expr)


@pytest.mark.parametrize("expr, substituted", [
    ('rate(a{job=~"$job", line="${line:regex}"}[$__rate_interval])',
     f'rate(a{{job=~"$job", line="${{line:regex}}"}}[{DURATION_PLACEHOLDER}])'),
    ("a offset $__interval", f"a offset {DURATION_PLACEHOLDER}"),
    ("sum by (line, $group) (a)", "sum by (line, grafana_variable) (a)"),
    ("topk($n, a) > $threshold", "topk(1, a) > 1"),
    ("rate(a[[[interval]]])", f"rate(a[{DURATION_PLACEHOLDER}])"),
    ("a # $not_a_variable", "a # $not_a_variable"),
])
def test_grafana_variables_become_parseable(expr, substituted):
    assert substitute_variables(expr) == substituted
    promql_metric_names(expr)


def test_variable_inside_a_metric_name_is_refused():
    with pytest.raises(QueryError, match="part of a name"):
        promql_metric_names("clipqc_${kind}_total")


@pytest.mark.parametrize("query, expr", [
    ('label_values(clipqc_build_info{job=~"$job"}, instance)', 'clipqc_build_info{job=~"$job"}'),
    ({"query": "label_values(a, job)", "refId": "x"}, "a"),
    ("query_result(topk(5, a))", "topk(5, a)"),
    ("label_values(job)", None),
    ("label_names()", None),
    ("metrics(clipqc_.*)", None),
    ("", None),
])
def test_grafana_variable_queries(query, expr):
    assert grafana_variable_query(query) == expr


def test_rules_leave_out_recorded_series_and_up():
    doc = {"groups": [{"rules": [
        {"record": "line:a:rate5m", "expr": "sum by (line) (rate(a_total[5m]))"},
        {"alert": "High", "expr": "line:a:rate5m > 1 and on () up == 1"},
    ]}]}
    queries, recorded = rules_queries(doc)
    assert metric_uses(queries, recorded) == {("a_total", "rule line:a:rate5m")}


def test_where_names_the_failing_query():
    with pytest.raises(QueryError, match="panel 'p' target A"):
        metric_uses([("panel 'p' target A", "sum(")])
