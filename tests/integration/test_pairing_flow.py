"""Pairing end to end: a factory-fresh agent (no certificate) to a live, armed-and-locked
device, through the CLI; real Mosquitto, real TLS (HTTPS enrollment, mutual-TLS MQTT)."""

from __future__ import annotations

import stat
import time
from datetime import date
from pathlib import Path

import pytest
from sqlmodel import Session, select

from fleet.inventory import CertStatus, DeviceCertificate
from fleet.plan_models import CarePlan
from tests.integration.fleet_harness import wait_until
from tests.integration.pairing_support import run_cli_async, run_pairing_env

pytestmark = pytest.mark.integration


async def test_fresh_agent_paired_through_the_cli_goes_live_then_arms_and_locks(
    make_harness, tmp_path: Path, pki_dir, mosquitto
) -> None:
    async with run_pairing_env(make_harness, tmp_path, pki_dir, mosquitto) as env:
        tech = await env.token("tech-anna")
        plan_id = await env.db(_draft_plan)
        agent = env.fresh_agent("SN-CLI-0001")
        code = await agent.user_code()
        assert len(code) == 9 and code[4] == "-"
        assert f"PAIRING CODE {code}" in agent.log()

        result = await run_cli_async(
            "pair",
            code,
            "--resident",
            "res-cli-1",
            "--serial",
            "SN-CLI-0001",
            "--site",
            "site-north",
            "--plan",
            str(plan_id),
            env={"TILLSYN_API": env.api, "TILLSYN_TOKEN": tech},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        device_id = agent.identity()["device_id"]
        assert f"{device_id} is live" in result.stdout
        for text in ("reports LOCKED", "camera on", "camera off", "LOCKED again"):
            assert text in result.stdout

        record = await env.record(device_id)
        assert record is not None and record.state.value == "live"
        assert (record.serial, record.resident_id, record.site) == (
            "SN-CLI-0001",
            "res-cli-1",
            "site-north",
        )
        assert record.paired_by == "tech-anna" and record.plan_id == str(plan_id)
        plan = await env.db(lambda s: s.get(CarePlan, plan_id))
        assert plan.device_id == device_id  # live for its plan
        # The private key exists only on the device, and only readable by it.
        identity = agent.identity()
        key = agent.state_dir / "identity" / f"key-{identity['generation']}.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert not (pki_dir.devices / f"{device_id}.key").exists()
        certs = await env.db(
            lambda s: s.exec(
                select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
            ).all()
        )
        assert [c.status for c in certs] == [CertStatus.ACTIVE]

        # Live for its resident: a window arms it and its end locks it again.
        start = await env.h.add_window(device_id, start_in_s=2, duration_s=4)
        await wait_until(lambda: env.h.state_is(device_id, "ARMED"), timeout=15, what="ARMED")
        device = await env.h.device(device_id)
        assert device.armed_until == pytest.approx(start + 4)
        await wait_until(lambda: env.h.state_is(device_id, "LOCKED"), timeout=15, what="LOCKED")


def _draft_plan(session: Session) -> int:
    """A care plan for the resident, not yet active (issue 3's model)."""
    now = time.time()
    plan = CarePlan(
        resident_id="res-cli-1",
        check_times="03:00",
        window_s=600,
        valid_from=date.today(),
        created_at=now,
        updated_at=now,
    )
    session.add(plan)
    session.flush()
    assert plan.id is not None
    return plan.id
