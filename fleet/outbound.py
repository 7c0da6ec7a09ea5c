"""What the sans-I/O core asks the MQTT shell to send."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expiry_s: int | None = None  # MQTT 5 message expiry: a stale command is dropped
