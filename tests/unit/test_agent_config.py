"""Agent config: a valid file loads; every bad setting is one clear line naming it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from broker.pki import PkiPaths
from firmware_agent import AgentConfig, ConfigError, load_config
from firmware_agent.cli import agent as agent_cli
from firmware_agent.config import ExecCameraConfig, SimulatedCameraConfig
from tests.integration.agent_helpers import (
    Signer,
    agent_config_data,
    toml_dumps,
    unique_device_id,
    write_agent_config,
)
from tillsyn_protocol import DeviceKind, key_id


@pytest.fixture
def base(
    tmp_path: Path, pki_dir: PkiPaths, device_cert: Callable[[str], tuple[Path, Path]]
) -> dict[str, Any]:
    device_id = unique_device_id()
    cert, key = device_cert(device_id)
    signer = Signer(device_id)
    pem = signer.write_public_key(tmp_path / "command.pem")
    return agent_config_data(
        device_id=device_id,
        pki=pki_dir,
        cert=cert,
        key=key,
        command_keys=[pem],
        state_dir=tmp_path / "state",
        port=8883,
    )


def _load(tmp_path: Path, data: dict[str, Any]) -> AgentConfig:
    return load_config(write_agent_config(tmp_path / "agent.toml", data))


def _error(tmp_path: Path, data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, data)
    return info.value


def test_valid_config_loads_with_defaults(tmp_path: Path, base: dict[str, Any]) -> None:
    for key in ("heartbeat_interval_s", "look_cap_s", "kind", "camera", "firmware_version"):
        base.pop(key)
    base["broker"] = {"host": "mqtt.example.org"}
    config = _load(tmp_path, base)
    assert config.kind is DeviceKind.CAMERA
    assert config.heartbeat_interval_s == 30
    assert config.look_cap_s == 60
    assert config.broker.port == 8883
    assert (config.broker.reconnect_min_s, config.broker.reconnect_max_s) == (1.0, 60.0)
    assert config.broker.session_expiry_s == 3600
    assert isinstance(config.camera, SimulatedCameraConfig)
    assert config.clock.require_ntp_sync is False
    keys = config.command_keyring()
    assert len(keys) == 1
    assert next(iter(keys)) == key_id(next(iter(keys.values())))


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    (tmp_path / "etc").mkdir()
    pem = Path(base["command_keys"][0])
    (tmp_path / "etc" / "key.pem").write_bytes(pem.read_bytes())
    base["command_keys"] = ["key.pem"]
    base["state_dir"] = "state"
    config = load_config(write_agent_config(tmp_path / "etc" / "agent.toml", base))
    assert config.command_keys == [tmp_path / "etc" / "key.pem"]
    assert config.state_dir == tmp_path / "etc" / "state"


def test_exec_camera(tmp_path: Path, base: dict[str, Any]) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    base["camera"] = {"type": "exec", "program": str(hook), "timeout_s": 2}
    config = _load(tmp_path, base)
    assert isinstance(config.camera, ExecCameraConfig)
    assert config.camera.program == hook
    assert config.camera.timeout_s == 2


@pytest.mark.parametrize(
    ("change", "setting", "why"),
    [
        (lambda d: d["broker"].update(port=0), "broker.port", "must be 1..65535"),
        (lambda d: d["broker"].update(port=70000), "broker.port", "must be 1..65535"),
        (lambda d: d["broker"].update(port="x"), "broker.port", "valid integer"),
        (lambda d: d["broker"].pop("host"), "broker.host", "required"),
        (lambda d: d["broker"].update(reconnect_min_s=5, reconnect_max_s=1),
         "broker.reconnect_max_s", "must be >= reconnect_min_s"),
        (lambda d: d.update(device_id="camera-1"), "device_id", "must match"),
        (lambda d: d.update(device_id="dev-ABC"), "device_id", "must match"),
        (lambda d: d.update(kind="toaster"), "kind", "camera"),
        (lambda d: d.update(firmware_version="1.0 beta"), "firmware_version", "characters"),
        (lambda d: d.update(heartbeat_interval_s=0), "heartbeat_interval_s", "must be 1..3600"),
        (lambda d: d.update(look_cap_s=0), "look_cap_s", "must be 1..600"),
        (lambda d: d.update(look_cap_s=601), "look_cap_s", "must be 1..600"),
        (lambda d: d.update(command_keys=[]), "command_keys", "at least 1"),
        (lambda d: d.pop("command_keys"), "command_keys", "required"),
        (lambda d: d.pop("tls"), "tls", "required"),
        (lambda d: d.update(colour="blue"), "colour", "unknown setting"),
        (lambda d: d["broker"].update(colour="blue"), "broker.colour", "unknown setting"),
        (lambda d: d.update(camera={"type": "webcam"}), "camera", "does not match"),
        (lambda d: d.update(camera={"type": "exec"}), "camera.program", "required"),
        (lambda d: d.update(camera={"type": "exec", "program": "/nonexistent/hook"}),
         "camera.program", "file not found: /nonexistent/hook"),
        (lambda d: d.update(clock={"require_ntp_sync": "perhaps"}), "clock.require_ntp_sync",
         "boolean"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_setting_and_why(
    tmp_path: Path,
    base: dict[str, Any],
    change: Callable[[dict[str, Any]], None],
    setting: str,
    why: str,
) -> None:
    change(base)
    err = _error(tmp_path, base)
    assert err.setting == setting, str(err)
    assert why in err.why, str(err)
    assert str(err).startswith(f"{setting}: ")
    assert "\n" not in str(err)


@pytest.mark.parametrize("name", ["ca_file", "cert_file", "key_file"])
def test_missing_tls_file(tmp_path: Path, base: dict[str, Any], name: str) -> None:
    base["tls"][name] = str(tmp_path / "nope.pem")
    err = _error(tmp_path, base)
    assert str(err) == f"tls.{name}: file not found: {tmp_path / 'nope.pem'}"


def test_command_key_that_is_not_ed25519(tmp_path: Path, base: dict[str, Any]) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    base["command_keys"] = [base["command_keys"][0], str(bogus)]
    err = _error(tmp_path, base)
    assert err.setting == "command_keys[1]"
    assert "not an Ed25519 public key" in err.why


def test_command_key_missing(tmp_path: Path, base: dict[str, Any]) -> None:
    base["command_keys"] = [str(tmp_path / "gone.pem")]
    err = _error(tmp_path, base)
    assert (err.setting, err.why) == ("command_keys[0]", f"file not found: {tmp_path}/gone.pem")


def test_exec_program_not_executable(tmp_path: Path, base: dict[str, Any]) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o644)
    base["camera"] = {"type": "exec", "program": str(hook)}
    err = _error(tmp_path, base)
    assert (err.setting, err.why) == ("camera.program", f"not executable: {hook}")


def test_state_dir_that_is_a_file(tmp_path: Path, base: dict[str, Any]) -> None:
    (tmp_path / "f").write_text("")
    base["state_dir"] = str(tmp_path / "f")
    assert _error(tmp_path, base).setting == "state_dir"


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: file not found: "):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("device_id = \n")
    with pytest.raises(ConfigError, match=r"^config: invalid TOML"):
        load_config(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"^config: invalid TOML"):
        load_config(binary)


def test_toml_writer_round_trips(tmp_path: Path, base: dict[str, Any]) -> None:
    import tomllib

    assert tomllib.loads(toml_dumps(base)) == base


# --- CLI --------------------------------------------------------------------------------


def test_check_config_ok(tmp_path: Path, base: dict[str, Any]) -> None:
    path = write_agent_config(tmp_path / "agent.toml", base)
    result = CliRunner().invoke(agent_cli, ["check-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {base['device_id']} (camera, fw 1.2.3-test)")
    assert "last seq 0" in result.output


def test_check_config_error_is_one_line_exit_2(tmp_path: Path, base: dict[str, Any]) -> None:
    base["broker"]["port"] = 0
    path = write_agent_config(tmp_path / "agent.toml", base)
    result = CliRunner().invoke(agent_cli, ["check-config", "--config", str(path)])
    assert result.exit_code == 2
    assert result.output == "configuration error: broker.port: must be 1..65535\n"


def test_check_config_corrupt_state_exit_3(tmp_path: Path, base: dict[str, Any]) -> None:
    state = Path(base["state_dir"])
    state.mkdir()
    (state / "seq.json").write_text("{garbage")
    path = write_agent_config(tmp_path / "agent.toml", base)
    result = CliRunner().invoke(agent_cli, ["check-config", "--config", str(path)])
    assert result.exit_code == 3
    assert "corrupt" in result.output


def test_run_with_bad_config_logs_one_line_and_exits_2(
    tmp_path: Path, base: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    base["look_cap_s"] = 9999
    path = write_agent_config(tmp_path / "agent.toml", base)
    result = CliRunner().invoke(agent_cli, ["run", "--config", str(path)])
    assert result.exit_code == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["configuration error: look_cap_s: must be 1..600"]
    assert all(r.exc_info is None for r in errors)


def test_example_config_is_valid(tmp_path: Path, base: dict[str, Any]) -> None:
    import tomllib

    example = Path(__file__).resolve().parents[2] / "firmware_agent" / "agent.example.toml"
    data = tomllib.loads(example.read_text())
    # Point the example's files at real ones; every other setting is taken as written.
    data["tls"] = base["tls"]
    data["command_keys"] = base["command_keys"]
    data["state_dir"] = str(tmp_path / "state")
    if data.get("camera", {}).get("type") == "exec":
        data["camera"]["program"] = "/bin/true"
    AgentConfig.from_mapping(data)
    assert os.access("/bin/true", os.X_OK)
