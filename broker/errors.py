"""Exceptions raised by the ``broker`` package.

One root, subclasses that carry data::

    BrokerError
    ├── PkiError            (reason, path, device_id)
    │   └── InvalidDeviceIdError
    └── BrokerStartError    (port, returncode, log_tail)
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BrokerError", "BrokerStartError", "InvalidDeviceIdError", "PkiError"]


class BrokerError(Exception):
    """Root of every error raised by the ``broker`` package."""


class PkiError(BrokerError):
    """A PKI operation failed (missing CA, bad CSR, unreadable file, ...)."""

    def __init__(
        self,
        reason: str,
        *,
        path: Path | None = None,
        device_id: str | None = None,
    ) -> None:
        self.reason = reason
        self.path = path
        self.device_id = device_id
        super().__init__(f"{reason} ({path})" if path is not None else reason)


class InvalidDeviceIdError(PkiError):
    """A device id does not match the device id contract."""

    def __init__(self, device_id: str, pattern: str) -> None:
        super().__init__(
            f"invalid device id {device_id!r}: must match {pattern}",
            device_id=device_id,
        )


class BrokerStartError(BrokerError):
    """Mosquitto could not be started (or stopped) as asked."""

    def __init__(
        self,
        reason: str,
        *,
        port: int | None = None,
        returncode: int | None = None,
        log_tail: str = "",
    ) -> None:
        self.reason = reason
        self.port = port
        self.returncode = returncode
        self.log_tail = log_tail
        message = reason
        if log_tail:
            message = f"{reason}\n--- mosquitto log (tail) ---\n{log_tail}"
        super().__init__(message)
