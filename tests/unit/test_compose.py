"""docker-compose.yml, checked without Docker: its structure (images, health checks, start
order, loopback ports, declared secrets and volumes, files that exist in the repository)
and that the commands it runs are real ``tillsyn`` commands.
(tests/integration/test_compose_commands.py runs those commands outside Docker.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tillsyn_cli.main import cli

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
FLEET_IMAGE = "tillsyn-fleet:0.1.0"


def long_running(service: dict[str, Any]) -> bool:
    return service.get("restart", "no") != "no"


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    return {d: {} for d in deps} if isinstance(deps, list) else deps


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume entry (short syntax)."""
    out = []
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        out.append((source, target))
    return out


def tillsyn_commands() -> dict[str, list[str]]:
    """The ``tillsyn`` command line of every service that runs the image's entrypoint."""
    return {
        name: s["command"]
        for name, s in SERVICES.items()
        if s.get("image") == FLEET_IMAGE and "entrypoint" not in s
    }


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name


def test_long_running_services_have_health_checks() -> None:
    for name, service in SERVICES.items():
        if long_running(service):
            check = service.get("healthcheck", {})
            assert check.get("test"), f"{name} has no health check"
            assert not check.get("disable"), name


def test_start_order_waits_for_what_it_needs() -> None:
    for name, service in SERVICES.items():
        for dep, spec in depends_on(service).items():
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition")
            assert condition, f"{name} -> {dep}: say which condition (healthy, completed)"
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}'s health"
            elif condition == "service_completed_successfully":
                assert not long_running(SERVICES[dep]), f"{dep} is not a one-shot"
            else:
                pytest.fail(f"{name} -> {dep}: condition {condition} does not order the start")


def test_published_ports_are_on_loopback_only() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_secrets_and_volumes_are_declared_and_secret_examples_exist() -> None:
    declared_secrets = COMPOSE.get("secrets", {})
    declared_volumes = COMPOSE.get("volumes", {})
    for name, service in SERVICES.items():
        for secret in service.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret["source"]
            assert secret_name in declared_secrets, f"{name}: undeclared secret {secret_name}"
        for source, _ in mounts(service):
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name}: undeclared volume {source}"
    for secret_name, spec in declared_secrets.items():
        file = Path(spec["file"])
        assert file.parts[0] == "secrets", f"{secret_name} is not read from secrets/"
        assert (REPO / f"{file}.example").is_file(), f"{file}.example is missing"


def test_bind_mounted_host_files_exist() -> None:
    for name, service in SERVICES.items():
        for source, _ in mounts(service):
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    assert (REPO / "Dockerfile").is_file()


def test_the_broker_runs_the_projects_config() -> None:
    volumes = {t: s for s, t in mounts(SERVICES["mosquitto"])}
    assert volumes["/mosquitto/config/mosquitto.conf"] == "./broker/mosquitto.conf"
    assert volumes["/mosquitto/config/acl.conf"] == "./broker/acl.conf"


@pytest.mark.parametrize("service", sorted(tillsyn_commands()))
def test_service_commands_are_real_tillsyn_commands(service: str) -> None:
    command = tillsyn_commands()[service]
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, f"{service}: tillsyn {' '.join(command)}\n{result.output}"


def test_the_fleet_and_simulator_commands_are_the_expected_ones() -> None:
    commands = tillsyn_commands()
    assert commands["fleet"][:2] == ["fleet", "serve"]
    assert commands["simulator"][0] == "sim"
    # The one-shots run tillsyn through a shell: their first word after sh -c is tillsyn.
    for name in ("pki-init", "sim-certs"):
        assert SERVICES[name]["command"][0].split()[0] == "tillsyn", name


def test_prometheus_config_exists_and_passes_promtool() -> None:
    volumes = {t: s for s, t in mounts(SERVICES["prometheus"])}
    config_dir = REPO / volumes["/etc/prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    assert (config_dir / "prometheus.yml").is_file()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup.sh --test installs it)")
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        check=False,
        cwd=config_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_exists() -> None:
    volumes = {t: s for s, t in mounts(SERVICES["grafana"])}
    provisioning = REPO / volumes["/etc/grafana/provisioning"]
    assert (provisioning / "datasources").is_dir()
    assert (provisioning / "dashboards").is_dir()
    assert any((REPO / volumes["/var/lib/grafana/dashboards"]).glob("*.json"))
