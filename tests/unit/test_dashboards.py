"""Grafana dashboards and provisioning: current, consistent, and querying only what the
fleet service exports (the real-Prometheus test evaluates every query as well)."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import pytest
import yaml

from fleet.metrics import FleetMetrics
from tests.monitoring import (
    DASHBOARDS,
    REPO,
    alert_rules,
    check_names,
    dashboard_files,
    dashboard_queries,
    exported_series,
)

REQUIRED = {"tillsyn-overview", "tillsyn-scheduling", "tillsyn-devices", "tillsyn-security"}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_generated_dashboards_and_doc_tables_are_current() -> None:
    stale = [
        str(path.relative_to(REPO))
        for path, content in _generator().rendered().items()
        if not path.exists() or path.read_text() != content
    ]
    assert not stale, f"run .venv/bin/python dashboards/generate.py; out of date: {stale}"


def test_the_four_dashboards_exist_with_unique_uids() -> None:
    boards = [json.loads(p.read_text()) for p in dashboard_files()]
    uids = [b["uid"] for b in boards]
    assert len(uids) == len(set(uids))
    assert set(uids) >= REQUIRED


def _datasource_uid() -> str:
    path = DASHBOARDS / "provisioning" / "datasources" / "prometheus.yaml"
    sources = yaml.safe_load(path.read_text())["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    return str(sources[0]["uid"])


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_model_is_sound(path) -> None:
    board = json.loads(path.read_text())
    uid = _datasource_uid()
    assert board["schemaVersion"] >= 36 and board["title"] and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        where = f"{path.name}: {panel['title']}"
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
        assert panel["description"], f"{where}: say what it tells IT support"
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, where
            assert target["expr"].strip(), where


def test_provisioning_matches_the_compose_mounts() -> None:
    provider = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "dashboards" / "tillsyn.yaml").read_text()
    )["providers"][0]
    assert provider["type"] == "file"
    compose = REPO / "docker-compose.yml"
    if not compose.exists():
        pytest.skip("no docker-compose.yml in this tree")
    services = yaml.safe_load(compose.read_text())["services"]
    grafana = services["grafana"]["volumes"]
    assert f"./dashboards:{provider['options']['path']}:ro" in grafana
    assert "./dashboards/provisioning:/etc/grafana/provisioning:ro" in grafana
    prometheus = services["prometheus"]
    assert "./monitoring:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_every_panel_queries_only_exported_metrics_and_labels() -> None:
    problems = [f"{where}: {p}" for where, expr in dashboard_queries() for p in check_names(expr)]
    assert not problems, "\n".join(problems)


def test_every_alert_queries_only_exported_metrics_and_labels() -> None:
    problems = [f"{r['alert']}: {p}" for r in alert_rules() for p in check_names(r["expr"])]
    assert not problems, "\n".join(problems)


def test_the_name_check_catches_mistakes() -> None:
    assert check_names("max(tillsyn_devices_online)") == [
        "tillsyn_devices_online is not exported by the fleet service"
    ]
    assert check_names('max(tillsyn_devices{connectivity="onlin"})') == [
        "tillsyn_devices{connectivity='onlin'} is not a value it exports"
    ]
    assert check_names('max(tillsyn_devices{device="dev-1"})') == [
        "tillsyn_devices has no label 'device'"
    ]
    assert check_names("max by (state) (tillsyn_devices)") == [
        "grouping by 'state', which no queried metric has"
    ]
    assert check_names("sum(rate(tillsyn_commands[5m]))") == [
        "tillsyn_commands is not exported by the fleet service"
    ]
    assert (
        check_names(
            "histogram_quantile(0.9, sum by (le) (rate(tillsyn_scheduler_lag_seconds_bucket[5m])))"
        )
        == []
    )


def test_every_metric_the_service_exports_is_shown_somewhere() -> None:
    """A metric nobody looks at is noise: each family is on a dashboard or in an alert."""
    text = " ".join(e for _, e in dashboard_queries()) + " ".join(r["expr"] for r in alert_rules())
    unused = [
        info.name
        for info in FleetMetrics().catalogue
        if info.name != "tillsyn_build_info"
        and not any(series in text for series in info.series_names)
    ]
    assert not unused, unused


def test_exported_series_include_counter_and_histogram_suffixes() -> None:
    names = exported_series()
    assert "tillsyn_commands_total" in names
    assert "tillsyn_command_roundtrip_seconds_bucket" in names
    assert "tillsyn_commands" not in names
