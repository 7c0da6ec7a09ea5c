"""Strict schemas for every message a device publishes.

Every field has a bound and unknown fields are refused: the fleet ingests untrusted bytes
from thousands of homes, so a message is either exactly right or dropped with a reason.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .errors import MessageError, RefusalReason
from .topics import DEVICE_ID_PATTERN

MAX_PAYLOAD_BYTES = 4096
MAX_TOKEN_BYTES = 2048

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN, max_length=64)]
StaffId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
SHORT_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ShortId = Annotated[str, StringConstraints(pattern=SHORT_ID_PATTERN)]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.+_-]{1,32}$")]
Epoch = Annotated[float, Field(ge=0, le=4_102_444_800)]  # up to year 2100
Seq = Annotated[int, Field(ge=0, le=2**53)]


class LockState(StrEnum):
    LOCKED = "LOCKED"  # camera off and cannot be started
    ARMED = "ARMED"  # inside an agreed window; camera still off, a look may start
    VIEWING = "VIEWING"  # camera on, for at most the look cap


class CommandKind(StrEnum):
    ARM = "arm"
    DISARM = "disarm"
    LOOK = "look"


class CameraHealth(StrEnum):
    OK = "ok"
    FAULT = "fault"
    UNPLUGGED = "unplugged"


class DeviceKind(StrEnum):
    CAMERA = "camera"
    SENSOR = "sensor"
    VIDEO_PHONE = "video_phone"


class AckResult(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already applied earlier; the first ack may have been lost
    REFUSED = "refused"


class EventKind(StrEnum):
    BOOT = "boot"
    STATE_CHANGED = "state_changed"
    LOOK_STARTED = "look_started"
    LOOK_ENDED = "look_ended"
    TOKEN_REFUSED = "token_refused"
    CAMERA_FAULT = "camera_fault"
    CAMERA_RESTORED = "camera_restored"
    # Video phone: a look is a call the resident must answer (never placed otherwise).
    CALL_ANSWERED = "call_answered"
    CALL_NOT_ANSWERED = "call_not_answered"  # counts as "not seen"


class _Message(BaseModel):
    # Strict: "5" is not a number and 1 is not a bool. JSON strings still parse as enums.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, str_max_length=128)

    v: Literal[1] = 1
    ts: Epoch


class Heartbeat(_Message):
    seq: Seq
    uptime_s: Annotated[float, Field(ge=0, le=10 * 365 * 86400)]
    state: LockState
    camera: CameraHealth
    clock_synced: bool
    fw: Version


class Status(_Message):
    status: Literal["online", "offline"]
    boot_id: ShortId
    fw: Version | None = None
    kind: DeviceKind | None = None


class StateReport(_Message):
    state: LockState
    since: Epoch
    armed_until: Epoch | None = None
    view_until: Epoch | None = None
    look_id: ShortId | None = None
    last_seq: Seq


class Ack(_Message):
    # None when the refused token was too broken to label (encode() omits Nones).
    jti: ShortId | None = None
    seq: Seq | None = None
    cmd: CommandKind | None = None
    result: AckResult
    reason: RefusalReason | None = None
    state: LockState


class Event(_Message):
    kind: EventKind
    state: LockState
    look_id: ShortId | None = None
    staff: StaffId | None = None
    reason: Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")] | None = None
    duration_s: Annotated[float, Field(ge=0, le=86400)] | None = None


M = TypeVar("M", bound=_Message)


def decode(model: type[M], payload: bytes) -> M:
    """Parse one payload, refusing oversize or malformed input with a short reason."""
    kind = model.__name__
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(kind, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        loc = err["loc"]
        # An unexpected field's name is the sender's text: never echoed into logs.
        known = bool(loc) and loc[0] in model.model_fields
        where = ".".join(str(p) for p in loc) if known else "payload"
        raise MessageError(kind, f"{where}: {err['msg']}") from None


def encode(message: _Message) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()
