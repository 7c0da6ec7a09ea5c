"""Exceptions of the fleet service.

FleetError
 ├── ConfigError        bad settings at start-up: names the setting and why
 ├── NotFound           an API/CLI request for something that does not exist
 ├── Conflict           a request that contradicts the current state
 ├── SchedulerLockHeld  another fleet process holds the scheduler lock
 ├── SchemaError        the database schema cannot be migrated (e.g. newer than the code)
 └── LostRow            a row changed in a write-back batch was gone when it was written
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error raised by :mod:`fleet`."""


class ConfigError(FleetError):
    def __init__(self, setting: str, why: str) -> None:
        super().__init__(f"{setting}: {why}")
        self.setting = setting
        self.why = why


class NotFound(FleetError):
    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key!r} not found")
        self.kind = kind
        self.key = key


class Conflict(FleetError):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class SchedulerLockHeld(FleetError):
    def __init__(self, where: str) -> None:
        super().__init__(f"scheduler lock held by another process ({where})")
        self.where = where


class SchemaError(FleetError):
    """The database schema cannot be brought to what this version expects."""


class LostRow(FleetError):
    """A row changed in a write-back batch (fleet/writeback.py) was gone when written."""
