"""firmware_agent.sim_fleet.register_in_db: what the benchmarks' fleets start from."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlmodel import Session, select

from firmware_agent.sim_fleet import register_in_db
from fleet import checks
from fleet.db import make_engine
from fleet.metrics import FleetMetrics
from fleet.models import Window
from fleet.plan_models import Check

TZ = "Europe/Stockholm"


def test_devices_on_care_plans_get_a_check_at_the_window_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    soon = datetime.now(ZoneInfo(TZ)).replace(microsecond=0) + timedelta(minutes=10)
    ids = ["dev-sim-000000", "dev-sim-000001"]
    window = (soon.strftime("%H:%M:%S"), 1800)
    assert register_in_db(url, ids, window=window, tz=TZ, care_plans=True) == 2
    assert register_in_db(url, ids, window=window, tz=TZ, care_plans=True) == 0  # known
    engine = make_engine(url)
    with Session(engine) as s:
        assert s.exec(select(Window)).all() == []  # no legacy windows
        checks.ensure_synced(s, checks.Ctx(FleetMetrics(), 1800.0), time.time())
        s.commit()
        planned = s.exec(select(Check).where(Check.start_at == soon.timestamp())).all()
        assert sorted(c.device_id or "" for c in planned) == ids
        assert all(c.end_at == soon.timestamp() + 1800 for c in planned)
    engine.dispose()
