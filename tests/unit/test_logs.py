"""Structured logs: one JSON object per line, bounded, no tracebacks, no sender text."""

from __future__ import annotations

import json
import logging

import pytest

from tillsyn_cli import logs
from tillsyn_protocol import Heartbeat, MessageError, decode


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord("fleet.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_a_log_line_is_one_bounded_json_object_without_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        record = _record("device=%s %s", "dev-1", "x" * 2000, exc=exc)
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "fleet.test"
    assert entry["msg"].startswith("device=dev-1 ") and len(entry["msg"]) == 500
    assert entry["error"] == "ValueError: boom"
    assert "Traceback" not in line


def test_setup_chooses_json_lines() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup(1, json_lines=True)
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        assert root.level == logging.INFO
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_a_rejected_message_never_echoes_the_senders_field_names() -> None:
    payload = json.dumps(
        {
            "v": 1,
            "ts": 1.0,
            "seq": 1,
            "uptime_s": 1,
            "state": "LOCKED",
            "camera": "ok",
            "clock_synced": True,
            "fw": "1",
            "res-4711": "x",
        }
    ).encode()
    with pytest.raises(MessageError) as info:
        decode(Heartbeat, payload)
    assert "res-4711" not in str(info.value)
    assert info.value.why.startswith("payload:")
