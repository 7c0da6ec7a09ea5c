"""Staff pages over HTTP (in-process): login with password + TOTP, enrolment, lockout,
logout, each role's pages, languages, escaping. The browser run is tests/e2e."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pyotp
import pytest_asyncio
from prometheus_client import CollectorRegistry
from sqlmodel import Session, select

from fleet import accounts, audit
from fleet.api import create_app
from fleet.auth import Role
from fleet.config import FleetSettings
from fleet.models import AuditEvent, Device, Look
from fleet.service import FleetService
from tillsyn_protocol.windows import STOCKHOLM

PASSWORD = "night shift password"


class Site:
    def __init__(self, service: FleetService, app: object) -> None:
        self.service = service
        self.app = app
        self.secrets: dict[str, str] = {}

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
        return httpx.AsyncClient(transport=transport, base_url="http://fleet.test")

    def code(self, staff_id: str, at: float | None = None) -> str:
        return pyotp.TOTP(self.secrets[staff_id]).at(at or time.time())


@pytest_asyncio.fixture
async def site(tmp_path: Path, database_url: str) -> AsyncIterator[Site]:
    settings = FleetSettings(
        database_url=database_url,
        signing_key_file=tmp_path / "key.pem",
        login_max_failures=3,
    )
    service = FleetService(settings, registry=CollectorRegistry())
    site = Site(service, create_app(service))
    now = time.time()
    with Session(service.engine) as s:
        for staff_id, role in (
            ("nurse-1", Role.NIGHT_STAFF),
            ("aud-1", Role.AUDITOR),
            ("tech-1", Role.TECHNICIAN),
            ("new-1", Role.NIGHT_STAFF),
        ):
            accounts.set_roles(s, staff_id, [role], ["north"], now=now, actor="test")
            accounts.set_password(s, staff_id, PASSWORD, now=now, actor="test")
            if staff_id != "new-1":  # enrolled a minute ago
                secret = accounts.begin_enrolment(s, staff_id, service.totp_box).secret
                code = pyotp.TOTP(secret).at(now - 60)
                policy = accounts.Policy()
                assert not accounts.confirm_enrolment(
                    s, staff_id, code, service.totp_box, now=now - 60, policy=policy
                )
                site.secrets[staff_id] = secret
        s.add(Device(id="dev-n1", resident_id="res-<b>1</b>", team="north"))
        s.add(Device(id="dev-s1", resident_id="res-s", team="south"))
        s.commit()
    yield site
    service._executor.shutdown(wait=True)
    service.engine.dispose()


async def login(site: Site, client: httpx.AsyncClient, staff_id: str) -> httpx.Response:
    r = await client.post("/login", data={"staff_id": staff_id, "password": PASSWORD})
    assert r.status_code == 303 and r.headers["location"] == "/login/totp", r.text
    page = await client.get("/login/totp")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    r = await client.post("/login/totp", data={"csrf": csrf[1], "code": site.code(staff_id)})
    assert r.status_code == 303, r.text
    return r


def actions(site: Site) -> list[str]:
    with Session(site.service.engine) as s:
        return [e.action for e in s.exec(select(AuditEvent).order_by(AuditEvent.id))]


async def test_password_then_totp_then_home(site: Site) -> None:
    async with site.client() as client:
        assert (await client.get("/night")).headers["location"] == "/login?next=%2Fnight"
        r = await login(site, client, "nurse-1")
        assert r.headers["location"] == "/night"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        page = await client.get("/night")
        assert page.status_code == 200 and "Nattens tillsyner" in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert actions(site)[-1] == "login"


async def test_half_login_opens_nothing(site: Site) -> None:
    async with site.client() as client:
        r = await client.post("/login", data={"staff_id": "nurse-1", "password": PASSWORD})
        assert r.status_code == 303
        assert (await client.get("/night")).status_code == 303  # to the login page
        assert (await client.get("/api/devices")).status_code == 401


async def test_wrong_password_and_lockout(site: Site) -> None:
    async with site.client() as client:
        for _ in range(3):
            r = await client.post("/login", data={"staff_id": "nurse-1", "password": "nope"})
            assert r.status_code == 401
        assert "tillfälligt låst" in r.text
        r = await client.post("/login", data={"staff_id": "nurse-1", "password": PASSWORD})
        assert r.status_code == 401 and "tillfälligt låst" in r.text
    log = actions(site)
    assert log.count("login.failed") == 4 and "login.locked" in log
    with Session(site.service.engine) as s:
        blob = " ".join(e.detail for e in s.exec(select(AuditEvent)))
    assert PASSWORD not in blob and "nope" not in blob


async def test_wrong_code_is_refused(site: Site) -> None:
    async with site.client() as client:
        await client.post("/login", data={"staff_id": "nurse-1", "password": PASSWORD})
        page = await client.get("/login/totp")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        r = await client.post("/login/totp", data={"csrf": csrf[1], "code": "123456"})
        assert r.status_code == 401 and "Koden stämmer inte" in r.text
        r = await client.post("/login/totp", data={"csrf": "forged", "code": site.code("nurse-1")})
        assert r.headers["location"] == "/login?m=expired"


async def test_first_login_enrols_with_a_qr_code(site: Site) -> None:
    async with site.client() as client:
        r = await client.post("/login", data={"staff_id": "new-1", "password": PASSWORD})
        assert r.headers["location"] == "/login/enrol"
        page = await client.get("/login/enrol")
        assert "<svg" in page.text and 'role="img"' in page.text
        secret = re.search(r'id="secret">([A-Z2-7 ]+)<', page.text)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert secret is not None and csrf is not None
        again = await client.get("/login/enrol")  # a reload shows the same secret
        assert secret[1] in again.text
        code = pyotp.TOTP(secret[1].replace(" ", "")).now()
        r = await client.post("/login/enrol", data={"csrf": csrf[1], "code": code})
        assert r.status_code == 303 and r.headers["location"] == "/night"
        assert (await client.get("/night")).status_code == 200
    assert actions(site)[-2:] == ["staff.totp_enrolled", "login"]


async def test_logout_ends_the_session(site: Site) -> None:
    async with site.client() as client:
        await login(site, client, "nurse-1")
        page = await client.get("/night")
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf is not None
        assert (await client.post("/logout", data={"csrf": "wrong"})).status_code == 403
        r = await client.post("/logout", data={"csrf": csrf[1]})
        assert r.headers["location"] == "/login?m=logged_out"
        assert (await client.get("/night")).status_code == 303
    assert "logout" in actions(site)


async def test_each_role_gets_its_pages_only(site: Site) -> None:
    expect = {
        "nurse-1": ({"/night"}, {"/audit", "/tech", "/audit/followup"}),
        "aud-1": ({"/audit", "/audit/followup", "/audit/resident"}, {"/night", "/tech"}),
        "tech-1": ({"/tech"}, {"/night", "/audit"}),
    }
    for staff_id, (allowed, denied) in expect.items():
        async with site.client() as client:
            await login(site, client, staff_id)
            for path in allowed:
                r = await client.get(path)
                assert r.status_code == 200, (staff_id, path, r.status_code)
            for path in denied:
                r = await client.get(path)
                assert r.status_code == 403, (staff_id, path, r.status_code)


async def test_technician_sees_only_their_area(site: Site) -> None:
    async with site.client() as client:
        await login(site, client, "tech-1")
        page = await client.get("/tech")
    assert "dev-n1" in page.text and "dev-s1" not in page.text
    # The resident id is escaped, not markup.
    assert "res-&lt;b&gt;1&lt;/b&gt;" in page.text and "<b>1</b>" not in page.text


async def test_english_and_swedish(site: Site) -> None:
    async with site.client() as client:
        sv = await client.get("/login")
        assert 'lang="sv"' in sv.text and "Logga in" in sv.text
        en = await client.get("/login?lang=en")
        assert 'lang="en"' in en.text and "Log in" in en.text
        assert (await client.get("/login")).text.count("Log in") > 0  # remembered
        other = await client.get("/login", headers={"Accept-Language": "en-GB,en;q=0.8"})
        assert "Log in" in other.text


async def test_auditor_follow_up_and_extract_pages(site: Site) -> None:
    # Yesterday at noon, Stockholm time: the follow-up period is in local days, and "an hour
    # ago" would straddle midnight when the test runs just after it.
    yesterday = datetime.now(STOCKHOLM).date() - timedelta(days=1)
    noon = datetime.combine(yesterday, datetime.min.time(), STOCKHOLM) + timedelta(hours=12)
    with Session(site.service.engine) as s:
        for i in range(6):
            at = noon.timestamp() + i * 60
            s.add(Look(id=f"lk-{i}", device_id="dev-n1", staff_id="nurse-1", requested_at=at))
            audit.append(s, ts=at, actor="nurse-1", action="look.requested", subject="dev-n1",
                         look_id=f"lk-{i}", resident="res-1")  # fmt: skip
        s.commit()
    async with site.client() as client:
        await login(site, client, "aud-1")
        page = await client.get("/audit/followup")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        day = yesterday.isoformat()
        r = await client.post(
            "/audit/followup", data={"csrf": csrf[1], "from": day, "to": day, "size": "3"}
        )
        assert r.status_code == 303, r.text
        sample = await client.get(r.headers["location"])
        assert sample.text.count('name="verdict" value="ok"') == 3
        check_id = re.search(r'action="/audit/followup/1/checks/(\d+)"', sample.text)
        assert check_id is not None
        r = await client.post(
            f"/audit/followup/1/checks/{check_id[1]}",
            data={"csrf": csrf[1], "verdict": "deviation", "comment": ""},
        )
        assert r.status_code == 400 and "needs a comment" in r.text
        r = await client.post(
            f"/audit/followup/1/checks/{check_id[1]}",
            data={"csrf": csrf[1], "verdict": "ok", "comment": "as agreed"},
        )
        assert r.status_code == 303
        pdf = await client.get("/api/followups/1/export?format=pdf")
        assert pdf.content.startswith(b"%PDF") and pdf.headers["content-type"] == "application/pdf"
        csv = await client.get("/api/followups/1/export?format=csv")
        assert "as agreed" in csv.text
        extract = await client.get("/audit/resident?resident=res-1")
        assert extract.text.count("nurse-1") >= 6
        log = await client.get("/audit?action=audit.")
        assert "audit.extract" in log.text and "Kedjan är hel" in log.text
