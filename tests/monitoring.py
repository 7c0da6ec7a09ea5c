"""What the monitoring files query, and what the service exports: shared by the dashboard,
alert-rule and real-Prometheus tests.

- :func:`dashboard_queries`: ``(where, expr)`` of every panel target of every dashboard;
- :func:`alert_rules`: every rule of ``monitoring/alerts.yml``;
- :func:`for_prometheus`: a panel expression with Grafana's variables filled in;
- :func:`check_names`: the problems with the metric and label names one expression uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fleet.metrics import FleetMetrics, MetricInfo

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"
MONITORING = REPO / "monitoring"
OPERATIONS = REPO / "docs" / "operations.md"

# Names Prometheus itself provides, and labels every scraped series carries.
BUILTIN_METRICS = {"up", "ALERTS", "ALERTS_FOR_STATE"}
TARGET_LABELS = {"job", "instance"}
_NAME = re.compile(r"\b(tillsyn_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(tillsyn_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def dashboard_queries() -> Iterator[tuple[str, str]]:
    for path in dashboard_files():
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"]


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def for_prometheus(expr: str, rate_interval: str = "30s") -> str:
    """Fill in Grafana's built-in variables the way Grafana would."""
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", "5s")


@cache
def _catalogue() -> tuple[dict[str, MetricInfo], dict[str, set[str]]]:
    """Series name -> family, and family -> {label: values it is initialised with}."""
    metrics = FleetMetrics()
    by_series = {s: info for info in metrics.catalogue for s in info.series_names}
    values: dict[str, dict[str, set[str]]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                values.setdefault(sample.name, {}).setdefault(label, set()).add(value)
    return by_series, values  # type: ignore[return-value]


def exported_series() -> set[str]:
    return set(_catalogue()[0])


def check_names(expr: str) -> list[str]:
    """Problems with the names in ``expr``: unknown metrics, labels, or label values."""
    by_series, initial = _catalogue()
    problems: list[str] = []
    used = set(_NAME.findall(expr))
    if not used and not any(re.search(rf"\b{m}\b", expr) for m in BUILTIN_METRICS):
        problems.append("queries no metric")
    labels_in_scope = set(TARGET_LABELS)
    for name in sorted(used):
        info = by_series.get(name)
        if info is None:
            problems.append(f"{name} is not exported by the fleet service")
            continue
        labels_in_scope |= set(info.labels) | ({"le"} if name.endswith("_bucket") else set())
    for name, body in _SELECTOR.findall(expr):
        info = by_series.get(name)
        if info is None:
            continue
        for label, op, value in _MATCHER.findall(body):
            if label not in set(info.labels) | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
            known = initial.get(name, {}).get(label)
            if op == "=" and known and value not in known:
                problems.append(f"{name}{{{label}={value!r}}} is not a value it exports")
    for group in _GROUPING.findall(expr):
        for label in (part.strip() for part in group.split(",") if part.strip()):
            if label not in labels_in_scope:
                problems.append(f"grouping by {label!r}, which no queried metric has")
    return problems
