"""What operators import (``deploy/``): the Grafana dashboard and the Prometheus alerting rules.

Every PromQL expression in them may name only what the package exports: the names, labels and
buckets come from a real scrape of the package's worker (``OP_CELERY_METRICS_PORT``) after a
retry, a 429, deliveries and a dead letter, so the ``_total``, ``_bucket``, ``_count`` and
``_sum`` samples are the ones Prometheus stores; a test checks that they are exactly what
``op_celery.metrics`` defines. ``promtool`` (Debian's ``prometheus``
package) checks and unit-tests the rules when it is installed; the YAML structure is checked
either way.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from celery import Celery
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

import op_celery
from op_celery import _app, metrics, signals
from op_celery._settings import DEFAULT_VISIBILITY_TIMEOUT_S
from op_celery.testing import StandInServer

from ._support import (
    CLIENT_ID,
    CLIENT_SECRET,
    REDIS_URL,
    WorkerProcess,
    answer_429_once,
    free_port,
    wait_until,
    worker_env,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "op-celery.json"
RULES = ROOT / "deploy" / "prometheus" / "op-celery-rules.yml"
RULES_TESTS = ROOT / "deploy" / "prometheus" / "op-celery-rules.test.yml"
BODY_400 = '{"status":400,"error":"Error","message":"body/payload/profileId Invalid input"}'
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
#: Grafana's variables, replaced by what Grafana would put there before promtool parses.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$project": ".*"}
#: The PromQL functions and keywords the files may use; anything else followed by "(" is not
#: PromQL we expect, and any other word is a metric name.
PROMQL_FUNCTIONS = frozenset({
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "deriv", "delta",
    "histogram_quantile", "absent", "absent_over_time", "clamp_min", "time", "vector", "scalar",
    "label_values", "topk", "max_over_time", "min_over_time",
})  # fmt: skip
PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
    "unless",
})  # fmt: skip


@dataclass
class Exported:
    """What a scrape of the package's metrics shows: sample names, their labels, and the
    ``le`` of each histogram's buckets; and the metrics' own names (``families``)."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    buckets: dict[str, set[str]] = field(default_factory=dict)
    families: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def worker_metrics() -> Iterator[str]:
    """What ``celery -A op_celery.worker worker`` serves on ``OP_CELERY_METRICS_PORT`` after a
    retry (503), a pause (429), deliveries, a dead letter (400) and a bot, a duplicate and a
    filtered answer: every metric with a sample.
    """
    key_prefix = f"opc-test-{uuid.uuid4().hex[:10]}:"
    port = free_port()
    with StandInServer(clients={CLIENT_ID: CLIENT_SECRET}) as stand_in:
        env = worker_env(stand_in.url, REDIS_URL, key_prefix)
        # A configured pace, so that the rate gauge has a sample whatever is learned.
        env.update(OP_CELERY_METRICS_PORT=str(port), OPENPANEL_RATE_LIMIT="40/s")
        _app.reset_settings()
        app = Celery("deploy-test", set_as_current=True)
        app.conf.update(
            broker_url=env["OP_CELERY_BROKER_URL"],
            broker_transport_options={"global_keyprefix": env["OP_CELERY_BROKER_KEY_PREFIX"]},
            op_celery_queue=env["OP_CELERY_QUEUE"],
            task_ignore_result=True,
        )
        worker = WorkerProcess(env)
        try:
            worker.start()

            def served(name: str, at_least: float) -> bool:
                try:
                    return sample(scrape(port), name) >= at_least
                except OSError:
                    return False

            assert wait_until(lambda: served("op_celery_events_throttled_total", 0)), worker.log
            stand_in.fail_next(1, status=503, body="unavailable")
            op_celery.track.delay("deploy_retried")
            assert wait_until(lambda: served("op_celery_events_delivered_total", 1)), worker.log
            answer_429_once(stand_in, retry_after="0.2")
            op_celery.track.delay("deploy_throttled")
            assert wait_until(lambda: served("op_celery_events_delivered_total", 2)), worker.log
            stand_in.fail_next(
                1, status=400, body=BODY_400, headers={"content-type": "application/json"}
            )
            op_celery.track.delay("deploy_refused")
            assert wait_until(lambda: served("op_celery_events_dead_lettered_total", 1)), worker.log
            for answer, reason in (("bot", "bot"), ("duplicate", "duplicate"),
                                   ("ip-filtered", "filtered")):  # fmt: skip
                stand_in.fail_next(1, answer)
                op_celery.track.delay(f"deploy_{reason}")
                counter = f"op_celery_events_{reason}_total"
                assert wait_until(lambda counter=counter: served(counter, 1)), worker.log
            yield scrape(port)
        finally:
            worker.stop()
            app.close()
            _app.reset_settings()
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


@pytest.fixture(scope="module")
def exported(worker_metrics: str) -> Exported:
    """The package's samples in the worker's scrape (not prometheus-client's process_* and
    python_*), and the names of the metrics op_celery.metrics defines."""
    registry = CollectorRegistry()
    metrics.install(registry)
    found = read_exposition(worker_metrics)
    return Exported(
        labels={name: labels for name, labels in found.labels.items() if "op_celery" in name},
        buckets=found.buckets,
        families={family.name for family in registry.collect()},
    )


def read_exposition(text: str) -> Exported:
    found = Exported()
    for family in text_string_to_metric_families(text):
        for one in family.samples:
            found.labels.setdefault(one.name, set()).update(one.labels)
            if one.name.endswith("_bucket"):
                found.buckets.setdefault(one.name, set()).add(one.labels["le"])
    return found


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
        return text


def sample(text: str, name: str) -> float:
    """The sum of the samples called ``name`` in an exposition; 0 when there is none."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def test_a_worker_serves_every_metric_the_module_defines_and_no_other(
    worker_metrics: str, exported: Exported
) -> None:
    """The names the checks below read are op_celery.metrics' own: served in this process after
    one event of each signal, its samples (and labels) are the worker's; the rate-limit gauges,
    read from Redis for projects this process delivered for, are named by their collector."""
    registry = CollectorRegistry()
    metrics.install(registry)
    event = {"operation": "track", "project": "default", "event_id": "deploy-test"}
    signals.event_delivered.send(sender=None, **event, status=200, latency_s=0.02, age_s=1.0)
    signals.event_retried.send(sender=None, **event, reason="ServerError", countdown_s=1.0)
    signals.event_throttled.send(sender=None, **event, wait_s=0.5)
    signals.event_dead_lettered.send(sender=None, **event, error_type="InvalidPayload", status=400)
    for reason in ("bot", "duplicate", "filtered"):
        signals.event_dropped.send(sender=None, **event, reason=reason, status=200, message="")
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        in_process = read_exposition(scrape(port))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    gauges = {family.name for family in metrics.RATE_LIMIT.describe()}
    assert set(exported.labels) == set(in_process.labels) | gauges
    for name, labels in in_process.labels.items():
        assert exported.labels[name] == labels, name
    assert exported.buckets == in_process.buckets
    assert exported.labels["op_celery_rate_limit_per_second"] == {"project", "source"}
    assert exported.labels["op_celery_rate_limit_paused_seconds"] == {"project"}
    assert sample(worker_metrics, "op_celery_events_retried_total") >= 1
    assert sample(worker_metrics, "op_celery_events_throttled_total") >= 1


# --- PromQL, read as far as these checks need. ----------------------------------------------


@dataclass
class Names:
    """What one PromQL expression names."""

    #: (metric, {label: (operator, value)}) for every selector.
    selectors: list[tuple[str, dict[str, tuple[str, str]]]] = field(default_factory=list)
    #: Labels of by/without/on/ignoring/group_* clauses.
    grouping: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)


SELECTOR = re.compile(r"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)?\s*\{(?P<matchers>[^}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
WORD = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def names_in(expr: str) -> Names:
    """The metrics, labels and functions ``expr`` names (PromQL, or Grafana's
    ``label_values(selector, label)``)."""
    names = Names()
    text = expr

    def selector(match: re.Match[str]) -> str:
        matchers: dict[str, tuple[str, str]] = {}
        rest = match["matchers"]
        while rest.strip():
            one = MATCHER.match(rest)
            assert one, f"cannot read the label matchers {match['matchers']!r} in {expr!r}"
            matchers[one[1]] = (one[2], one[3])
            rest = rest[one.end() :]
        assert match["name"], f"a selector without a metric name in {expr!r}"
        names.selectors.append((match["name"], matchers))
        return " "

    text = SELECTOR.sub(selector, text)
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*", text)
    if label_values:
        names.functions.add("label_values")
        names.grouping.add(label_values[2])
        text = label_values[1]
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges: [5m], [$__rate_interval]
    text = re.sub(r"\boffset\s+\w+", " ", text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)

    def grouping(match: re.Match[str]) -> str:
        names.grouping.update(label.strip() for label in match[1].split(",") if label.strip())
        return " "

    text = GROUPING.sub(grouping, text)
    for word in WORD.finditer(text):
        if word[1] in PROMQL_KEYWORDS:
            continue  # "or (", "unless (" are operators, not calls
        if word[2]:
            names.functions.add(word[1])
        else:
            names.selectors.append((word[1], {}))
    return names


def problems(expr: str, exported: Exported) -> list[str]:
    """Every name in ``expr`` the package does not export, or a function we did not expect."""
    names = names_in(expr)
    found: list[str] = []
    if not names.selectors:
        found.append("names no metric")
    for function in sorted(names.functions - PROMQL_FUNCTIONS):
        found.append(f"unknown function {function}()")
    all_labels = set().union(*exported.labels.values()) | TARGET_LABELS
    for metric, matchers in names.selectors:
        if metric not in exported.labels:
            found.append(f"{metric} is not exported")
            continue
        for label, (operator, value) in matchers.items():
            if label not in exported.labels[metric] | TARGET_LABELS:
                found.append(f"{metric} has no label {label}")
            elif label == "le" and operator == "=" and value not in exported.buckets[metric]:
                found.append(f"{metric} has no bucket le={value!r}")
    for label in sorted(names.grouping - all_labels):
        found.append(f"no exported metric has the label {label}")
    return found


def test_the_name_check_sees_every_name_an_expression_uses(exported: Exported) -> None:
    assert problems('sum by (reason) (rate(op_celery_events_retried_total{job=~"$job"}[5m]))',
                    exported) == []  # fmt: skip
    assert problems("rate(op_celery_nope_total[5m]) > 0", exported) == [
        "op_celery_nope_total is not exported"
    ]
    assert problems("op_celery_events_delivered > 0", exported) == [
        "op_celery_events_delivered is not exported"  # the family's name, not a sample's
    ]
    assert problems('op_celery_events_retried_total{reasons="x"}', exported) == [
        "op_celery_events_retried_total has no label reasons"
    ]
    assert problems('op_celery_event_age_seconds_bucket{le="300"}', exported) == [
        "op_celery_event_age_seconds_bucket has no bucket le='300'"
    ]
    assert problems("sum by (tenant) (op_celery_events_throttled_total)", exported) == [
        "no exported metric has the label tenant"
    ]
    assert problems("label_values(op_celery_events_delivered_total, project)", exported) == []


# --- The dashboard. ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every query of the dashboard, variables' included."""
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in panels()
        for target in panel["targets"]
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"variable {variable['name']}", query["query"]))
    return found


def test_the_dashboard_is_json_with_a_prometheus_datasource_variable() -> None:
    data = dashboard()
    variables = {variable["name"]: variable for variable in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert data["uid"] and data["title"] and data["schemaVersion"] >= 36
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_a_query_and_a_place_of_its_own() -> None:
    cells: dict[tuple[int, int], str] = {}
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["title"] and panel["description"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']!r} has an empty query"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("where_expr", dashboard_expressions(), ids=lambda item: item[0])
def test_every_dashboard_query_names_only_what_the_package_exports(
    exported: Exported, where_expr: tuple[str, str]
) -> None:
    where, expr = where_expr
    assert problems(expr, exported) == [], f"{where}: {expr}"


def test_every_metric_the_package_exports_is_on_the_dashboard(exported: Exported) -> None:
    named = {
        metric for _, expr in dashboard_expressions() for metric, _ in names_in(expr).selectors
    }
    for family in exported.families:
        assert any(name.startswith(family) for name in named), f"{family} has no panel"


def test_the_dashboard_shows_what_operators_asked_for() -> None:
    titles = " | ".join(panel["title"] for panel in panels())
    for wanted in (
        "Delivered/s by project and operation", "Retries/s by reason", "429s and pauses",
        "Limiter's rate in use", "Pause after a 429", "Dead letters", "Event age at delivery",
        "Send latency",
    ):  # fmt: skip
        assert wanted in titles
    by_title = {panel["title"]: panel for panel in panels()}
    delivered = by_title["Delivered/s by project and operation"]["targets"][0]["expr"]
    assert "by (project, operation)" in delivered
    age = by_title["Event age at delivery"]
    assert [t["expr"].split(",")[0] for t in age["targets"]] == [
        "histogram_quantile(0.5", "histogram_quantile(0.95", "histogram_quantile(0.99",
    ]  # fmt: skip


# --- The alerting rules. -------------------------------------------------------------------

DURATION = re.compile(r"^(\d+[smhdwy])+$")


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    assert set(data) == {"groups"}
    found: list[dict[str, Any]] = []
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        assert group["name"] and group["rules"]
        found.extend(group["rules"])
    return found


def test_the_rules_file_has_the_structure_prometheus_loads() -> None:
    names = []
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert re.fullmatch(r"OpCelery[A-Z][A-Za-z]+", rule["alert"]), rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert all(isinstance(value, str) for value in rule["labels"].values())
        names.append(rule["alert"])
    assert sorted(names) == sorted(set(names))
    assert set(names) == {
        "OpCeleryDeadLettersGrowing", "OpCeleryPoolPaused", "OpCeleryThrottledWithoutDeliveries",
        "OpCeleryEventAgeOverVisibilityTimeout", "OpCeleryNoDeliveries",
    }  # fmt: skip


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_every_rule_names_only_what_the_package_exports(
    exported: Exported, rule: dict[str, Any]
) -> None:
    assert problems(rule["expr"], exported) == [], rule["alert"]
    # Every alert says which job it is about.
    assert "job" in names_in(rule["expr"]).grouping, rule["alert"]


def test_the_event_age_rule_uses_the_bucket_of_the_default_visibility_timeout() -> None:
    (rule,) = [r for r in rules() if r["alert"] == "OpCeleryEventAgeOverVisibilityTimeout"]
    assert DEFAULT_VISIBILITY_TIMEOUT_S in metrics.EVENT_AGE_BUCKETS_S
    bucket = floatToGoString(DEFAULT_VISIBILITY_TIMEOUT_S)
    assert f'op_celery_event_age_seconds_bucket{{le="{bucket}"}}' in rule["expr"]
    assert f"{DEFAULT_VISIBILITY_TIMEOUT_S:g} s" in rule["annotations"]["summary"]


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_the_rules_fire_as_their_unit_tests_say() -> None:
    result = promtool("test", "rules", RULES_TESTS.name, cwd=RULES_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each query as a recording rule, Grafana's variables replaced as Grafana would."""
    records = []
    for n, (_, expr) in enumerate(dashboard_expressions()):
        if expr.startswith("label_values("):
            continue  # Grafana's, not PromQL
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        records.append({"record": f"op_celery_dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_dead_letter_queries_count_the_first_letters_of_a_new_error_type(
    tmp_path: Path,
) -> None:
    """3 dead letters of a new error type (its series appears at 3) and 2 later of an old one:
    the dashboard's queries count 5, where increase() alone would count 2."""
    by_title = {panel["title"]: panel for panel in panels()}
    stat = by_title["Dead letters (time range)"]["targets"][0]["expr"]
    by_type = by_title["Dead letters by error type"]["targets"][0]["expr"]
    variables = {**GRAFANA_VARIABLES, "$__range": "15m", "$__rate_interval": "15m"}
    for variable, value in variables.items():
        stat, by_type = stat.replace(variable, value), by_type.replace(variable, value)
    series = "op_celery_events_dead_lettered_total"
    worker = 'job="op-celery", instance="w1:9808"'
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f'{series}{{{worker}, error_type="InvalidPayload"}}',
                 "values": "_x10 3x10"},
                {"series": f'{series}{{{worker}, error_type="AuthenticationError"}}',
                 "values": "1x10 3x10"},
            ],
            "promql_expr_test": [
                {"expr": stat, "eval_time": "15m", "exp_samples": [{"labels": "{}", "value": 5}]},
                {"expr": by_type, "eval_time": "15m", "exp_samples": [
                    {"labels": '{error_type="AuthenticationError"}', "value": 2},
                    {"labels": '{error_type="InvalidPayload"}', "value": 3},
                ]},
                {"expr": f"sum(increase({series}[15m]))", "eval_time": "15m",
                 "exp_samples": [{"labels": "{}", "value": 2}]},
            ],
        }],
    }  # fmt: skip
    path = tmp_path / "dead-letters.test.yml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
