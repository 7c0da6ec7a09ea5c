"""Tillsyn device agent: the I/O shell around :class:`tillsyn_protocol.DeviceMachine`.

The agent drives the pure lock state machine with real time, a camera driver and an MQTT
connection, and enforces the privacy invariants on its own: it boots LOCKED, re-locks at
a window's end and ends a look at its cap with no network at all, and never publishes
anything but the schemas of :mod:`tillsyn_protocol.messages`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .agent import Agent
from .camera import CameraDriver, ExecHookCamera, SimulatedCamera
from .clock import ClockSource, SystemClock
from .config import AgentConfig, load_config
from .errors import AgentError, CameraError, ConfigError, StoreError
from .store import SeqStore

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "CameraDriver",
    "CameraError",
    "ClockSource",
    "ConfigError",
    "ExecHookCamera",
    "SeqStore",
    "SimulatedCamera",
    "StoreError",
    "SystemClock",
    "__version__",
    "load_config",
]
