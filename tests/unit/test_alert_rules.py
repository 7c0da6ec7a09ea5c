"""Prometheus alert rules: valid (promtool check), unit-tested (promtool test rules), each with
a severity and a runbook section that exists, each tested firing and quiet."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.monitoring import MONITORING, OPERATIONS, alert_rules

SEVERITIES = {"critical", "warning", "info"}
# The alerts the monitoring issue asks for, with the severity each must have.
REQUIRED = {
    "TillsynDeviceOfflineWindowDue": "warning",
    "TillsynLockStateMismatch": "warning",
    "TillsynCameraArmedPastWindowEnd": "critical",
    "TillsynSchedulerNotAlive": "critical",
    "TillsynSchedulerJobsMissed": "warning",
    "TillsynOutboxBacklogGrowing": "warning",
    "TillsynCertificateNearExpiry": "warning",
    "TillsynCrlNearExpiry": "warning",
    "TillsynMassDisconnect": "critical",
    "TillsynTokenRefusalsSpike": "warning",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run scripts/setup.sh --test (Debian package prometheus)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=60, check=False
    )


def test_rules_and_scrape_config_are_valid() -> None:
    rules = run("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = run("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_test_fails_on_a_wrong_expectation(tmp_path) -> None:
    """The rule tests can fail: flip one expectation and promtool must say so."""
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    case = next(t for t in tests["tests"] if t["name"].startswith("armed past window end"))
    case["alert_rule_test"][0]["exp_alerts"] = [{"exp_labels": {"severity": "critical"}}]
    tests["tests"] = [case]
    tests["rule_files"] = [str(MONITORING / "alerts.yml")]
    path = tmp_path / "broken_test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool(), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0


def _slugs() -> set[str]:
    """GitHub-style anchors of the headings in docs/operations.md."""
    out = set()
    for line in OPERATIONS.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


def test_every_rule_has_severity_summary_description_and_a_runbook_that_exists() -> None:
    slugs = _slugs()
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "alert names must be unique"
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        ann = rule["annotations"]
        assert ann["summary"].strip() and ann["description"].strip(), name
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path == "docs/operations.md", name
        assert anchor == name.lower(), f"{name}: runbook anchor should be {name.lower()}"
        assert anchor in slugs, f"{name}: no section '### {name}' in docs/operations.md"


def test_the_required_alerts_exist_with_their_severity() -> None:
    severities = {r["alert"]: r["labels"]["severity"] for r in alert_rules()}
    assert {name: severities.get(name) for name in REQUIRED} == REQUIRED


def test_every_alert_is_unit_tested_both_firing_and_quiet() -> None:
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "never tested firing"
    assert names - quiet == set(), "never tested quiet"
