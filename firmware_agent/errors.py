"""Exceptions of the device agent.

AgentError
 ├── ConfigError    a setting is missing or wrong (``setting``, ``why``)
 │    └── NotEnrolled  [enroll] is configured but the device has no identity yet
 ├── StoreError     the replay counter cannot be read or written (``path``, ``why``)
 └── CameraError    a camera driver call failed (``operation``, ``why``)

Errors from lower layers (pydantic, OSError, subprocess) are translated into these at
the boundary, so the CLI can print one clear line and the agent loop can count them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["AgentError", "CameraError", "ConfigError", "NotEnrolled", "StoreError"]


class AgentError(Exception):
    """Root of every error raised by :mod:`firmware_agent`."""


class ConfigError(AgentError):
    """A configuration setting is invalid; the message names the setting and why."""

    def __init__(self, setting: str, why: str) -> None:
        super().__init__(f"{setting}: {why}")
        self.setting = setting
        self.why = why


class NotEnrolled(ConfigError):
    """The device enrolls first: it has no certificate yet (``firmware_agent/enroll.py``)."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__("enroll", f"not paired yet (no identity in {state_dir})")
        self.state_dir = state_dir


class StoreError(AgentError):
    """The persisted sequence number cannot be loaded or saved."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"state file {path}: {why}")
        self.path = path
        self.why = why


class CameraError(AgentError):
    """A camera driver call failed (timed out, exited non-zero, device unplugged...)."""

    def __init__(self, operation: str, why: str) -> None:
        super().__init__(f"camera {operation}: {why}")
        self.operation = operation
        self.why = why
