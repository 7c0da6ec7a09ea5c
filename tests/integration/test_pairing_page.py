"""The technician's phone page, driven in a real headless Chromium (Playwright, the
Debian browser: no download), from a fresh agent to a live, armed-and-locked device."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.fleet_harness import wait_until
from tests.integration.pairing_support import run_pairing_env

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
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

playwright_api = pytest.importorskip("playwright.async_api")
if not shutil.which(CHROMIUM):
    pytest.skip("chromium is not installed (scripts/setup.sh --test)", allow_module_level=True)


@pytest.fixture
async def browser():
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def test_technician_pairs_a_fresh_device_on_the_phone_page(
    browser, make_harness, tmp_path: Path, pki_dir, mosquitto
) -> None:
    async with run_pairing_env(make_harness, tmp_path, pki_dir, mosquitto) as env:
        tech = await env.token("tech-page")
        agent = env.fresh_agent("SN-PAGE-0001")
        code = await agent.user_code()

        context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{env.api}/pair")
        assert await page.title() == "Parkoppla enhet · Pair a device"

        await page.get_by_text("Inloggning").click()
        await page.get_by_label("API-nyckel (tekniker)").fill(tech)
        await page.get_by_label("Koden som enheten visar").fill(code.lower())
        await page.get_by_role("button", name="Hämta enheten").click()
        serial = page.locator("#serial")
        await serial.wait_for(state="visible")
        assert await serial.inner_text() == "SN-PAGE-0001"
        assert await page.locator("#kind").inner_text() == "camera"
        await page.screenshot(path=str(tmp_path / "pair-confirm.png"), full_page=True)

        # Pairing without confirming the serial is refused on the page.
        await page.get_by_label("Brukare (pseudonym)").fill("res-page-1")
        await page.get_by_role("button", name="Parkoppla").click()
        assert "Bekräfta serienumret" in await page.locator("#error").inner_text()

        await page.get_by_label("Serienumret stämmer med etiketten").check()
        await page.get_by_role("button", name="Parkoppla").click()
        progress = page.locator("#progress")
        await progress.wait_for(state="visible")
        await page.screenshot(path=str(tmp_path / "pair-progress.png"), full_page=True)
        await page.locator('#progress[data-status="passed"]').wait_for(timeout=90_000)
        assert "Enheten är i drift" in await page.locator("#result").inner_text()
        for step in ("connected", "locked", "armed", "camera_on", "camera_off", "locked_again"):
            assert (
                await page.locator(f'#steps li[data-step="{step}"]').get_attribute("class") == "ok"
            ), step
        await page.screenshot(path=str(tmp_path / "pair-live.png"), full_page=True)
        assert errors == []

        device_id = await page.locator("#device-id").inner_text()
        assert device_id == agent.identity()["device_id"]
        record = await env.record(device_id)
        assert record is not None and record.state.value == "live"
        assert record.paired_by == "tech-page" and record.resident_id == "res-page-1"

        await env.h.add_window(device_id, start_in_s=2, duration_s=4)
        await wait_until(lambda: env.h.state_is(device_id, "ARMED"), timeout=15, what="ARMED")
        await wait_until(lambda: env.h.state_is(device_id, "LOCKED"), timeout=15, what="LOCKED")
        await context.close()
