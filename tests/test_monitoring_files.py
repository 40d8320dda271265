"""The Grafana dashboard, its provisioning and the Prometheus alerts: the PromQL parses and
runs (checked by promtool, the Debian package `prometheus`), the alerts pass their unit
tests, and every metric, label and label value used is one gproxy exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "gproxy-dashboard.json"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "gproxy.yaml"
ALERTS = ROOT / "deploy" / "prometheus" / "gproxy-alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "gproxy-alerts.test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install the Debian package `prometheus`"
)

# What gproxy exports: metric -> label -> its values (None: any value).
METRICS: dict[str, dict[str, frozenset[str] | None]] = {
    "gproxy_jobs_total": {
        "function": None,
        "outcome": frozenset({"complete", "fail", "exception", "retried", "dead_lettered"}),
    },
    "gproxy_retries_total": {
        "function": None,
        "reason": frozenset({"exception", "fail", "worker_hint", "disconnect", "timeout", "pattern"}),
    },
    "gproxy_retries_exhausted_total": {"function": None},
    "gproxy_retries_deferred_total": {"function": None},
    "gproxy_retry_cap_rejections_total": {"function": None, "cap": frozenset({"max_held", "max_hold_time"})},
    "gproxy_retry_budget_balance": {"function": None},
    "gproxy_retries_observed_total": {"function": None},
    "gproxy_job_duration_seconds": {"function": None},
    "gproxy_attempt_duration_seconds": {"function": None},
    "gproxy_jobs_running": {"function": None},
    "gproxy_jobs_held": {"function": None},
    "gproxy_connections": {"side": frozenset({"worker", "upstream"})},
    "gproxy_upstream_connect_errors_total": {},
    "gproxy_resource_exhausted_total": {
        "resource": frozenset({"file_descriptors", "memory", "buffers", "local_ports"}),
    },
    "gproxy_protocol_errors_total": {
        "reason": frozenset({"bad_magic", "unknown_type", "oversized", "malformed", "mid_packet"}),
    },
    "gproxy_packets_total": {"direction": frozenset({"to_gearmand", "from_gearmand"}), "type": None},
    "gproxy_upstream_up": {"upstream": None},
    "gproxy_retry_connection_up": {"upstream": None},
    "gproxy_retry_reconnects_total": {"upstream": None},
    "gproxy_worker_ejections_total": {"function": None},
    "gproxy_worker_ejected": {"function": None},
    "gproxy_config_last_reload_successful": {},
    "gproxy_config_last_reload_success_timestamp_seconds": {},
    "gproxy_tls_handshake_failures_total": {"side": frozenset({"downstream", "upstream"}), "address": None},
    "gproxy_build_info": {"version": None, "data_plane": frozenset({"compiled", "pure"})},
}
HISTOGRAMS = {"gproxy_job_duration_seconds", "gproxy_attempt_duration_seconds"}
GAUGES = {
    "gproxy_jobs_running", "gproxy_jobs_held", "gproxy_retry_budget_balance", "gproxy_connections",
    "gproxy_upstream_up", "gproxy_retry_connection_up", "gproxy_worker_ejected",
    "gproxy_config_last_reload_successful", "gproxy_config_last_reload_success_timestamp_seconds",
    "gproxy_build_info",
}
TARGET_LABELS = {"instance": None, "job": None}


def series_labels(name: str) -> dict[str, frozenset[str] | None] | None:
    """The labels of a series name as Prometheus stores it (histograms as their
    _bucket, _sum and _count series), or None if gproxy exports no such series."""
    for metric in HISTOGRAMS:
        if name in (f"{metric}_sum", f"{metric}_count"):
            return {**METRICS[metric], **TARGET_LABELS}
        if name == f"{metric}_bucket":
            return {**METRICS[metric], **TARGET_LABELS, "le": None}
    if name in METRICS and name not in HISTOGRAMS:
        return {**METRICS[name], **TARGET_LABELS}
    return None


class Resizing:
    """A LiveState with one of each: a job running and one held, a budget, an ejected worker."""

    def running(self) -> dict[bytes, int]:
        return {b"resize": 1}

    def held(self) -> dict[bytes, int]:
        return {b"resize": 1}

    def budget_balance(self, functions: list[bytes]) -> dict[bytes, float]:
        return {b"resize": 2.5}

    def connections(self) -> dict[str, int]:
        return {"worker": 0, "upstream": 0}

    def ejected(self) -> dict[bytes, int]:
        return {b"resize": 1}


def test_the_table_is_what_gproxy_exports() -> None:
    """METRICS, HISTOGRAMS and GAUGES against gproxy's own registry: the same metrics, the
    same labels, and for a label with a fixed set of values, those values."""
    from gproxy.core.metrics import Metrics

    metrics = Metrics()
    metrics.function(b"resize")  # its zero-valued series, one per outcome, reason and cap
    metrics.job_ended(b"resize", "complete", 0.1)
    metrics.attempt_ended(b"resize", 0.1)
    metrics.upstream_up.labels("gearmand:4730").set(1)
    metrics.retry_connection_up.labels("gearmand:4730").set(1)
    metrics.retry_reconnects.labels("gearmand:4730").inc()
    metrics.tls_handshake_failures.labels("downstream", "0.0.0.0:4730").inc()
    metrics.tls_handshake_failures.labels("upstream", "gearmand:4730").inc()
    metrics.build_info.labels("0.3.0", "compiled").set(1)
    metrics.build_info.labels("0.3.0", "pure").set(1)
    metrics.read_from(Resizing())
    exported: dict[str, dict[str, set[str]]] = {}
    kinds: dict[str, str] = {}
    for family in metrics.registry.collect():
        name = family.name if family.type != "counter" else f"{family.name}_total"
        kinds[name] = family.type
        labels = exported.setdefault(name, {})
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            for label, value in sample.labels.items():
                if label != "le":
                    labels.setdefault(label, set()).add(value)
    assert set(exported) == set(METRICS)
    assert {name for name, kind in kinds.items() if kind == "histogram"} == HISTOGRAMS
    assert {name for name, kind in kinds.items() if kind == "gauge"} == GAUGES
    for name, labels in METRICS.items():
        assert set(exported[name]) == set(labels), name
        for label, values in labels.items():
            if values is not None:
                assert exported[name][label] == values, (name, label)


# -- a small PromQL scanner: enough to find the selectors and grouping labels of our exprs

_TOKEN = re.compile(
    r'''(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')'''
    r"|(?P<grouping>\b(?:by|without|on|ignoring|group_left|group_right)\s*\((?P<labels>[^)]*)\))"
    r"|(?P<number>(?<![\w.])\d[\w.]*)"
    r"|(?P<name>(?<![\w.$])[A-Za-z_:][\w:]*)"
    r"\s*(?P<matchers>\{[^}]*\})?\s*(?P<range>\[[^\]]*\])?(?P<call>\s*\()?"
)
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
}


class Selector:
    def __init__(self, name: str, matchers: list[tuple[str, str, str]], range_: str | None) -> None:
        self.name, self.matchers, self.range = name, matchers, range_

    def __repr__(self) -> str:
        return f"{self.name}{{{self.matchers}}}{self.range or ''}"


def scan(expr: str) -> tuple[list[Selector], set[str]]:
    """The vector selectors of `expr`, and the label names of its by/without/on/... clauses."""
    selectors: list[Selector] = []
    grouping: set[str] = set()
    for token in _TOKEN.finditer(expr):
        if token["grouping"]:
            grouping |= {label.strip() for label in token["labels"].split(",") if label.strip()}
        elif token["name"] and not token["call"] and token["name"].lower() not in _KEYWORDS:
            matchers = _MATCHER.findall(token["matchers"] or "")
            selectors.append(Selector(token["name"], matchers, token["range"]))
    return selectors, grouping


def check_names(expr: str) -> list[str]:
    """What in `expr` is not a series, label or label value gproxy exports."""
    problems = []
    selectors, grouping = scan(expr)
    if not selectors:
        problems.append("no metric at all")
    known_labels = {"instance", "job", "le"}.union(*METRICS.values())
    problems += [f"unknown label {label!r} in a grouping" for label in grouping - known_labels]
    for selector in selectors:
        labels = series_labels(selector.name)
        if labels is None:
            problems.append(f"unknown metric {selector.name!r}")
            continue
        base = selector.name.removesuffix("_bucket")
        if selector.range and base in GAUGES:
            problems.append(f"{selector.name} is a gauge, not for rate() or increase()")
        for label, op, value in selector.matchers:
            if label not in labels:
                problems.append(f"{selector.name} has no label {label!r}")
                continue
            allowed = labels[label]
            if allowed is None or "$" in value:
                continue
            if op in ("=", "!="):
                values = [value]
            elif re.fullmatch(r"\w+(\|\w+)*", value):
                values = value.split("|")
            else:
                values = []
            problems += [
                f"{selector.name}: {label}={v!r} is never exported" for v in values if v not in allowed
            ]
    return problems


def test_the_scanner_sees_selectors_and_rejects_strangers() -> None:
    selectors, grouping = scan(
        'histogram_quantile(0.9, sum by (function, le) (rate(gproxy_job_duration_seconds_bucket'
        '{instance=~"$instance"}[$__rate_interval]))) > 0 and on (instance) up offset 5m'
    )
    assert [(s.name, s.range) for s in selectors] == [
        ("gproxy_job_duration_seconds_bucket", "[$__rate_interval]"), ("up", None)
    ]
    assert selectors[0].matchers == [("instance", "=~", "$instance")]
    assert grouping == {"function", "le", "instance"}
    assert check_names('sum by (outcome) (rate(gproxy_jobs_total{outcome=~"complete|failed"}[5m]))') == [
        "gproxy_jobs_total: outcome='failed' is never exported"
    ]
    assert check_names("rate(gproxy_jobs_held[5m]) + gproxy_job_duration_seconds") == [
        "gproxy_jobs_held is a gauge, not for rate() or increase()",
        "unknown metric 'gproxy_job_duration_seconds'",
    ]


# -- promtool


def promtool(*args: str | Path, cwd: Path | None = None) -> str:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *map(str, args)], check=False, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


# -- the dashboard


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    """Every panel but the rows, those inside collapsed rows included."""
    found = []
    for panel in dashboard()["panels"]:
        found += [panel] if panel["type"] != "row" else panel.get("panels", [])
    return found


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel."""
    return [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in panels()
        for target in panel["targets"]
    ]


def concrete(expr: str) -> str:
    """A dashboard expr as Grafana sends it with every instance and function selected."""
    expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$function", ".*")
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def test_dashboard_identity_and_variables() -> None:
    board = dashboard()
    assert (board["uid"], board["title"]) == ("gproxy", "gproxy")
    assert 36 <= board["schemaVersion"] <= 40
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "instance", "function"}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name, query in (
        ("instance", "label_values(gproxy_connections, instance)"),
        ("function", "label_values(gproxy_jobs_total, function)"),
    ):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert query in (variable["query"], variable["query"].get("query"))
        assert variable["multi"] and variable["includeAll"], name
        assert variable["allValue"] == ".*", "All must be a regex, not a list of every value"


def test_every_panel_queries_through_the_datasource_variable() -> None:
    ids = [panel["id"] for panel in dashboard()["panels"]] + [
        nested["id"] for row in dashboard()["panels"] for nested in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {panel["type"] for panel in panels()} <= {"timeseries", "stat"}
    for panel in panels():
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["targets"], f"{where} has no target"
        assert panel.get("description"), f"{where} has no description"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert target["expr"].strip(), where


def test_dashboard_exprs_filter_on_the_variables_and_use_known_names() -> None:
    problems = []
    for where, expr in dashboard_exprs():
        problems += [f"{where}: {problem}" for problem in check_names(expr)]
        for selector in scan(expr)[0]:
            matchers = set(selector.matchers)
            if ("instance", "=~", "$instance") not in matchers:
                problems.append(f'{where}: {selector.name} lacks instance=~"$instance"')
            labels = series_labels(selector.name) or {}
            if "function" in labels and ("function", "=~", "$function") not in matchers:
                problems.append(f'{where}: {selector.name} lacks function=~"$function"')
            if selector.range not in (None, "[$__rate_interval]"):
                problems.append(f"{where}: {selector.name}{selector.range}: use [$__rate_interval]")
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_metric() -> None:
    used = {s.name for _, expr in dashboard_exprs() for s in scan(expr)[0]}
    histograms = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used} & HISTOGRAMS
    assert set(METRICS) - used - histograms == set()


def recording_rules(exprs: list[tuple[str, str]]) -> dict[str, Any]:
    """The exprs as recording rules, for promtool (JSON is YAML)."""
    rules = [{"record": f"dashboard:expr_{i}", "expr": concrete(expr)} for i, (_, expr) in enumerate(exprs)]
    return {"groups": [{"name": "gproxy_dashboard", "rules": rules}]}


@needs_promtool
def test_dashboard_exprs_parse(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(json.dumps(recording_rules(exprs), indent=1))
    assert f"SUCCESS: {len(exprs)} rules found" in promtool("check", "rules", rules)


def _input_series() -> list[dict[str, str]]:
    """One gproxy at work for 20 minutes, scraped every minute: a series of every kind."""
    target = 'job="gproxy",instance="gproxy-1:9464"'
    series = {}
    per_minute = {"complete": 30, "fail": 2, "exception": 3, "retried": 10, "dead_lettered": 1}
    for outcome, n in per_minute.items():
        series[f'gproxy_jobs_total{{{target},function="resize",outcome="{outcome}"}}'] = f"0+{n}x20"
    # thumbnail is retried too, but never exhausted nor rejected: it has no such series.
    series[f'gproxy_jobs_total{{{target},function="thumbnail",outcome="complete"}}'] = "0+20x20"
    series[f'gproxy_jobs_total{{{target},function="thumbnail",outcome="retried"}}'] = "0+5x20"
    for reason in METRICS["gproxy_retries_total"]["reason"] or ():
        series[f'gproxy_retries_total{{{target},function="resize",reason="{reason}"}}'] = "0+3x20"
    for metric in ("retries_exhausted_total", "retries_deferred_total", "retries_observed_total", "worker_ejections_total"):
        series[f'gproxy_{metric}{{{target},function="resize"}}'] = "0+2x20"
    for cap in METRICS["gproxy_retry_cap_rejections_total"]["cap"] or ():
        series[f'gproxy_retry_cap_rejections_total{{{target},function="resize",cap="{cap}"}}'] = "0+1x20"
    for metric in HISTOGRAMS:
        for le, n in (("0.1", 5), ("1", 20), ("+Inf", 30)):
            series[f'{metric}_bucket{{{target},function="resize",le="{le}"}}'] = f"0+{n}x20"
        series[f'{metric}_sum{{{target},function="resize"}}'] = "0+25x20"
        series[f'{metric}_count{{{target},function="resize"}}'] = "0+30x20"
    series[f'gproxy_jobs_running{{{target},function="resize"}}'] = "4x20"
    series[f'gproxy_jobs_held{{{target},function="resize"}}'] = "2x20"
    series[f'gproxy_retry_budget_balance{{{target},function="resize"}}'] = "0 3 7.5x18"
    series[f'gproxy_worker_ejected{{{target},function="resize"}}'] = "0 1x19"
    series[f'gproxy_connections{{{target},side="worker"}}'] = "3x20"
    series[f'gproxy_connections{{{target},side="upstream"}}'] = "4x20"
    series[f'gproxy_upstream_up{{{target},upstream="gearmand:4730"}}'] = "1x20"
    series[f'gproxy_retry_connection_up{{{target},upstream="gearmand:4730"}}'] = "1x5 0x5 1x10"
    series[f'gproxy_retry_reconnects_total{{{target},upstream="gearmand:4730"}}'] = "0x5 0+3x5 15x10"
    series[f"gproxy_upstream_connect_errors_total{{{target}}}"] = "0+1x20"
    series[f"gproxy_config_last_reload_successful{{{target}}}"] = "1x5 0x5 1x10"
    series[f"gproxy_config_last_reload_success_timestamp_seconds{{{target}}}"] = "0x10 600x10"
    series[f'gproxy_resource_exhausted_total{{{target},resource="file_descriptors"}}'] = "0+2x20"
    series[f'gproxy_build_info{{{target},version="0.3.0",data_plane="compiled"}}'] = "1x20"
    series[f'gproxy_tls_handshake_failures_total{{{target},side="upstream",address="gearmand:4730"}}'] = "0x5 1x5 2x10"
    series[f'gproxy_protocol_errors_total{{{target},reason="bad_magic"}}'] = "0+1x20"
    series[f'gproxy_packets_total{{{target},direction="to_gearmand",type="WORK_COMPLETE"}}'] = "0+30x20"
    series[f'gproxy_packets_total{{{target},direction="from_gearmand",type="JOB_ASSIGN"}}'] = "0+30x20"
    assert all(check_names(name) == [] for name in series)
    return [{"series": name, "values": values} for name, values in series.items()]


def retry_success_ratio() -> str:
    [expr] = [
        target["expr"] for panel in panels() for target in panel["targets"]
        if panel["title"] == "Retry success ratio by function"
    ]
    return expr


@needs_promtool
def test_dashboard_exprs_return_data_and_the_retry_ratio_is_right(tmp_path: Path) -> None:
    """Against a gproxy's worth of series, every expr has a result, and the retry success
    ratio is (retried - exhausted - max_hold_time rejections) / retried: (10 - 2 - 1) / 10
    for resize, 1 for a function never exhausted nor rejected."""
    exprs = dashboard_exprs()
    tests = [
        {"expr": f"clamp_max(count({concrete(expr)}), 1)", "eval_time": "10m",
         "exp_samples": [{"labels": "{}", "value": 1}]}
        for _, expr in exprs
    ]
    tests.append({
        "expr": f"round({concrete(retry_success_ratio())}, 0.001)", "eval_time": "10m",
        "exp_samples": [{"labels": '{function="resize"}', "value": 0.7},
                        {"labels": '{function="thumbnail"}', "value": 1}],
    })
    (tmp_path / "dashboard-rules.yml").write_text(json.dumps(recording_rules(exprs)))
    test_file = tmp_path / "dashboard-test.yml"
    test_file.write_text(json.dumps({
        "rule_files": ["dashboard-rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": _input_series(), "promql_expr_test": tests}],
    }, indent=1))
    promtool("test", "rules", test_file.name, cwd=tmp_path)


# -- the alerts


def alert_rules() -> list[dict[str, str]]:
    """Each alerting rule's name, expr and the rest of its text. A line-based reading of our
    own file (PyYAML is not a dependency); promtool's rule count proves nothing is missed."""
    rules = []
    for block in re.split(r"\n(?=[ ]*- alert:)", ALERTS.read_text())[1:]:
        name = re.match(r"[ ]*- alert:[ ]*(\S+)", block)
        assert name, block
        inline = re.search(r"^[ ]+expr:[ ]+([^|> ].*)$", block, re.MULTILINE)
        folded = re.search(r"^([ ]+)expr:[ ]*[|>]-?[ ]*\n((?:\1[ ]+.*\n|[ ]*\n)+)", block, re.MULTILINE)
        expr = inline[1] if inline else folded[2] if folded else None
        assert expr, f"no expr in {name[1]}"
        rules.append({"alert": name[1], "expr": expr, "text": block})
    return rules


@needs_promtool
def test_alert_rules_check() -> None:
    output = promtool("check", "rules", ALERTS)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


@needs_promtool
def test_alert_rules_unit_tests() -> None:
    promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)


def test_alert_rules_use_known_names_and_are_complete() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "GproxyRetryStorm", "GproxyRetriesExhausted", "GproxyDeadLetters",
        "GproxyRetriesDeferred", "GproxyRetryCapRejections", "GproxyUpstreamDown",
        "GproxyProtocolErrors", "GproxyResourceExhausted", "GproxyRetryConnectionDown",
        "GproxyConfigReloadFailed", "GproxyTlsHandshakeFailures",
    }
    assert re.search(r"^\s*- name: gproxy\s*$", ALERTS.read_text(), re.MULTILINE)
    tests = ALERT_TESTS.read_text()
    problems = []
    for rule in rules:
        name, text = rule["alert"], rule["text"]
        problems += [f"{name}: {problem}" for problem in check_names(rule["expr"])]
        problems += [
            f"{name}: {s.name} lacks job=\"gproxy\"" for s in scan(rule["expr"])[0]
            if ("job", "=", "gproxy") not in s.matchers
        ]
        if not re.search(r"^\s+for: \d+[smh]\s*$", text, re.MULTILINE):
            problems.append(f"{name}: no `for`")
        if not re.search(r"^\s+severity: (warning|critical)\s*$", text, re.MULTILINE):
            problems.append(f"{name}: no severity warning or critical")
        for annotation in ("summary", "description"):
            if not re.search(rf"^\s+{annotation}: .*\$labels\.", text, re.MULTILINE):
                problems.append(f"{name}: no {annotation} naming $labels")
        # Its tests: once where it fires, once where it does not.
        if not re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests):
            problems.append(f"{name}: no test where it does not fire")
        if not re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", tests):
            problems.append(f"{name}: no test where it fires")
    assert not problems, "\n".join(problems)


# -- provisioning


def test_provisioning_files_by_text() -> None:
    """What can be checked without a YAML parser."""
    for path in (DATASOURCES, DASHBOARD_PROVIDERS):
        text = path.read_text()
        assert "\t" not in text, f"{path.name}: tabs are not YAML indentation"
        assert re.search(r"^apiVersion: 1$", text, re.MULTILINE), path.name
    assert re.search(r"^\s+type: prometheus$", DATASOURCES.read_text(), re.MULTILINE)
    providers = DASHBOARD_PROVIDERS.read_text()
    assert re.search(r"^\s+type: file$", providers, re.MULTILINE)
    path = re.search(r"^\s+path: (\S+)$", providers, re.MULTILINE)
    assert path and path[1] in (ROOT / "grafana" / "README.md").read_text(), "README shows another path"


def test_provisioning_files_parse() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: only the text checks ran")
    datasources = yaml.safe_load(DATASOURCES.read_text())
    assert datasources["apiVersion"] == 1
    [prometheus] = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prometheus["url"].startswith("http")
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
