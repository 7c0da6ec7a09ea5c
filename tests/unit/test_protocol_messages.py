"""Message schemas and topic names: round-trips, and refusal of everything else."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tillsyn_protocol import (
    Ack,
    AckResult,
    CameraHealth,
    Channel,
    CommandKind,
    DeviceKind,
    Event,
    EventKind,
    Heartbeat,
    LockState,
    MessageError,
    RefusalReason,
    StateReport,
    Status,
    TopicError,
    decode,
    device_topic,
    encode,
    is_device_id,
    parse_device_topic,
    subscription,
)
from tillsyn_protocol import tokens as tk
from tillsyn_protocol.messages import MAX_PAYLOAD_BYTES

# --- strategies ---------------------------------------------------------------------------

epochs = st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False) | st.integers(
    min_value=0, max_value=4_102_444_800
)
seqs = st.integers(min_value=0, max_value=2**53)
versions = st.from_regex(r"\A[A-Za-z0-9.+_-]{1,32}\Z")
short_ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
staff_ids = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z")
reasons = st.from_regex(r"\A[a-z_]{1,32}\Z")
device_ids = st.from_regex(r"\Adev-[a-z0-9][a-z0-9-]{1,59}\Z")  # at most 64 characters


def _opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


heartbeats = st.builds(
    Heartbeat,
    ts=epochs,
    seq=seqs,
    uptime_s=st.floats(min_value=0, max_value=10 * 365 * 86400, allow_nan=False),
    state=st.sampled_from(LockState),
    camera=st.sampled_from(CameraHealth),
    clock_synced=st.booleans(),
    fw=versions,
)
statuses = st.builds(
    Status,
    ts=epochs,
    status=st.sampled_from(["online", "offline"]),
    boot_id=short_ids,
    fw=_opt(versions),
    kind=_opt(st.sampled_from(DeviceKind)),
)
state_reports = st.builds(
    StateReport,
    ts=epochs,
    state=st.sampled_from(LockState),
    since=epochs,
    armed_until=_opt(epochs),
    view_until=_opt(epochs),
    look_id=_opt(short_ids),
    last_seq=seqs,
)
acks = st.builds(
    Ack,
    ts=epochs,
    jti=_opt(short_ids),
    seq=_opt(seqs),
    cmd=_opt(st.sampled_from(CommandKind)),
    result=st.sampled_from(AckResult),
    reason=_opt(st.sampled_from(RefusalReason)),
    state=st.sampled_from(LockState),
)
events = st.builds(
    Event,
    ts=epochs,
    kind=st.sampled_from(EventKind),
    state=st.sampled_from(LockState),
    look_id=_opt(short_ids),
    staff=_opt(staff_ids),
    reason=_opt(reasons),
    duration_s=_opt(st.floats(min_value=0, max_value=86400, allow_nan=False)),
)
messages = st.one_of(heartbeats, statuses, state_reports, acks, events)

VALID: dict[type[Any], dict[str, Any]] = {
    Heartbeat: {
        "ts": 1_800_000_000.5, "seq": 3, "uptime_s": 12.5, "state": "ARMED", "camera": "ok",
        "clock_synced": True, "fw": "1.2.3",
    },
    Status: {"ts": 1_800_000_000, "status": "online", "boot_id": "b00t", "kind": "camera"},
    StateReport: {
        "ts": 1_800_000_000, "state": "VIEWING", "since": 1_799_999_990,
        "armed_until": 1_800_003_600, "view_until": 1_800_000_050, "look_id": "lk1",
        "last_seq": 41,
    },
    Ack: {
        "ts": 1_800_000_000, "jti": "abc123", "seq": 9, "cmd": "look", "result": "refused",
        "reason": "wrong_state", "state": "LOCKED",
    },
    Event: {
        "ts": 1_800_000_000, "kind": "look_ended", "state": "ARMED", "look_id": "lk1",
        "staff": "nurse.anna", "reason": "look_cap", "duration_s": 60.0,
    },
}  # fmt: skip
MODELS = list(VALID)


def _payload(model: type[Any], **changes: Any) -> bytes:
    fields = {**VALID[model], **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not _DROP}).encode()


_DROP: Any = object()


# --- round trips --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(message=messages)
def test_round_trip(message: Any) -> None:
    payload = encode(message)
    assert len(payload) <= MAX_PAYLOAD_BYTES
    back = decode(type(message), payload)
    assert back == message
    assert encode(back) == payload
    # The payload is plain JSON with the version tag; nothing is null (absent instead).
    raw = json.loads(payload)
    assert raw["v"] == 1
    assert None not in raw.values()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_valid_payloads_decode(model: type[Any]) -> None:
    message = decode(model, _payload(model))
    assert decode(model, encode(message)) == message


# Regression: Ack.jti/seq/cmd were required-but-nullable while encode() drops None, so the
# ack of a garbage token (jti=seq=cmd=None) did not decode ("jti: Field required").
def test_ack_of_unlabelled_refusal_round_trips() -> None:
    ack = Ack(
        ts=1_800_000_000, jti=None, seq=None, cmd=None, result=AckResult.REFUSED,
        reason=RefusalReason.MALFORMED, state=LockState.LOCKED,
    )  # fmt: skip
    assert decode(Ack, encode(ack)) == ack


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_oversize_payload_refused_exactly_past_the_limit(model: type[Any]) -> None:
    body = _payload(model)
    at_limit = body + b" " * (MAX_PAYLOAD_BYTES - len(body))
    assert len(at_limit) == MAX_PAYLOAD_BYTES
    decode(model, at_limit)  # whitespace is fine up to the limit
    with pytest.raises(MessageError, match="bytes"):
        decode(model, at_limit + b" ")
    with pytest.raises(MessageError):
        decode(model, b"{" + b'"a":1,' * 5000 + b"}")


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("extra", [{"x": 1}, {"device_id": "dev-abc1"}, {"V": 1}, {"": None}])
def test_extra_field_refused(model: type[Any], extra: dict[str, Any]) -> None:
    with pytest.raises(MessageError) as info:
        decode(model, _payload(model, **extra))
    assert info.value.kind == model.__name__


COMMON_BAD: list[dict[str, Any]] = [
    {"v": 2},
    {"v": "1"},
    {"v": None},
    {"ts": _DROP},
    {"ts": "yesterday"},
    {"ts": None},
    {"ts": [1]},
    {"ts": {"s": 1}},
    {"ts": 4_102_444_801},
    {"ts": -0.5},
]

BAD: dict[type[Any], list[dict[str, Any]]] = {
    Heartbeat: [
        {"seq": -1}, {"seq": 2**53 + 1}, {"seq": 1.5}, {"seq": "many"}, {"seq": _DROP},
        {"uptime_s": -1}, {"uptime_s": 10 * 365 * 86400 + 1}, {"state": "OPEN"},
        {"state": "locked"}, {"state": 1}, {"camera": "broken"}, {"camera": None},
        {"clock_synced": "maybe"}, {"clock_synced": None}, {"clock_synced": [True]},
        {"fw": ""}, {"fw": "1 2"}, {"fw": "x" * 33}, {"fw": 12}, {"fw": _DROP},
    ],
    Status: [
        {"status": "maybe"}, {"status": "ONLINE"}, {"status": _DROP}, {"boot_id": ""},
        {"boot_id": "a/b"}, {"boot_id": "x" * 65}, {"boot_id": 7}, {"kind": "toaster"},
        {"fw": "v 1"},
    ],
    StateReport: [
        {"state": "UNKNOWN"}, {"since": -1}, {"since": _DROP}, {"armed_until": "soon"},
        {"view_until": -3}, {"look_id": "lk 1"}, {"look_id": ""}, {"last_seq": -1},
        {"last_seq": _DROP}, {"last_seq": 2**53 + 1},
    ],
    Ack: [
        {"jti": "a b"}, {"jti": "x" * 65}, {"jti": 5}, {"seq": -1}, {"cmd": "config"},
        {"cmd": "ARM"}, {"result": "ok"}, {"result": _DROP}, {"reason": "because"},
        {"state": "OFF"}, {"state": _DROP},
    ],
    Event: [
        {"kind": "party"}, {"kind": _DROP}, {"state": None}, {"look_id": "a.b"},
        {"staff": "nurse anna"}, {"staff": ""}, {"staff": "x" * 65}, {"staff": "anna\n"},
        {"staff": "anna/bertil"}, {"staff": 5}, {"staff": "ånna"}, {"reason": "Look_Cap"},
        {"reason": "x" * 33}, {"reason": "look-cap"}, {"duration_s": -0.1},
        {"duration_s": 86400.5}, {"duration_s": [60]},
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "changes"),
    [(m, c) for m in MODELS for c in COMMON_BAD + BAD[m]],
    ids=lambda x: x.__name__ if isinstance(x, type) else repr(x)[:40],
)
def test_wrong_values_refused(model: type[Any], changes: dict[str, Any]) -> None:
    with pytest.raises(MessageError) as info:
        decode(model, _payload(model, **changes))
    assert info.value.kind == model.__name__


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "payload",
    [b"", b"null", b"[]", b"1", b'"x"', b"{", b"\xff\xfe", b"{'ts': 1}", b"{}"],
)
def test_not_an_object_refused(model: type[Any], payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode(model, payload)


# Regression: _Message had strict=False, so lax coercion accepted wrong JSON types (numeric
# strings, true as a number, 1/"yes" as a bool) although the module promises "exactly right".
@pytest.mark.parametrize(
    "changes",
    [
        {"seq": "5"},
        {"ts": "1800000000"},
        {"ts": True},
        {"seq": True},
        {"clock_synced": "yes"},
        {"clock_synced": 1},
        {"uptime_s": "12.5"},
        {"seq": 5.0},
        {"fw": 1.2},
    ],
    ids=repr,
)
def test_lax_type_coercion_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(MessageError):
        decode(Heartbeat, _payload(Heartbeat, **changes))


def test_error_carries_model_and_field() -> None:
    with pytest.raises(MessageError) as info:
        decode(Heartbeat, _payload(Heartbeat, camera="broken"))
    assert info.value.kind == "Heartbeat"
    assert info.value.why.startswith("camera:")


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=MAX_PAYLOAD_BYTES + 10))
def test_arbitrary_bytes_only_ever_raise_message_error(payload: bytes) -> None:
    for model in MODELS:
        with contextlib.suppress(MessageError):
            decode(model, payload)


def test_messages_are_frozen() -> None:
    message = decode(Heartbeat, _payload(Heartbeat))
    with pytest.raises(ValidationError):
        message.seq = 4  # type: ignore[misc]


# --- device and staff ids -----------------------------------------------------------------

BAD_DEVICE_IDS = [
    "", "dev-", "dev-a", "dev--ab", "dev-Abc", "DEV-abc", "dev_abc", "dev-ab c", "dev-ab/c",
    "dev-ab+", "dev-ab#", "dev-ab\n", "\ndev-ab", " dev-ab", "dev-åäö", "tillsyn-fleet",
    "abc", "dev-" + "a" * 62, "dev-ab.c", "dev-ab\x00",
]  # fmt: skip


@pytest.mark.parametrize("device_id", BAD_DEVICE_IDS, ids=repr)
def test_bad_device_ids_refused_everywhere(device_id: str) -> None:
    assert not is_device_id(device_id)
    with pytest.raises(TopicError):
        device_topic(device_id, Channel.STATE)
    with pytest.raises(ValidationError):
        tk.arm(device_id, seq=1, now=1_800_000_000, until=1_800_000_600)


@settings(max_examples=100, deadline=None)
@given(device_id=st.from_regex(r"\Adev-[a-z0-9][a-z0-9-]{1,59}\Z"))
def test_device_ids_valid_for_topics_are_valid_token_audiences(device_id: str) -> None:
    assert is_device_id(device_id)
    claims = tk.arm(device_id, seq=1, now=1_800_000_000, until=1_800_000_600)
    assert claims.aud == device_id


# Regression: DEVICE_ID_PATTERN admitted 65 characters (4 + 1 + 60) while DeviceId capped
# max_length at 64, so a device with a valid 65-character id could never be sent a token.
def test_topics_and_tokens_agree_on_the_longest_device_id() -> None:
    longest = "dev-" + "a" * 60
    assert len(longest) == 64
    assert is_device_id(longest)
    assert tk.arm(longest, seq=1, now=1_800_000_000, until=1_800_000_600).aud == longest
    too_long = longest + "a"
    assert not is_device_id(too_long)
    with pytest.raises(TopicError):
        device_topic(too_long, Channel.CMD)
    with pytest.raises(ValidationError):
        tk.arm(too_long, seq=1, now=1_800_000_000, until=1_800_000_600)


@pytest.mark.parametrize("staff", ["nurse.anna", "A", "x" * 64, "a-b_c.d9"])
def test_good_staff_ids(staff: str) -> None:
    assert decode(Event, _payload(Event, staff=staff)).staff == staff


# --- topics -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(device_id=device_ids, channel=st.sampled_from(Channel))
def test_topic_round_trip(device_id: str, channel: Channel) -> None:
    topic = device_topic(device_id, channel)
    assert topic == f"tillsyn/v1/dev/{device_id}/{channel.value}"
    assert parse_device_topic(topic) == (device_id, channel)


@pytest.mark.parametrize(
    "topic",
    [
        "", "/", "tillsyn", "tillsyn/v1/dev", "tillsyn/v1/dev/dev-abc", "tillsyn/v1/dev/dev-abc/",
        "tillsyn/v1/dev/dev-abc/cmd/", "/tillsyn/v1/dev/dev-abc/cmd",
        "tillsyn/v1/dev/dev-abc/cmd/x", "tillsyn/v2/dev/dev-abc/cmd",
        "Tillsyn/v1/dev/dev-abc/cmd", "tillsyn/v1/fleet/dev-abc/cmd",
        "tillsyn/v1/dev/dev-abc/CMD", "tillsyn/v1/dev/dev-abc/config",
        "tillsyn/v1/dev/+/state", "tillsyn/v1/dev/#", "tillsyn/v1/dev/dev-abc/#",
        "$share/g/tillsyn/v1/dev/dev-abc/state", "tillsyn/v1/dev/dev-ABC/state",
        "tillsyn/v1/dev/tillsyn-fleet/state", "tillsyn/v1/dev/dev-abc /state",
        "tillsyn/v1/dev/dev-abc/state ", "tillsyn/v1/fleet/visits",
        "tillsyn//v1/dev/dev-abc/state", "tillsyn/v1/dev/dev-abc\n/state",
    ],
    ids=repr,
)  # fmt: skip
def test_bad_topics_refused(topic: str) -> None:
    with pytest.raises(TopicError) as info:
        parse_device_topic(topic)
    assert info.value.topic == topic


_PARTS = st.sampled_from(
    ["tillsyn", "v1", "dev", "dev-abc", "dev-a", "cmd", "state", "+", "#", "", "x", "DEV-abc"]
)


@settings(max_examples=300, deadline=None)
@given(topic=st.text() | st.lists(_PARTS, max_size=7).map("/".join))
def test_parse_never_raises_anything_but_topic_error(topic: str) -> None:
    try:
        device_id, channel = parse_device_topic(topic)
    except TopicError:
        return
    # Whatever it accepts is exactly a topic it would build.
    assert device_topic(device_id, channel) == topic


def test_subscriptions() -> None:
    assert subscription(Channel.STATE) == "tillsyn/v1/dev/+/state"
    assert subscription(Channel.HB, shared_group="fleet") == "$share/fleet/tillsyn/v1/dev/+/hb"
