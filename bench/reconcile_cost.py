"""Reconciliation cost per device on SQLite: the sweep, the window start storm, the ack storm.

    .venv/bin/python -m bench.reconcile_cost [--devices 10000]

N devices, each with an active care plan (22:00 and 02:00, 10-minute windows), online and
locked, in a throwaway SQLite database. Times ``FleetOps.reconcile`` for a quiet full
sweep, a pre-flight sweep, the 22:00 edge of every device (one call per device, as one
edge job per device did, and one call for all of them, as the coalesced edge job does),
and the devices' acks of those arms (one transaction per ack, and one per batch). Prints
ms per device. No broker: this is the database thread's share of the storm.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlmodel import select

from fleet import checks, signing
from fleet.core import FleetOps
from fleet.db import init_db, make_engine
from fleet.metrics import FleetMetrics
from fleet.models import Command, Connectivity, Device
from fleet.plan_models import CarePlan, PlanStatus
from fleet.reconcile import Policy
from tillsyn_protocol import Ack, AckResult, CameraHealth, LockState, StateReport
from tillsyn_protocol.windows import STOCKHOLM


def at(hh: int, mm: int = 0) -> float:
    return datetime(2027, 1, 11, hh, mm, tzinfo=STOCKHOLM).timestamp()


def build(root: Path, n: int) -> tuple[FleetOps, list[str]]:
    engine = make_engine(f"sqlite:///{root / 'bench.db'}")
    init_db(engine)
    key = signing.load_or_create(root / "key.pem")
    ops = FleetOps(engine, key, FleetMetrics(), Policy(arm_confirm_s=60, visit_horizon_s=3600))
    ids = [f"dev-bench-{i:06d}" for i in range(n)]
    with ops.session() as s:
        for i, d in enumerate(ids):
            s.add(
                Device(
                    id=d,
                    resident_id=f"res-{i}",
                    connectivity=Connectivity.ONLINE,
                    camera=CameraHealth.OK,
                    clock_synced=True,
                )
            )
        s.flush()
        for i, d in enumerate(ids):
            s.add(
                CarePlan(
                    resident_id=f"res-{i}",
                    device_id=d,
                    check_times="22:00,02:00",
                    window_s=600,
                    valid_from=date(2027, 1, 1),
                    consent_ref="x",
                    consent_date=date(2027, 1, 1),
                    status=PlanStatus.ACTIVE,
                    created_at=at(9),
                    updated_at=at(9),
                )
            )
    with ops.session() as s:  # materialise the checks (not timed)
        checks.ensure_synced(s, ops.check_ctx, at(12))
    return ops, ids


def timed(label: str, n: int, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    print(f"{label:<44} {dt:8.2f} s  {dt / n * 1000:7.3f} ms/device")
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=10_000)
    n = p.parse_args().devices
    logging.disable(logging.WARNING)  # one line per visit/check otherwise
    with tempfile.TemporaryDirectory() as tmp:
        ops, ids = build(Path(tmp), n)
        print(f"{n} devices, SQLite, {datetime.now(UTC):%Y-%m-%d}")
        timed("full sweep, nothing to do (20:00)", n, lambda: ops.reconcile(None, at(20)))
        timed("full sweep, pre-flight (21:35)", n, lambda: ops.reconcile(None, at(21, 35)))
        timed("full sweep, again (21:36)", n, lambda: ops.reconcile(None, at(21, 36)))
        half = n // 2
        t22 = at(22) + 0.5
        timed(
            f"22:00 edge, one call per device ({half})",
            half,
            lambda: [ops.reconcile([d], t22) for d in ids[:half]],
        )
        timed(
            f"22:00 edge, one call for all ({n - half})",
            n - half,
            lambda: ops.reconcile(ids[half:], t22),
        )
        arms = ops.run(
            lambda s: [(c.device_id, c.jti, c.seq, c.until) for c in s.exec(select(Command))]
        )

        def ack(jti: str) -> Ack:
            return Ack(jti=jti, ts=t22 + 1, result=AckResult.APPLIED, state=LockState.ARMED)

        def state(seq: int, until: float | None) -> StateReport:
            return StateReport(
                ts=t22 + 1, state=LockState.ARMED, since=t22 + 1, armed_until=until, last_seq=seq
            )

        first, rest = arms[:half], arms[half:]
        timed(
            f"acks + states, one transaction each ({len(first)})",
            len(first),
            lambda: [
                (ops.on_ack(d, ack(j), t22 + 1), ops.on_state(d, state(q, u), t22 + 1))
                for d, j, q, u in first
            ],
        )
        apply = getattr(ops, "apply_inbound", None)
        if apply is not None:
            from fleet.batch import Inbound

            items = []
            for d, j, q, u in rest:
                items.append(Inbound(d, ack(j), t22 + 1))
                items.append(Inbound(d, state(q, u), t22 + 1))
            timed(f"acks + states, one batch ({len(rest)})", len(rest), lambda: apply(items))
        timed("full sweep, all armed (22:02)", n, lambda: ops.reconcile(None, at(22, 2)))


if __name__ == "__main__":
    main()
