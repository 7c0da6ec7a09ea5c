"""Whole nights with nobody watching, in seconds: the fleet service, a real Mosquitto
(production config, mutual TLS) and real agents on one simulated clock.

Asserted check by check: windows opened and closed, looks, outcomes, rechecks, the
escalation chain, a device dying mid-night, an opt-out night, a hospital pause, the
coverage report; and both Europe/Stockholm DST nights of 2027.
"""

from __future__ import annotations

from datetime import date

import pytest
from sqlmodel import select

from fleet.models import CommandStatus, VisitCause
from fleet.plan_models import CheckState, EscalationStep, StepStatus
from tests.integration.fleet_harness import wait_until
from tests.integration.sim_night import Night, local, simulated_night
from tillsyn_protocol import CommandKind

pytestmark = pytest.mark.integration

NIGHT = date(2027, 2, 8)  # a Monday in winter (CET)


def plan_body(resident: str, device: str, times: list[str], **over: object) -> dict[str, object]:
    return {
        "resident_id": resident,
        "device_id": device,
        "team": "north",
        "check_times": times,
        "window_s": 600,
        "look_s": 2,
        "recheck_delay_s": 1200,
        "call_timeout_s": 60,
        "valid_from": "2027-01-01",
        "consent_ref": f"DNR-{resident}",
        "consent_date": "2026-12-20",
        "activate": True,
        "reason": "care decision 2027",
    } | over


async def states(n: Night, device: str) -> dict[tuple[str, str], str]:
    return {
        (c.agreed, c.kind.value): c.state.value for c in await n.checks(device) if c.night == NIGHT
    }


async def test_a_whole_night_unattended(tmp_path, pki_dir, mosquitto, device_cert) -> None:
    async with simulated_night(
        local("2027-02-08 21:40"), tmp_path, pki_dir, mosquitto.port, device_cert
    ) as n:
        residents = {
            "dev-na": "res-a",
            "dev-nb": "res-b",
            "dev-nc": "res-c",
            "dev-nd": "res-d",
            "dev-ne": "res-e",
        }
        plan_ids = {}
        for device, resident in residents.items():
            await n.device(device, resident)
            extra = {"visit_on_opt_out": True} if device == "dev-nd" else {}
            plan = await n.call(
                "it",
                "POST",
                "/api/plans",
                json=plan_body(resident, device, ["22:00", "02:00"], **extra),
            )
            plan_ids[device] = plan["id"]
            await n.start_agent(device, look_cap_s=60)
        # D opts out of tonight (night staff records it); E is in hospital all night.
        await n.call(
            "night",
            "POST",
            f"/api/plans/{plan_ids['dev-nd']}/opt-outs",
            json={"night": NIGHT.isoformat(), "reason": "guests"},
        )
        await n.call(
            "it",
            "POST",
            f"/api/plans/{plan_ids['dev-ne']}/pauses",
            json={
                "start": "2027-02-08T20:00",
                "end": "2027-02-09T10:00",
                "kind": "hospital",
                "reason": "admitted",
            },
        )
        for device in residents:
            await n.wait_state(device, "LOCKED")

            async def online(d: str = device) -> bool:
                return (await n.dev(d)).connectivity.value == "online"

            await wait_until(online, timeout=20, what=f"{device} online")
        tonight = await n.call("night", "GET", "/api/checks", params={"night": "2027-02-08"})
        assert {(c["device_id"], c["agreed"], c["state"]) for c in tonight} == {
            *(
                (d, t, "upcoming")
                for d in ("dev-na", "dev-nb", "dev-nc")
                for t in ("22:00", "02:00")
            ),
            ("dev-nd", "22:00", "opted_out"),
            ("dev-nd", "02:00", "opted_out"),
            ("dev-ne", "22:00", "paused"),
            ("dev-ne", "02:00", "paused"),
        }

        # 22:00 -------------------------------------------------------------------------
        n.clock.jump_to(local("2027-02-08 21:59:58"))
        for device in ("dev-na", "dev-nb", "dev-nc"):
            await n.wait_state(device, "ARMED")
        assert n.clock() >= local("2027-02-08 22:00") - 0.5, "armed before the window"
        await n.look_and_record("dev-na", "22:00", "seen")
        await n.look_and_record("dev-nb", "22:00", "not_seen", who="night2")
        await n.look_and_record("dev-nc", "22:00", "seen")
        for device in ("dev-na", "dev-nc"):  # an outcome closes the window at once
            await n.wait_state(device, "LOCKED")
        recheck = await n.check("dev-nb", "22:00", "recheck")
        assert recheck.end_at - recheck.start_at == 600
        assert recheck.start_at < local("2027-02-08 22:21")  # within the 20 min delay
        # 22:1x: the recheck window; still not seen -> call task.
        n.clock.jump_to(recheck.start_at - 1)
        await n.wait_state("dev-nb", "ARMED")
        await n.look_and_record("dev-nb", "22:00", "not_seen", kind="recheck")
        await n.wait_state("dev-nb", "LOCKED")

        async def steps() -> list[EscalationStep]:
            return await n.q(lambda s: list(s.exec(select(EscalationStep)).all()))

        assert [(s.action, s.status) for s in await steps()] == [("call", StepStatus.OPEN)]
        listed = await n.call("night", "GET", "/api/escalations")
        assert [x["action"] for x in listed] == ["call"]

        # 23:00: nobody made the call (the chain moves on to a visit); C's device dies.
        n.clock.jump_to(local("2027-02-08 23:00"))

        async def chain_done() -> bool:
            return [s.action for s in await steps()] == ["call", "visit"]

        await wait_until(chain_done, timeout=20, what="escalation to a visit")
        await n.agents["dev-nc"].die()

        async def c_offline() -> bool:
            return (await n.dev("dev-nc")).connectivity.value == "offline"

        await wait_until(c_offline, timeout=45, what="dev-nc offline by heartbeat silence")

        # 01:25: pre-flight (30 min ahead) has not fired; 01:30 it has, for C only.
        n.clock.jump_to(local("2027-02-09 01:31"))

        async def c_visit() -> list:
            return [v for v in await n.visits() if v.device_id == "dev-nc"]

        (c_v,) = await wait_until(c_visit, timeout=20, what="visit for dev-nc")
        assert c_v.cause is VisitCause.DEVICE_OFFLINE
        assert c_v.due_at == local("2027-02-09 02:00")
        assert c_v.raised_at < local("2027-02-09 01:40")  # before the window, not at it

        # 02:00 -------------------------------------------------------------------------
        n.clock.jump_to(local("2027-02-09 01:59:58"))
        for device in ("dev-na", "dev-nb"):
            await n.wait_state(device, "ARMED")
        await n.look_and_record("dev-na", "02:00", "seen")
        await n.look_and_record("dev-nb", "02:00", "seen")
        n.clock.jump_to(local("2027-02-09 02:10:02"))
        await n.sweeps_after_now(2)

        # The night, check by check.
        assert await states(n, "dev-na") == {
            ("22:00", "scheduled"): "seen",
            ("02:00", "scheduled"): "seen",
        }
        assert await states(n, "dev-nb") == {
            ("22:00", "scheduled"): "recheck_due",
            ("22:00", "recheck"): "escalated",
            ("02:00", "scheduled"): "seen",
        }
        assert await states(n, "dev-nc") == {
            ("22:00", "scheduled"): "seen",
            ("02:00", "scheduled"): "visit",
        }
        assert set((await states(n, "dev-nd")).values()) == {"opted_out"}
        assert set((await states(n, "dev-ne")).values()) == {"paused"}
        # Who looked and who recorded: the staff behind each token.
        b_first = await n.check("dev-nb", "22:00")
        assert (b_first.outcome_by, b_first.looks) == ("night2", 1)
        # Opted-out and paused devices were never armed; each armed window armed once.
        for device in ("dev-nd", "dev-ne"):
            assert [c for c in await n.commands(device) if c.kind is CommandKind.ARM] == []
        for device, applied in (("dev-na", 2), ("dev-nb", 3), ("dev-nc", 1)):
            arms = [c for c in await n.commands(device) if c.kind is CommandKind.ARM]
            assert len({c.until for c in arms}) == len(arms)  # never two for one window
            done = [c for c in arms if c.status is CommandStatus.APPLIED]
            assert len(done) == applied, (device, arms)  # C's 02:00 arm expired unheard
        causes = sorted((v.device_id or "", v.cause.value) for v in await n.visits())
        assert causes == [
            ("dev-nb", "not_seen_twice"),
            ("dev-nc", "device_offline"),
            ("dev-nd", "opted_out"),
        ]
        listed = await n.call(
            "night", "GET", "/api/nights/2027-02-08/visits", params={"team": "north"}
        )
        assert len(listed) == 3 and {v["team"] for v in listed} == {"north"}

        # Next day after noon: the coverage report of the night, stored once.
        n.clock.jump_to(local("2027-02-09 12:06"))

        async def report() -> list:
            rows = await n.call("it", "GET", "/api/coverage/reports")
            return [r for r in rows if r["night"] == "2027-02-08"]

        (rep,) = await wait_until(report, timeout=20, what="coverage report")
        assert rep["checks"] == 6 and not rep["ok"]
        assert [(p["resident_id"], p["kind"]) for p in rep["problems"]] == [("res-c", "device")]


async def test_spring_forward_night_2027(tmp_path, pki_dir, mosquitto, device_cert) -> None:
    """02:00 does not exist on 2027-03-28: it still gets one check, after 03:00's."""
    async with simulated_night(
        local("2027-03-28 01:40"), tmp_path, pki_dir, mosquitto.port, device_cert
    ) as n:
        await n.device("dev-spring", "res-s")
        await n.call(
            "it", "POST", "/api/plans", json=plan_body("res-s", "dev-spring", ["02:00", "03:00"])
        )
        await n.start_agent("dev-spring")
        await n.wait_state("dev-spring", "LOCKED")
        rows = [c for c in await n.checks("dev-spring") if c.night == date(2027, 3, 27)]
        starts = {c.agreed: (c.start_at, c.shift) for c in rows}
        three = local("2027-03-28 03:00")  # CEST: one real hour after 01:59:59 CET + 1 s
        assert starts == {"03:00": (three, "none"), "02:00": (three + 600, "dst_collision")}
        for agreed, start in (("03:00", three), ("02:00", three + 600)):
            n.clock.jump_to(start - 2)
            await n.wait_state("dev-spring", "ARMED")
            assert (await n.dev("dev-spring")).armed_until == start + 600
            await n.look_and_record("dev-spring", agreed, "seen")
            await n.wait_state("dev-spring", "LOCKED")
        arms = [c.until for c in await n.commands("dev-spring") if c.kind is CommandKind.ARM]
        assert arms == [three + 600, three + 1200]  # exactly one per agreed time


async def test_fall_back_night_2027(tmp_path, pki_dir, mosquitto, device_cert) -> None:
    """02:30 happens twice on 2027-10-31: one check, at the first; none at the second."""
    async with simulated_night(
        local("2027-10-31 02:10"), tmp_path, pki_dir, mosquitto.port, device_cert
    ) as n:
        await n.device("dev-fall", "res-f")
        await n.call(
            "it",
            "POST",
            "/api/plans",
            json=plan_body(
                "res-f", "dev-fall", ["02:30"], window_s=1800, escalate_unrecorded=False
            ),
        )
        await n.start_agent("dev-fall")
        await n.wait_state("dev-fall", "LOCKED")
        first = local("2027-10-31 02:30")  # fold=0: summer time, 00:30 UTC
        (check,) = [c for c in await n.checks("dev-fall") if c.night == date(2027, 10, 30)]
        assert check.start_at == first and check.end_at == first + 1800  # 30 real minutes
        n.clock.jump_to(first - 2)
        await n.wait_state("dev-fall", "ARMED")
        # Nobody looks. The window still closes on time (the clock says 02:00 again then).
        n.clock.jump_to(first + 1800 - 1)
        await n.wait_state("dev-fall", "LOCKED")
        # The second 02:30 (winter time, one real hour after the first): no second check.
        n.clock.jump_to(first + 3600 - 2)
        await n.sweeps_after_now(3)
        n.clock.jump_to(first + 3600 + 5)
        await n.sweeps_after_now(3)
        assert (await n.dev("dev-fall")).reported_state.value == "LOCKED"
        arms = [c for c in await n.commands("dev-fall") if c.kind is CommandKind.ARM]
        assert len(arms) == 1
        (check,) = [c for c in await n.checks("dev-fall") if c.night == date(2027, 10, 30)]
        assert check.state is CheckState.MISSED and check.unrecorded  # flagged, per plan
