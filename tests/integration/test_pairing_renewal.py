"""Certificate renewal over the device's own mutual-TLS identity: a device whose
certificate passes its renewal point gets a new one, the old one is retired (revoked),
and an open window is not lost on the way."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from sqlmodel import select

from fleet.inventory import CertStatus, DeviceCertificate
from fleet.models import Look
from tests.integration.fleet_harness import wait_until
from tests.integration.pairing_support import pair_live, run_pairing_env
from tests.integration.test_pairing_lifecycle import broker_accepts

pytestmark = pytest.mark.integration

LIFETIME_S = 60
SHARE = 0.35  # renew about 21 s after issue


async def test_certificate_renewed_before_expiry_without_losing_the_window(
    make_harness, tmp_path: Path, pki_dir, mosquitto
) -> None:
    async with run_pairing_env(
        make_harness,
        tmp_path,
        pki_dir,
        mosquitto,
        cert_lifetime_s=LIFETIME_S,
        renew_share=SHARE,
    ) as env:
        agent, device_id = await pair_live(env, serial="SN-RENEW-1")
        first = agent.identity()
        assert first["generation"] == 1
        assert first["renew_after"] < first["not_after"] - 0.5 * LIFETIME_S
        keep = tmp_path / "gen1"
        keep.mkdir()
        for name in ("cert-1.pem", "key-1.pem"):
            shutil.copy(agent.state_dir / "identity" / name, keep / name)

        # A window that is open across the renewal point.
        start = await env.h.add_window(device_id, start_in_s=1, duration_s=90)
        await wait_until(lambda: env.h.state_is(device_id, "ARMED"), timeout=15, what="ARMED")
        assert time.time() < first["renew_after"], "armed too late to see the renewal"

        states: list[str] = []

        async def watch() -> None:
            while True:
                states.append((await env.h.device(device_id)).reported_state.value)
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        try:

            async def renewed() -> bool:
                ident = agent.identity()
                return ident["generation"] >= 2 and ident["confirmed"]

            await wait_until(renewed, timeout=LIFETIME_S, what="renewed and confirmed")

            def certs(session):
                stmt = select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
                return {c.serial: c for c in session.exec(stmt)}

            async def old_retired() -> bool:
                rows = await env.db(certs)
                return rows[first["serial"]].status is CertStatus.RETIRED

            await wait_until(old_retired, timeout=15, what="old certificate retired")
            now_ident = agent.identity()
            rows = await env.db(certs)
            assert rows[now_ident["serial"]].status is CertStatus.ACTIVE
            assert rows[first["serial"]].reason == "renewed"
            assert rows[now_ident["serial"]].not_after > first["not_after"]
            # The old generation is gone from the device, and the broker refuses it.
            assert not (agent.state_dir / "identity" / "key-1.pem").exists()
            agent_copy = type(agent)(agent.serial, tmp_path / "old", agent.proc)
            (tmp_path / "old" / "identity").mkdir(parents=True)
            for name in ("cert-1.pem", "key-1.pem"):
                shutil.copy(keep / name, tmp_path / "old" / "identity" / name)

            async def old_refused() -> bool:
                return not await asyncio.to_thread(
                    broker_accepts, mosquitto.port, pki_dir, agent_copy, 1
                )

            await wait_until(old_refused, timeout=10, what="old certificate refused")

            # Still armed, still in the same window, and still taking signed commands.
            look = await env.service.start_look(device_id, "nurse-renew", 2)

            async def looked() -> bool:
                row = await env.db(lambda s: s.get(Look, look.id))
                return bool(row and row.ended_at)

            await wait_until(looked, timeout=15, what="look after renewal")
        finally:
            watcher.cancel()
        assert time.time() < start + 90
        assert "LOCKED" not in states, "the window was lost during renewal"
        assert (await env.h.device(device_id)).reported_state.value == "ARMED"
        assert "new certificate" in agent.log() and "confirmed to the fleet" in agent.log()
