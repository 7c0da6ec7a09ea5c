"""End to end in a real headless Chromium (Debian's, driven by Playwright): a night nurse
logs in with password and TOTP, sees tonight's checks, starts a look on a real agent over
a real broker, records "not seen", sees the recheck appear, looks again and records "seen".
Also: first-login enrolment with the QR code, and screenshots at a phone's size."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
import pytest_asyncio
from sqlmodel import Session, select

from fleet import accounts, auth
from fleet.auth import Principal, Role
from fleet.models import AuditEvent, Device
from fleet.plan_models import Check, CheckKind
from fleet.plan_rules import load_tz, night_at
from tests.integration.fleet_harness import Harness, local_hms, wait_until

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
PASSWORD = "a night nurse's password"
SHOTS = Path(os.environ.get("TILLSYN_SCREENSHOTS", "var/screenshots"))


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup.sh --test (installs Debian chromium)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield b
        finally:
            await b.close()


def add_staff(h: Harness, staff_id: str, role: Role, teams: list[str], enrol: bool) -> str | None:
    """An account with a password; with ``enrol`` also a TOTP secret (enrolled a minute ago)."""
    service = h.service
    now = time.time()
    with Session(service.engine) as s:
        accounts.set_roles(s, staff_id, [role], teams, now=now, actor="test")
        accounts.set_password(s, staff_id, PASSWORD, now=now, actor="test")
        secret = None
        if enrol:
            secret = accounts.begin_enrolment(s, staff_id, service.totp_box).secret
            code = pyotp.TOTP(secret).at(now - 60)
            assert not accounts.confirm_enrolment(
                s, staff_id, code, service.totp_box, now=now - 60, policy=accounts.Policy()
            )
        s.commit()
    return secret


async def log_in(page: Any, base: str, staff_id: str, secret: str) -> None:
    await page.goto(base + "/night")
    assert "/login" in page.url
    await page.get_by_label("Användar-id").fill(staff_id)
    await page.get_by_label("Lösenord").fill(PASSWORD)
    await page.get_by_role("button", name="Fortsätt").click()
    await page.wait_for_url("**/login/totp**")
    await page.get_by_label("Kod").fill(pyotp.TOTP(secret).now())
    await page.get_by_role("button", name="Logga in").click()
    await page.wait_for_url("**/night")


def shot(name: str) -> str:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return str(SHOTS / f"{name}.png")


async def test_night_nurse_looks_not_seen_recheck_seen(make_harness, browser) -> None:
    device_id = "dev-web-1"
    async with make_harness() as h:
        service = h.service
        await service.register_device(Device(id=device_id, resident_id="res-web1", team="north"))
        h.agent(device_id, heartbeat_s=1, look_cap_s=60)

        async def online() -> bool:
            return (await h.device(device_id)).connectivity.value == "online"

        await wait_until(online, timeout=15, what="agent online")
        # A check a little ahead, so the nurse sees it go from upcoming to open live.
        hms, start = local_hms(20)
        tz = load_tz(service.settings.tz)
        tonight: date = night_at(datetime.fromtimestamp(start, UTC), tz)
        admin = Principal("it-web", frozenset({Role.IT_ADMIN}), frozenset())
        plan = await service.plans.create_plan(
            {
                "resident_id": "res-web1",
                "device_id": device_id,
                "team": "north",
                "check_times": [hms],
                "window_s": 240,
                "look_s": 3,
                "recheck_delay_s": 120,
                "valid_from": tonight - timedelta(days=1),
                "consent_ref": "DNR-E2E-1",
                "consent_date": tonight - timedelta(days=7),
            },
            admin,
            "browser test",
            True,
        )

        def the_checks(s: Session) -> list[Check]:
            stmt = select(Check).where(Check.plan_id == plan["id"]).order_by(Check.id)
            return list(s.exec(stmt).all())

        checks = await service.db(service.ops.run, the_checks)
        first = next(c for c in checks if c.start_at == pytest.approx(start, abs=1))
        secret = add_staff(h, "nurse-web", Role.NIGHT_STAFF, ["north"], enrol=True)
        assert secret is not None
        base = f"http://127.0.0.1:{service.settings.api_port}"

        page = await browser.new_page(viewport=PHONE, locale="sv-SE")
        await log_in(page, base, "nurse-web", secret)
        card = page.locator(f"#check-{first.id}")
        await card.wait_for()
        assert "res-web1" in await card.inner_text()
        assert await page.locator(f"#look-{first.id}").count() == 0, "look offered before window"
        await page.screenshot(path=shot("night-upcoming"), full_page=True)

        # The window opens and the device arms; the button appears without a reload.
        url_before = page.url
        await page.locator(f"#look-{first.id}").wait_for(timeout=40_000)
        assert page.url == url_before
        await wait_until(lambda: h.state_is(device_id, "ARMED"), timeout=15, what="ARMED")
        await page.locator(f"#look-{first.id}").click()
        await page.wait_for_url("**/night?ok=look*")
        await wait_until(lambda: h.state_is(device_id, "VIEWING"), timeout=10, what="VIEWING")
        await page.screenshot(path=shot("night-looked"), full_page=True)

        await page.locator(f"#notseen-{first.id}").click()
        await page.wait_for_url("**/night?ok=outcome*")
        rechecks = [
            c
            for c in await service.db(service.ops.run, the_checks)
            if c.kind is CheckKind.RECHECK and c.parent_id == first.id
        ]
        assert len(rechecks) == 1
        recheck = rechecks[0]
        assert "Inte sedd" in await page.locator(f"#check-{first.id} .badge").inner_text()
        await page.locator(f"#check-{recheck.id}").wait_for()
        assert "Omkontroll" in await page.locator(f"#check-{recheck.id}").inner_text()
        await page.screenshot(path=shot("night-recheck"), full_page=True)

        # The first look has ended on the device (3 s cap): look again and record "seen".
        await wait_until(lambda: h.state_is(device_id, "ARMED"), timeout=15, what="re-ARMED")
        await page.locator(f"#look-{recheck.id}").click()
        await page.wait_for_url("**/night?ok=look*")
        await page.locator(f"#seen-{recheck.id}").click()
        await page.wait_for_url("**/night?ok=outcome*")
        badge = await page.locator(f"#check-{recheck.id} .badge").inner_text()
        assert badge.strip() == "Sedd"

        def log(s: Session) -> list[tuple[str, str]]:
            rows = s.exec(select(AuditEvent).order_by(AuditEvent.id)).all()
            return [(e.actor, e.action) for e in rows]

        entries = await service.db(service.ops.run, log)
        assert ("nurse-web", "login") in entries
        assert entries.count(("nurse-web", "look.requested")) == 2
        assert entries.count(("nurse-web", "check.outcome")) == 2
        await page.close()


async def test_first_login_enrols_the_authenticator_then_pages_at_phone_size(
    make_harness, browser
) -> None:
    async with make_harness() as h:
        base = f"http://127.0.0.1:{h.service.settings.api_port}"
        add_staff(h, "aud-web", Role.AUDITOR, [], enrol=False)
        with Session(h.service.engine) as s:
            s.add(Device(id="dev-web-2", resident_id="res-web2", team="north"))
            s.commit()
        page = await browser.new_page(viewport=PHONE, locale="sv-SE")
        await page.goto(base + "/login?lang=en")
        await page.screenshot(path=shot("login"), full_page=True)
        await page.get_by_label("Staff id").fill("aud-web")
        await page.get_by_label("Password").fill(PASSWORD)
        await page.keyboard.press("Enter")  # keyboard only
        await page.wait_for_url("**/login/enrol**")
        assert await page.locator("figure.qr svg").count() == 1
        await page.screenshot(path=shot("enrol"), full_page=True)
        secret = (await page.locator("#secret").inner_text()).replace(" ", "")
        await page.get_by_label("Code", exact=True).fill(pyotp.TOTP(secret).now())
        await page.get_by_role("button", name="Activate").click()
        await page.wait_for_url("**/audit")
        assert "The chain is intact" in await page.content()
        await page.screenshot(path=shot("audit-log"), full_page=True)
        await page.goto(base + "/audit/followup")
        await page.screenshot(path=shot("followup"), full_page=True)
        await page.get_by_role("button", name="Draw sample").click()
        await page.wait_for_url("**/audit/followup/1")
        await page.screenshot(path=shot("followup-sample"), full_page=True)
        await page.goto(base + "/audit/resident?resident=res-web2")
        assert "No looks in the log" in await page.content()
        await page.screenshot(path=shot("resident-extract"), full_page=True)
        await page.goto(base + "/night")
        assert "You may not open this page" in await page.content()
        await page.close()

        # The technician: password, code, and the device list of their area.
        tech_secret = add_staff(h, "tech-web", Role.TECHNICIAN, ["north"], enrol=True)
        assert tech_secret is not None
        page = await browser.new_page(viewport=PHONE, locale="sv-SE")
        await page.goto(base + "/login")
        await page.get_by_label("Användar-id").fill("tech-web")
        await page.get_by_label("Lösenord").fill(PASSWORD)
        await page.get_by_role("button", name="Fortsätt").click()
        await page.wait_for_url("**/login/totp**")
        await page.screenshot(path=shot("totp"), full_page=True)
        await page.get_by_label("Kod").fill(pyotp.TOTP(tech_secret).now())
        await page.get_by_role("button", name="Logga in").click()
        await page.wait_for_url("**/tech")
        assert "dev-web-2" in await page.content()
        await page.screenshot(path=shot("tech"), full_page=True)
        await page.close()
        with Session(h.service.engine) as s:
            assert s.get(accounts.StaffCredential, "aud-web").totp_enrolled_at is not None  # type: ignore[union-attr]
            assert s.get(auth.StaffAccount, "tech-web") is not None
