"""MQTT topic contract: one subtree per device, identity from the client certificate.

The broker ACL (``broker/acl.conf``) mirrors this file: a device reads only its own
``cmd`` and writes only its own other channels.
"""

from __future__ import annotations

import re
from enum import StrEnum

from .errors import TopicError

PREFIX = "tillsyn/v1"
DEVICE_ROOT = f"{PREFIX}/dev"
VISITS_TOPIC = f"{PREFIX}/fleet/visits"

# Device ids double as certificate CNs and MQTT usernames; the fixed prefix keeps them
# from ever colliding with the fleet's own identity.
DEVICE_ID_PATTERN = r"^dev-[a-z0-9][a-z0-9-]{1,59}$"  # at most 64 characters
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
FLEET_IDENTITY = "tillsyn-fleet"


class Channel(StrEnum):
    CMD = "cmd"  # fleet -> device, QoS 1, signed tokens
    STATE = "state"  # retained reported lock state
    HB = "hb"  # heartbeat
    STATUS = "status"  # retained online/offline, with Last Will
    ACK = "ack"  # command results
    EVENT = "event"  # transitions, looks, faults


DEVICE_CHANNELS = frozenset(c for c in Channel if c is not Channel.CMD)


def is_device_id(value: str) -> bool:
    return bool(_DEVICE_ID_RE.fullmatch(value))


def _topic(device_id: str, channel: str) -> str:
    if not is_device_id(device_id):
        raise TopicError(device_id, "not a valid device id")
    return f"{DEVICE_ROOT}/{device_id}/{channel}"


def _split(topic: str) -> tuple[str, str]:
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != DEVICE_ROOT:
        raise TopicError(topic, "not a device topic")
    if not is_device_id(parts[3]):
        raise TopicError(topic, "not a valid device id")
    return parts[3], parts[4]


def device_topic(device_id: str, channel: Channel) -> str:
    return _topic(device_id, channel.value)


def parse_device_topic(topic: str) -> tuple[str, Channel]:
    """Split ``tillsyn/v1/dev/{id}/{channel}``; anything else is a TopicError."""
    device_id, channel = _split(topic)
    try:
        return device_id, Channel(channel)
    except ValueError:
        raise TopicError(topic, "unknown channel") from None


def subscription(channel: Channel, *, shared_group: str | None = None) -> str:
    """Wildcard filter for one channel of every device, optionally as a shared subscription."""
    filt = f"{DEVICE_ROOT}/+/{channel.value}"
    return f"$share/{shared_group}/{filt}" if shared_group else filt


# Certificate renewal over the device's existing mutual-TLS identity (issue 4). Kept out
# of :class:`Channel` on purpose: the fleet's ingest and the agent's report channels are
# built from ``Channel``, and these two are a separate request/response pair.
class CertChannel(StrEnum):
    CSR = "csr"  # device -> fleet: renewal request (a CSR) or confirmation of the new cert
    CERT = "cert"  # fleet -> device: the renewed certificate (or a refusal)


def cert_topic(device_id: str, channel: CertChannel) -> str:
    return _topic(device_id, channel.value)


def parse_cert_topic(topic: str) -> tuple[str, CertChannel]:
    """Split ``tillsyn/v1/dev/{id}/{csr|cert}``; anything else is a TopicError."""
    device_id, channel = _split(topic)
    try:
        return device_id, CertChannel(channel)
    except ValueError:
        raise TopicError(topic, "not a certificate channel") from None


def cert_subscription(*, shared_group: str | None = None) -> str:
    """The fleet's filter for every device's renewal requests."""
    filt = f"{DEVICE_ROOT}/+/{CertChannel.CSR.value}"
    return f"$share/{shared_group}/{filt}" if shared_group else filt
