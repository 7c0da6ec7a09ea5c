"""The commands docker-compose.yml runs start the same way outside Docker: the fleet service
with deploy/fleet.toml (only paths and hosts rewritten, the database URL from a secrets
directory as in the stack) and the simulator with the compose file's own arguments (paths,
hosts and ports mapped to the test's), each checked with the compose file's health check."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from broker.launcher import MosquittoProcess, free_port
from broker.pki import PkiPaths
from tests.integration.agent_helpers import toml_dumps
from tests.integration.fleet_harness import staff_token

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVICES: dict[str, dict[str, Any]] = yaml.safe_load((REPO / "docker-compose.yml").read_text())[
    "services"
]


class Mapping:
    """Container paths, hosts and ports -> the test's, applied to each argument."""

    def __init__(self, prefixes: dict[str, str], exact: dict[str, str]) -> None:
        self.prefixes, self.exact = prefixes, exact

    def arg(self, value: str) -> str:
        if value in self.exact:
            return self.exact[value]
        for old, new in self.prefixes.items():
            if value == old or value.startswith(old + "/"):
                return new + value[len(old) :]
        return value

    def text(self, value: str) -> str:
        for old, new in {**self.exact, **self.prefixes}.items():
            value = value.replace(old, new)
        return value


def tillsyn(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tillsyn_cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        text=True,
        **kw,
    )


def healthcheck(service: str, mapping: Mapping) -> subprocess.CompletedProcess[str]:
    """The compose health check of ``service`` (a CMD python -c ...), run here."""
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    code = mapping.text(test[3])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


@pytest.fixture
def stack(
    tmp_path: Path, pki_dir: PkiPaths, mosquitto: MosquittoProcess
) -> Iterator[tuple[Mapping, dict[str, str], str]]:
    """The fleet service started from the compose command; yields (mapping, env, api)."""
    secrets, fleet_data = tmp_path / "secrets", tmp_path / "fleet-data"
    secrets.mkdir()
    database_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    (secrets / "tillsyn_database_url").write_text(database_url)
    api_port = free_port()
    mapping = Mapping(
        prefixes={
            "/etc/tillsyn/fleet.toml": str(tmp_path / "fleet.toml"),
            "/var/lib/tillsyn": str(fleet_data),
            "/fleet": str(fleet_data),
            "/pki": str(pki_dir.directory),
            "/run/secrets": str(secrets),
            "/tmp/sim-state": str(tmp_path / "sim-state"),
        },
        exact={
            "mosquitto": "127.0.0.1",
            "8883": str(mosquitto.port),
            "http://fleet:8080": f"http://127.0.0.1:{api_port}",
            "http://127.0.0.1:8080": f"http://127.0.0.1:{api_port}",
            "7070": str(free_port()),
        },
    )
    settings = tomllib.loads((REPO / "deploy" / "fleet.toml").read_text())
    settings.update(
        broker_host=mapping.arg(settings["broker_host"]),
        broker_port=mosquitto.port,
        ca_file=mapping.arg(settings["ca_file"]),
        cert_file=mapping.arg(settings["cert_file"]),
        key_file=mapping.arg(settings["key_file"]),
        signing_key_file=mapping.arg(settings["signing_key_file"]),
        api_host="127.0.0.1",
        api_port=api_port,
        mqtt_client_id=f"tillsyn-fleet-{uuid.uuid4().hex[:8]}",
    )
    (tmp_path / "fleet.toml").write_text(toml_dumps(settings))
    env = {k.split("=", 1)[0]: mapping.arg(v) for k, v in SERVICES["fleet"]["environment"].items()}
    log = (tmp_path / "fleet.log").open("w")
    command = [mapping.arg(a) for a in SERVICES["fleet"]["command"]]
    fleet = tillsyn(command, env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while healthcheck("fleet", mapping).returncode != 0:
            assert fleet.poll() is None, (tmp_path / "fleet.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the fleet's health check never passed"
            time.sleep(0.5)
        yield mapping, {"database_url": database_url}, f"http://127.0.0.1:{api_port}"
    finally:
        fleet.terminate()
        fleet.wait(30)
        log.close()


def test_fleet_command_starts_from_deploy_config(
    stack: tuple[Mapping, dict[str, str], str],
) -> None:
    _, _, api = stack
    assert httpx.get(f"{api}/healthz", timeout=5).json() == {"status": "alive"}
    assert httpx.get(f"{api}/readyz", timeout=5).status_code == 200


def test_simulator_commands_run_against_the_fleet(
    stack: tuple[Mapping, dict[str, str], str], tmp_path: Path
) -> None:
    mapping, info, api = stack
    token = staff_token(info["database_url"], "sim-1")
    Path(mapping.arg("/run/secrets/tillsyn_sim_token")).write_text(token + "\n")
    # sim-certs: `tillsyn sim --issue-only ...` (the shell's chown is Docker's business).
    issue = shlex.split(SERVICES["sim-certs"]["command"][0].split("&&")[0])
    assert issue[0] == "tillsyn"
    issuer = tillsyn([mapping.arg(a) for a in issue[1:]], {}, stderr=subprocess.PIPE)
    _, err = issuer.communicate(timeout=120)
    assert issuer.returncode == 0, err

    command = [mapping.arg(a) for a in SERVICES["simulator"]["command"]]
    devices = int(command[command.index("--devices") + 1])
    sim = tillsyn(
        command,
        {},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "sim.log").open("w"),
    )
    assert sim.stdin is not None and sim.stdout is not None
    try:
        ready = json.loads(sim.stdout.readline() or "{}")
        assert ready.get("event") == "ready", (tmp_path / "sim.log").read_text()[-2000:]
        assert ready["devices"] == devices
        assert healthcheck("simulator", mapping).returncode == 0

        headers = {"Authorization": f"Bearer {token}"}

        def online() -> int:
            rows = httpx.get(f"{api}/api/devices", headers=headers, timeout=10).json()
            return sum(
                r["id"].startswith("dev-sim-") and r["connectivity"] == "online" for r in rows
            )

        deadline = time.monotonic() + 30
        # Random faults run at a few per device-day: one may hit during the test.
        while online() < devices - 2:
            assert time.monotonic() < deadline, f"{online()} of {devices} online at the fleet"
            time.sleep(0.5)
        sim.stdin.write("status\n")
        sim.stdin.flush()
        assert json.loads(sim.stdout.readline())["ok"]
        sim.stdin.write("stop\n")
        sim.stdin.flush()
        assert sim.wait(60) == 0
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(10)
