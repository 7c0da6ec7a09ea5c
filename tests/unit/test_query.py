"""fleet.query: IN lists padded to a few lengths select exactly what the plain list selects,
and a query of every length from 1 to 512 is at most ten SQL texts (each a statement the
driver keeps prepared), on both backends and on the device-message path."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlmodel import Session, col, select

from fleet.batch import Inbound
from fleet.db import make_engine
from fleet.models import Device
from fleet.query import MAX_PADDED, among, padded_length
from tests.unit.fleet_sim import T0, new_ops
from tillsyn_protocol import LockState, StateReport


@pytest.mark.parametrize(
    ("n", "padded"),
    [(0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (17, 32), (257, 512), (500, 512), (512, 512)],
)
def test_lengths_are_padded_to_the_next_power_of_two(n: int, padded: int) -> None:
    assert padded_length(n) == padded


def test_longer_lists_are_left_as_they_are() -> None:
    # Callers chunk at MAX_PADDED; a longer list is a one-off, not worth doubling.
    assert padded_length(MAX_PADDED + 1) == MAX_PADDED + 1
    assert padded_length(5000) == 5000


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    with Session(engine) as s:
        for i in range(40):
            s.add(Device(id=f"dev-{i:03d}"))
        s.commit()
    yield engine
    engine.dispose()


def _texts(engine: Engine) -> list[str]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    return seen


def test_padded_lists_select_what_the_plain_list_selects(engine: Engine) -> None:
    rng = random.Random(7)
    known = [f"dev-{i:03d}" for i in range(40)]
    with Session(engine) as s:
        assert s.exec(select(Device.id).where(among(Device.id, []))).all() == []
        for n in range(1, 60):
            # Known and unknown ids, duplicates included, in any order.
            ids = [rng.choice(known) if rng.random() < 0.7 else f"gone-{i}" for i in range(n)]
            padded = sorted(s.exec(select(Device.id).where(among(Device.id, ids))).all())
            plain = sorted(s.exec(select(Device.id).where(col(Device.id).in_(ids))).all())
            assert padded == plain, n


def test_every_length_up_to_the_chunk_is_at_most_ten_statements(engine: Engine) -> None:
    texts = _texts(engine)
    with Session(engine) as s:
        for n in range(1, MAX_PADDED + 1):
            ids = [f"dev-{i:03d}" for i in range(n)]
            assert len(s.exec(select(Device.id).where(among(Device.id, ids))).all()) == min(n, 40)
    assert len(set(texts)) <= 10


def test_device_message_batches_of_any_size_reuse_their_statements(tmp_path: Path) -> None:
    """Batches of 1-40 state reports: each query of the path has at most one text per
    padded length (seven here), where a plain IN list had one per batch size."""
    ops = new_ops(tmp_path, tmp_path / "key.pem")
    ids = [f"dev-{i:03d}" for i in range(40)]
    with ops.session() as s:
        for d in ids:
            s.add(Device(id=d, resident_id=f"res-{d}"))
    texts = _texts(ops.engine)
    now = T0
    for n in range(1, 41):
        now += 1
        report = StateReport(
            ts=now, state=LockState.LOCKED, since=now, armed_until=None, last_seq=0
        )
        ops.apply_inbound([Inbound(d, report, now) for d in ids[:n]])
    variants: dict[str, set[str]] = defaultdict(set)
    for text in texts:
        if " IN (" in text:
            variants[re.sub(r"IN \([^)]*\)", "IN (...)", text)].add(text)
    assert variants, "the path looked its devices up by IN lists"
    assert max(len(v) for v in variants.values()) <= 7
