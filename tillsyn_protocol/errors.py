"""Exceptions of the protocol package.

ProtocolError
 ├── TopicError      a topic outside the contract
 ├── MessageError    a payload that is too large, malformed or of the wrong shape
 └── TokenError      a command token that must not be applied; carries a RefusalReason
"""

from __future__ import annotations

from enum import StrEnum


class RefusalReason(StrEnum):
    """Why a device refused a command token. Reported in acks, counted in metrics."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    BAD_ALGORITHM = "bad_algorithm"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    BAD_CLAIMS = "bad_claims"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    WINDOW_OVER = "window_over"
    WRONG_STATE = "wrong_state"
    CLOCK_UNSYNCED = "clock_unsynced"
    CAMERA_FAULT = "camera_fault"
    STORE_FAILED = "store_failed"  # the device could not persist the sequence number


class ProtocolError(Exception):
    """Root of every error raised by :mod:`tillsyn_protocol`."""


class TopicError(ProtocolError):
    def __init__(self, topic: str, why: str) -> None:
        super().__init__(f"topic {topic[:120]!r}: {why}")
        self.topic = topic
        self.why = why


class MessageError(ProtocolError):
    def __init__(self, kind: str, why: str) -> None:
        super().__init__(f"invalid {kind} message: {why}")
        self.kind = kind
        self.why = why


class TokenError(ProtocolError):
    def __init__(self, reason: RefusalReason, detail: str = "") -> None:
        super().__init__(f"token refused ({reason.value}){': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail
