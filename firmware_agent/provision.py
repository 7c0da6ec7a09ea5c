"""Write an agent config file: used by the dev stack, the tests and (later) pairing."""

from __future__ import annotations

from pathlib import Path


def write_agent_config(
    path: Path,
    *,
    device_id: str,
    broker_host: str,
    broker_port: int,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    command_keys: list[Path],
    state_dir: Path,
    heartbeat_interval_s: float = 30,
    look_cap_s: float = 60,
    reconnect_min_s: float = 1.0,
    reconnect_max_s: float = 60.0,
    keepalive_s: int = 30,
    kind: str = "camera",
) -> Path:
    keys = ", ".join(f'"{k.absolute()}"' for k in command_keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'device_id = "{device_id}"\n'
        f'kind = "{kind}"\n'
        f'state_dir = "{state_dir.absolute()}"\n'
        f"command_keys = [{keys}]\n"
        f"heartbeat_interval_s = {heartbeat_interval_s}\n"
        f"look_cap_s = {look_cap_s}\n\n"
        "[broker]\n"
        f'host = "{broker_host}"\nport = {broker_port}\nkeepalive_s = {keepalive_s}\n'
        f"reconnect_min_s = {reconnect_min_s}\nreconnect_max_s = {reconnect_max_s}\n\n"
        "[tls]\n"
        f'ca_file = "{ca_file.absolute()}"\ncert_file = "{cert_file.absolute()}"\n'
        f'key_file = "{key_file.absolute()}"\n\n'
        '[camera]\ntype = "simulated"\n'
    )
    return path


def write_enroll_config(
    path: Path,
    *,
    enroll_url: str,
    ca_file: Path,
    serial: str,
    state_dir: Path,
    kind: str = "camera",
    firmware_version: str | None = None,
    heartbeat_interval_s: float = 30,
    look_cap_s: float = 60,
    reconnect_min_s: float = 1.0,
    reconnect_max_s: float = 60.0,
    keepalive_s: int = 30,
    camera: str = 'type = "simulated"\n',
) -> Path:
    """A factory-fresh device: no certificate, no device id, only where to enroll.

    Pairing stores the identity in ``state_dir``; the broker address, device id and
    pinned command key come from there (``firmware_agent/identity.py``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fw = f'firmware_version = "{firmware_version}"\n' if firmware_version else ""
    path.write_text(
        f'kind = "{kind}"\n'
        f"{fw}"
        f'state_dir = "{state_dir.absolute()}"\n'
        f"heartbeat_interval_s = {heartbeat_interval_s}\n"
        f"look_cap_s = {look_cap_s}\n\n"
        "[enroll]\n"
        f'url = "{enroll_url}"\n'
        f'ca_file = "{ca_file.absolute()}"\n'
        f'serial = "{serial}"\n\n'
        "[broker]\n"
        f"keepalive_s = {keepalive_s}\n"
        f"reconnect_min_s = {reconnect_min_s}\nreconnect_max_s = {reconnect_max_s}\n\n"
        f"[camera]\n{camera}"
    )
    return path
