"""Video phones: a look is a call the resident must answer; not answered counts as not
seen; the phone rings only for a signed look, never on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import col, select

from fleet.inventory import CommissioningRun
from fleet.models import AuditEvent, Look
from tests.integration.fleet_harness import wait_until
from tests.integration.pairing_support import pair_live, run_pairing_env

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("answers", [True, False], ids=["answered", "not_answered"])
async def test_a_look_on_a_video_phone_is_a_call_the_resident_answers_or_not(
    make_harness, tmp_path: Path, pki_dir, mosquitto, answers: bool
) -> None:
    camera = f'type = "simulated"\nanswer_calls = {"true" if answers else "false"}\n'
    async with run_pairing_env(make_harness, tmp_path, pki_dir, mosquitto) as env:
        agent, device_id = await pair_live(
            env, serial=f"SN-PHONE-{answers}", kind="video_phone", camera=camera, look_cap_s=3
        )
        record = await env.record(device_id)
        assert record is not None and record.kind.value == "video_phone"
        run = await env.db(
            lambda s: s.exec(
                select(CommissioningRun).where(CommissioningRun.device_id == device_id)
            ).one()
        )
        steps = {s["step"]: s for s in run.step_list()}
        assert steps["camera_on"]["call"] is True
        assert steps["camera_off"]["answered"] is answers

        await env.h.add_window(device_id, start_in_s=1, duration_s=30)
        await wait_until(lambda: env.h.state_is(device_id, "ARMED"), timeout=15, what="ARMED")
        look = await env.service.start_look(device_id, "nurse-phone", 3)

        async def outcome() -> Look | None:
            row = await env.db(lambda s: s.get(Look, look.id))
            return row if row is not None and row.answered is not None else None

        row = await wait_until(outcome, timeout=15, what="call outcome")
        assert row.answered is answers  # False: the resident was not seen
        action = "look.call_answered" if answers else "look.call_not_answered"
        entries = await env.db(
            lambda s: s.exec(
                select(AuditEvent).where(
                    AuditEvent.action == action, col(AuditEvent.subject) == device_id
                )
            ).all()
        )
        assert {e.actor for e in entries} == {"tech-default", "nurse-phone"}
        # It rang exactly for the two signed looks (commissioning, nurse), never by itself.
        calls = [line for line in agent.log().splitlines() if "call for look" in line]
        assert len(calls) == 2
