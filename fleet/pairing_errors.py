"""Errors of pairing and the equipment lifecycle.

FleetError
 └── PairingRefused        a request refused with a reason code and a message for people
      ├── CodeRefused      wrong / expired / used user code, rate limited guesses
      ├── CsrRefused       a CSR whose subject or key does not match, or a bad factory proof
      └── LifecycleRefused swap / retire / return not possible in the device's state

Every refusal carries ``reason`` (a short code for the audit log and metrics), ``why``
(one sentence for the technician) and the HTTP ``status`` the API answers with.
"""

from __future__ import annotations

from .errors import FleetError

__all__ = ["CodeRefused", "CsrRefused", "LifecycleRefused", "PairingRefused"]


class PairingRefused(FleetError):
    status = 400

    def __init__(self, reason: str, why: str, *, status: int | None = None) -> None:
        super().__init__(why)
        self.reason = reason
        self.why = why
        if status is not None:
            self.status = status


class CodeRefused(PairingRefused):
    status = 404


class CsrRefused(PairingRefused):
    status = 400


class LifecycleRefused(PairingRefused):
    status = 409
