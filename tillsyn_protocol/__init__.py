"""Sans-I/O core shared by the device agent and the fleet service.

Topic names, message schemas, signed command tokens, the device lock state machine and
window arithmetic. Nothing here opens a socket, touches a database or reads a clock:
``now`` is always an argument.
"""

from .errors import MessageError, ProtocolError, RefusalReason, TokenError, TopicError
from .machine import (
    AckOut,
    Action,
    CameraOff,
    CameraOn,
    Clock,
    DeviceMachine,
    PersistSeq,
    Snapshot,
    StateChanged,
)
from .messages import (
    Ack,
    AckResult,
    CameraHealth,
    CommandKind,
    DeviceKind,
    Event,
    EventKind,
    Heartbeat,
    LockState,
    StateReport,
    Status,
    decode,
    encode,
)
from .tokens import CommandClaims, SigningKey, key_id, keyring, load_public_key, sign, verify
from .topics import Channel, device_topic, is_device_id, parse_device_topic, subscription

__all__ = [
    "Ack",
    "AckOut",
    "AckResult",
    "Action",
    "CameraHealth",
    "CameraOff",
    "CameraOn",
    "Channel",
    "Clock",
    "CommandClaims",
    "CommandKind",
    "DeviceKind",
    "DeviceMachine",
    "Event",
    "EventKind",
    "Heartbeat",
    "LockState",
    "MessageError",
    "PersistSeq",
    "ProtocolError",
    "RefusalReason",
    "SigningKey",
    "Snapshot",
    "StateChanged",
    "StateReport",
    "Status",
    "TokenError",
    "TopicError",
    "decode",
    "device_topic",
    "encode",
    "is_device_id",
    "key_id",
    "keyring",
    "load_public_key",
    "parse_device_topic",
    "sign",
    "subscription",
    "verify",
]
