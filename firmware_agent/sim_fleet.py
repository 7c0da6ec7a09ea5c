"""Making simulated devices known to a fleet: over its HTTP API, or into its database.

The API is the real path (``tillsyn sim --register URL --token T``): one ``POST
/api/devices`` per device (there is no bulk endpoint), a few in flight at once; a device
that already exists (409) counts as registered, so a second run is cheap.

:func:`register_in_db` is for benchmarks that start the fleet themselves: rows go straight
into the database, with no audit entries, before the fleet service starts (a running
service only learns of devices it registered itself).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from fleet.plan_models import CarePlan

__all__ = ["RegistrationError", "register_in_db", "register_over_api", "resident_for"]


class RegistrationError(Exception):
    pass


def resident_for(device_id: str) -> str:
    """A pseudonymous resident per simulated device (``dev-sim-000001`` -> ``res-sim-000001``)."""
    return "res-" + device_id.removeprefix("dev-")


async def register_over_api(
    url: str,
    token: str,
    ids: Sequence[str],
    *,
    team: str | None = None,
    concurrency: int = 16,
    timeout_s: float = 30.0,
) -> Counter[str]:
    """Register ``ids`` at the fleet's API; returns counts ``created`` and ``existing``."""
    counts: Counter[str] = Counter()
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as c:

        async def one(device_id: str) -> None:
            body: dict[str, str] = {"id": device_id, "resident_id": resident_for(device_id)}
            if team:
                body["team"] = team
            async with limit:
                response = await c.post("/api/devices", json=body)
            if response.status_code == 201:
                counts["created"] += 1
            elif response.status_code == 409:
                counts["existing"] += 1
            else:
                raise RegistrationError(
                    f"registering {device_id}: HTTP {response.status_code} {response.text[:200]}"
                )

        await asyncio.gather(*(one(i) for i in ids))
    return counts


def register_in_db(
    database_url: str,
    ids: Sequence[str],
    *,
    window: tuple[str, int] | None = None,
    tz: str = "Europe/Stockholm",
    care_plans: bool = False,
) -> int:
    """Benchmarks: insert the devices missing from the fleet's database (schema created if
    needed), each new one with a daily ``window`` (local ``HH:MM:SS``, seconds) if given:
    a legacy window row, or with ``care_plans`` an active care plan with one check a night
    at that time (its checks are planned by the fleet's first sweep). Returns how many were
    added. No audit entries: run it before the fleet service starts."""
    from sqlmodel import Session, col, select

    from fleet.db import init_db, make_engine
    from fleet.models import Device, Window

    engine = make_engine(database_url)
    init_db(engine)
    try:
        with Session(engine) as session:
            known = set(session.exec(select(Device.id).where(col(Device.id).in_(ids))).all())
            new = [i for i in ids if i not in known]
            session.add_all(Device(id=i, resident_id=resident_for(i)) for i in new)
            session.flush()
            if window is not None and care_plans:
                session.add_all(_care_plan(i, window, tz) for i in new)
            elif window is not None:
                start, duration = window
                session.add_all(
                    Window(device_id=i, start_local=start, duration_s=duration, tz=tz) for i in new
                )
            session.commit()
    finally:
        engine.dispose()
    return len(new)


def _care_plan(device_id: str, window: tuple[str, int], tz: str) -> CarePlan:
    from fleet.plan_models import CarePlan, PlanStatus

    now = time.time()
    start, duration = window
    return CarePlan(
        resident_id=resident_for(device_id),
        device_id=device_id,
        tz=tz,
        check_times=start,
        window_s=duration,
        valid_from=date.today() - timedelta(days=1),
        consent_ref="bench",
        consent_date=date.today() - timedelta(days=1),
        status=PlanStatus.ACTIVE,
        created_at=now,
        updated_at=now,
        activated_at=now - 86400,
    )
