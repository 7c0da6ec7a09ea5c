"""Every route x every role (+ anonymous, + wrong team): the access policy, exhaustively.

``POLICY`` declares, for every route the app serves, who may call it. The first test
enumerates ``app.routes`` so that a new endpoint without a declared policy fails here; the
matrix test then calls each route as each identity and checks the answer:

- anonymous: 401 (pages: a redirect to the login page), unless the route is public;
- a role the route does not admit: 403;
- an admitted role: anything but 401/403 (the request may still be invalid: 422, 404...);
- night staff and technicians of another team: 404 on device-scoped routes, and lists
  that leave the other team's rows out.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from sqlmodel import Session, select
from starlette.routing import Mount, Route

from fleet import accounts, auth, sessions
from fleet.api import create_app
from fleet.auth import Role
from fleet.config import FleetSettings
from fleet.models import Command, CommandStatus, Device, Look, Visit, VisitCause, Window
from fleet.plan_models import CarePlan, Check
from fleet.plan_rules import night_at
from fleet.service import FleetService
from tillsyn_protocol import CommandKind
from tillsyn_protocol.windows import STOCKHOLM

IT, TECH, NIGHT, AUD = Role.IT_ADMIN, Role.TECHNICIAN, Role.NIGHT_STAFF, Role.AUDITOR
ALL = frozenset(Role)


@dataclass(frozen=True)
class Policy:
    roles: frozenset[Role] | None  # None: public
    page: bool = False  # HTML page: anonymous gets a redirect to /login
    team: bool = False  # device-scoped: other teams get 404 / filtered lists


def api(*roles: Role, team: bool = False) -> Policy:
    return Policy(frozenset(roles), team=team)


def page(*roles: Role, team: bool = False) -> Policy:
    return Policy(frozenset(roles), page=True, team=team)


PUBLIC = Policy(None)
LOGIN = Policy(None, page=True)  # public; a failed login answers 401
pytestmark = pytest.mark.asyncio(loop_scope="module")

POLICY: dict[tuple[str, str], Policy] = {
    # --- open: health, metrics (see test_metrics_can_be_protected), API docs, static
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("MOUNT", "/static"): PUBLIC,
    # --- login (before any session exists)
    ("GET", "/"): PUBLIC,
    ("GET", "/login"): PUBLIC,
    ("POST", "/login"): LOGIN,
    ("GET", "/login/totp"): PUBLIC,
    ("POST", "/login/totp"): LOGIN,
    ("GET", "/login/enrol"): PUBLIC,
    ("POST", "/login/enrol"): LOGIN,
    ("POST", "/logout"): PUBLIC,
    # --- devices, windows, ledger, looks, visits (fleet/api.py)
    ("GET", "/api/devices"): api(IT, TECH, NIGHT, AUD, team=True),
    ("GET", "/api/devices/{device_id}"): api(IT, TECH, NIGHT, AUD, team=True),
    ("POST", "/api/devices"): api(IT, TECH, team=True),
    ("GET", "/api/windows"): api(IT, TECH, NIGHT, AUD, team=True),
    ("POST", "/api/windows"): api(IT),
    ("DELETE", "/api/windows/{window_id}"): api(IT),
    ("GET", "/api/commands"): api(IT, TECH, AUD, team=True),
    ("POST", "/api/devices/{device_id}/looks"): api(NIGHT, team=True),
    ("GET", "/api/looks"): api(NIGHT, AUD, team=True),
    ("GET", "/api/visits"): api(IT, NIGHT, AUD, team=True),
    ("POST", "/api/visits/{visit_id}/acknowledge"): api(NIGHT, team=True),
    ("POST", "/api/visits/{visit_id}/close"): api(NIGHT, team=True),
    # --- care plans, checks, escalations, coverage (fleet/api_plans.py)
    ("GET", "/api/plans"): api(IT, NIGHT, AUD, team=True),
    ("GET", "/api/plans/{plan_id}"): api(IT, NIGHT, AUD, team=True),
    ("POST", "/api/plans"): api(IT),
    ("PATCH", "/api/plans/{plan_id}"): api(IT),
    ("POST", "/api/plans/{plan_id}/activate"): api(IT),
    ("POST", "/api/plans/{plan_id}/end"): api(IT),
    ("POST", "/api/plans/{plan_id}/pauses"): api(IT),
    ("POST", "/api/plans/{plan_id}/pauses/{pause_id}/end"): api(IT),
    ("POST", "/api/plans/{plan_id}/opt-outs"): api(IT, NIGHT, team=True),
    ("DELETE", "/api/plans/{plan_id}/opt-outs/{night}"): api(IT, NIGHT, team=True),
    ("GET", "/api/checks"): api(IT, NIGHT, AUD, team=True),
    ("GET", "/api/checks/{check_id}"): api(IT, NIGHT, AUD, team=True),
    ("POST", "/api/checks/{check_id}/look"): api(NIGHT, team=True),
    ("POST", "/api/checks/{check_id}/outcome"): api(NIGHT, team=True),
    ("GET", "/api/escalations"): api(IT, NIGHT, AUD, team=True),
    ("POST", "/api/escalations/{step_id}/complete"): api(NIGHT, team=True),
    ("GET", "/api/nights/{night}/visits"): api(IT, NIGHT, AUD, team=True),
    ("GET", "/api/coverage"): api(IT, AUD),
    ("GET", "/api/coverage/reports"): api(IT, AUD),
    ("GET", "/api/scheduler"): api(IT),
    # --- audit log, follow-up, extract, accounts, tokens (fleet/api_audit.py)
    ("GET", "/api/audit"): api(AUD),
    ("GET", "/api/audit/verify"): api(IT, AUD),
    ("GET", "/api/followups"): api(AUD),
    ("POST", "/api/followups"): api(AUD),
    ("GET", "/api/followups/{sample_id}"): api(AUD),
    ("POST", "/api/followups/checks/{check_id}"): api(AUD),
    ("GET", "/api/followups/{sample_id}/export"): api(AUD),
    ("GET", "/api/residents/{resident_id}/looks"): api(AUD),
    ("GET", "/api/me"): api(IT, TECH, NIGHT, AUD),
    ("GET", "/api/staff"): api(IT),
    ("POST", "/api/staff/{staff_id}/unlock"): api(IT),
    ("POST", "/api/tokens"): api(IT),
    ("DELETE", "/api/tokens/{token_id}"): api(IT),
    # --- pairing, lifecycle, inventory (fleet/api_pairing.py); /pair is the page shell only
    ("GET", "/pair"): PUBLIC,
    ("GET", "/pair/app.js"): PUBLIC,
    ("GET", "/pair/app.css"): PUBLIC,
    ("POST", "/api/pairing/lookup"): api(TECH),
    ("POST", "/api/pairing"): api(TECH),
    ("POST", "/api/pairing/deny"): api(TECH),
    ("GET", "/api/pairing/{pairing_id}"): api(TECH),
    ("POST", "/api/devices/{device_id}/retest"): api(IT, TECH, team=True),
    ("POST", "/api/devices/{device_id}/retire"): api(IT, TECH, team=True),
    ("POST", "/api/devices/{device_id}/return"): api(IT, TECH, team=True),
    ("POST", "/api/devices/{device_id}/swap"): api(TECH, team=True),
    ("GET", "/api/inventory"): api(IT, TECH, AUD, team=True),
    ("GET", "/api/inventory/{device_id}"): api(IT, TECH, AUD, team=True),
    ("GET", "/api/certificates/expiring"): api(IT, TECH, AUD, team=True),
    # --- pages (fleet/pages/)
    ("GET", "/night"): page(NIGHT, team=True),
    ("GET", "/night/live"): page(NIGHT, team=True),
    ("POST", "/night/checks/{check_id}/look"): page(NIGHT, team=True),
    ("POST", "/night/checks/{check_id}/outcome"): page(NIGHT, team=True),
    ("POST", "/night/visits/{visit_id}/acknowledge"): page(NIGHT, team=True),
    ("POST", "/night/visits/{visit_id}/close"): page(NIGHT, team=True),
    ("POST", "/night/steps/{step_id}/complete"): page(NIGHT, team=True),
    ("GET", "/tech"): page(IT, TECH, team=True),
    ("GET", "/audit"): page(AUD),
    ("GET", "/audit/followup"): page(AUD),
    ("POST", "/audit/followup"): page(AUD),
    ("GET", "/audit/followup/{sample_id}"): page(AUD),
    ("POST", "/audit/followup/{sample_id}/checks/{check_id}"): page(AUD),
    ("GET", "/audit/resident"): page(AUD),
}

# Identities: one account and token per role in team "north", night staff and a technician
# in team "south" for the wrong-team cases.
IDENTITIES: dict[str, tuple[Role, str]] = {
    "it": (IT, "north"),
    "tech": (TECH, "north"),
    "night": (NIGHT, "north"),
    "aud": (AUD, "north"),
    "tech-south": (TECH, "south"),
    "night-south": (NIGHT, "south"),
}


@dataclass
class World:
    service: FleetService
    client: httpx.AsyncClient
    tokens: dict[str, str]
    ids: dict[str, Any]

    async def call(
        self, method: str, path: str, who: str | None, body: Any = None, **kw: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        if method in ("POST", "PUT", "PATCH") and body is None:
            body = {}
        return await self.client.request(
            method, path, headers=headers, json=body, follow_redirects=False, **kw
        )


def seed(session: Session, now: float) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    tonight = night_at(datetime.fromtimestamp(now, UTC), STOCKHOLM)
    for team in ("north", "south", None):
        name = team or "none"
        device = Device(id=f"dev-{name}", resident_id=f"res-{name}", team=team)
        session.add(device)
        session.flush()
        window = Window(device_id=device.id, start_local="22:00:00", duration_s=600)
        spare = Window(device_id=device.id, start_local="03:00:00", duration_s=600)
        session.add(window)
        session.add(spare)  # the one DELETE /api/windows/{id} may remove
        session.add(Look(id=f"look-{name}", device_id=device.id, staff_id="n", requested_at=now))
        session.add(
            Command(jti=f"jti-{name}", device_id=device.id, seq=1, kind=CommandKind.DISARM,
                    token="t", status=CommandStatus.APPLIED, created_at=now, expires_at=now + 60)
        )  # fmt: skip
        visit = Visit(key=f"k-{name}", device_id=device.id, resident_id=device.resident_id,
                      cause=VisitCause.DEVICE_OFFLINE, due_at=now, raised_at=now)  # fmt: skip
        session.add(visit)
        session.flush()
        plan = CarePlan(resident_id=device.resident_id or "", device_id=device.id, team=team,
                        check_times="03:00", window_s=600, valid_from=tonight,
                        created_at=now, updated_at=now)  # fmt: skip
        session.add(plan)
        session.flush()
        assert plan.id is not None
        check = Check(key=f"{plan.id}:x", plan_id=plan.id, device_id=device.id,
                      resident_id=plan.resident_id, team=team, night=tonight, agreed="03:00",
                      start_at=now + 3600, end_at=now + 4200)  # fmt: skip
        session.add(check)
        session.flush()
        ids[name] = {
            "device": device.id,
            "window": spare.id,
            "visit": visit.id,
            "plan": plan.id,
            "check": check.id,
        }
    ids["tonight"] = tonight
    session.add(Device(id="dev-spare", resident_id="res-spare", team="spare"))
    return ids


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, pki_dir: Any, module_database_url: str
) -> AsyncIterator[World]:
    tmp: Path = tmp_path_factory.mktemp("matrix")
    settings = FleetSettings(
        database_url=module_database_url,
        signing_key_file=tmp / "key.pem",
        pairing={"pki_dir": pki_dir.directory},  # so the pairing routes are served too
    )
    service = FleetService(settings, registry=CollectorRegistry())
    now = time.time()
    tokens: dict[str, str] = {}
    with Session(service.engine) as s:
        for name, (role, team) in IDENTITIES.items():
            accounts.set_roles(s, name, [role], [team], now=now, actor="test")
            tokens[name] = auth.issue_token(s, name, role)
        ids = seed(s, now)
        auth.issue_token(s, "aud", AUD)  # a spare for DELETE /api/tokens/{id}
        s.flush()
        ids["spare_token"] = max(t.id or 0 for t in s.exec(select(auth.ApiToken)))
        s.commit()
    app = create_app(service)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet.test") as client:
        yield World(service, client, tokens, ids)
    service._executor.shutdown(wait=True)
    service.engine.dispose()


def walk(routes: list[Any]) -> list[Any]:
    """The app's routes, with included routers expanded (FastAPI includes them lazily)."""
    out: list[Any] = []
    for route in routes:
        if hasattr(route, "effective_candidates"):
            out += walk(route.effective_candidates())
        else:
            out.append(route)
    return out


def declared_routes(app: Any) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for route in walk(app.routes):
        if isinstance(route, APIRoute | Route) or type(route).__name__ == "_EffectiveRouteContext":
            for method in route.methods or ():
                if method != "HEAD":
                    out.add((method, route.path))
        elif isinstance(route, Mount):
            out.add(("MOUNT", route.path))
        else:
            out.add((type(route).__name__, getattr(route, "path", "?")))
    return out


async def test_every_route_has_a_declared_policy(world: World) -> None:
    served = declared_routes(world.client._transport.app)  # type: ignore[attr-defined]
    missing = sorted(served - POLICY.keys())
    stale = sorted(POLICY.keys() - served)
    assert not missing, f"routes without a declared access policy: {missing}"
    assert not stale, f"policies for routes that no longer exist: {stale}"


def fill(path: str, ids: dict[str, Any], team: str = "north") -> str:
    mine = ids[team]
    path = (
        path.replace("{device_id}", mine["device"])
        .replace("{window_id}", str(mine["window"]))
        .replace("{visit_id}", str(mine["visit"]))
        .replace("{check_id}", str(mine["check"]))
        .replace("{plan_id}", str(mine["plan"]))
        .replace("{resident_id}", f"res-{team}")
        .replace("{staff_id}", "night")
        .replace("{token_id}", str(ids["spare_token"]))
        .replace("{night}", str(ids["tonight"]))
    )
    return re.sub(r"\{[a-z_]+\}", "1", path)


def route_id(key: tuple[str, str]) -> str:
    return f"{key[0]} {key[1]}"


@pytest.mark.parametrize("key", sorted(POLICY), ids=route_id)
async def test_role_matrix(world: World, key: tuple[str, str]) -> None:
    method, template = key
    if method == "MOUNT":  # static files: open to all (the login page needs its CSS)
        assert (await world.call("GET", template + "/app.css", None)).status_code == 200
        return
    policy = POLICY[key]
    if template.endswith(("/retest", "/retire", "/return", "/swap")):  # may really retire it
        template = template.replace("{device_id}", "dev-spare")
    path = fill(template, world.ids)
    wrong: list[str] = []
    # Anonymous first.
    resp = await world.call(method, path, None)
    if policy.roles is None:
        if resp.status_code == 403 or (resp.status_code == 401 and not policy.page):
            wrong.append(f"anonymous got {resp.status_code}, route is public")
    elif policy.page:
        if resp.status_code != 303 or "/login" not in resp.headers.get("location", ""):
            wrong.append(f"anonymous got {resp.status_code}, expected a redirect to /login")
    elif resp.status_code != 401:
        wrong.append(f"anonymous got {resp.status_code}, expected 401")
    for who in ("it", "tech", "night", "aud"):
        role = IDENTITIES[who][0]
        resp = await world.call(method, path, who)
        admitted = policy.roles is None or role in policy.roles
        if policy == LOGIN:  # the login form answers any caller; a bad login is 401
            continue
        if admitted and resp.status_code in (401, 403):
            wrong.append(f"{role.value} refused ({resp.status_code}: {resp.text[:100]})")
        if not admitted and resp.status_code != 403:
            wrong.append(f"{role.value} got {resp.status_code}, expected 403")
    assert not wrong, f"{method} {template}: " + "; ".join(wrong)


# Device-scoped routes: (method, path, valid body). A caller of another team gets 404; the
# same call from the device's own team gets past the scope check.
SCOPED_CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/api/devices/{device_id}", None),
    ("POST", "/api/devices/{device_id}/looks", {}),
    ("POST", "/api/visits/{visit_id}/acknowledge", {}),
    ("POST", "/api/visits/{visit_id}/close", {"outcome": "resident fine"}),
    ("GET", "/api/plans/{plan_id}", None),
    ("GET", "/api/checks/{check_id}", None),
    ("POST", "/api/checks/{check_id}/look", {}),
    ("POST", "/api/checks/{check_id}/outcome", {"outcome": "seen"}),
    ("POST", "/night/checks/{check_id}/look", {}),
    ("POST", "/night/checks/{check_id}/outcome", {}),
    ("POST", "/night/visits/{visit_id}/acknowledge", {}),
    ("POST", "/night/visits/{visit_id}/close", {}),
]


@pytest.mark.parametrize(("method", "template", "body"), SCOPED_CALLS, ids=str)
async def test_wrong_team_gets_404_own_team_gets_through(
    world: World, method: str, template: str, body: Any
) -> None:
    policy = POLICY[(method, template)]
    assert policy.team and policy.roles is not None
    role = NIGHT if NIGHT in policy.roles else TECH
    mine, theirs = ("night", "night-south") if role is NIGHT else ("tech", "tech-south")
    north_path = fill(template, world.ids, "north")
    assert (await world.call(method, north_path, theirs, body)).status_code == 404
    # A device with no team is nobody's but the IT admins'.
    assert (
        await world.call(method, fill(template, world.ids, "none"), mine, body)
    ).status_code == 404
    own = await world.call(method, north_path, mine, body)
    assert own.status_code not in (401, 403, 404), own.text


LISTS = [
    ("/api/devices", "id"),
    ("/api/windows", "device_id"),
    ("/api/commands", "device_id"),
    ("/api/looks", "device_id"),
    ("/api/visits", "device_id"),
    ("/api/plans", "device_id"),
    ("/api/checks", "device_id"),
]


@pytest.mark.parametrize(("path", "column"), LISTS)
async def test_lists_show_only_the_callers_teams(world: World, path: str, column: str) -> None:
    policy = POLICY[("GET", path)]
    assert policy.roles is not None
    for who, (role, team) in IDENTITIES.items():
        if role not in policy.roles:
            continue
        resp = await world.call("GET", path, who)
        assert resp.status_code == 200, (who, resp.text)
        seen = {row[column] for row in resp.json()}
        if role in (IT, AUD):
            assert seen >= {"dev-north", "dev-south", "dev-none"}, (who, seen)
        else:
            assert seen == {f"dev-{team}"}, (who, path, seen)


async def test_technician_registers_only_into_own_team(world: World) -> None:
    body = {"id": "dev-new-1", "team": "south"}
    assert (await world.call("POST", "/api/devices", "tech", body)).status_code == 403
    assert (
        await world.call("POST", "/api/devices", "tech", {"id": "dev-new-1"})
    ).status_code == 403
    body["team"] = "north"
    resp = await world.call("POST", "/api/devices", "tech", body)
    assert resp.status_code == 201 and resp.json()["team"] == "north"


async def test_staff_act_only_in_their_own_name(world: World) -> None:
    path = fill("/api/devices/{device_id}/looks", world.ids)
    resp = await world.call("POST", path, "night", {"staff_id": "someone-else"})
    assert resp.status_code == 403
    vpath = fill("/api/visits/{visit_id}/acknowledge", world.ids)
    assert (await world.call("POST", vpath, "night", {"by": "someone-else"})).status_code == 403


async def test_revoked_token_is_refused(world: World) -> None:
    with Session(world.service.engine) as s:
        token = auth.issue_token(s, "aud", AUD)
        s.commit()
    headers = {"Authorization": f"Bearer {token}"}
    assert (await world.client.get("/api/looks", headers=headers)).status_code == 200
    with Session(world.service.engine) as s:
        assert auth.revoke_token(s, token)
        s.commit()
    assert (await world.client.get("/api/looks", headers=headers)).status_code == 401
    bogus = {"Authorization": "Bearer tf_not-a-token"}
    assert (await world.client.get("/api/looks", headers=bogus)).status_code == 401


async def test_session_cookie_csrf_and_expiry(world: World) -> None:
    now = time.time()
    with Session(world.service.engine) as s:
        value, row = sessions.create(s, "night", "full", now=now, max_s=3600)
        pending, _ = sessions.create(s, "aud", "totp", now=now, max_s=3600)
        s.commit()
        csrf = row.csrf
    transport = world.client._transport
    client = httpx.AsyncClient(
        transport=transport, base_url="http://fleet.test", cookies={sessions.COOKIE_PLAIN: value}
    )
    half = httpx.AsyncClient(
        transport=transport, base_url="http://fleet.test", cookies={sessions.COOKIE_PLAIN: pending}
    )
    assert (await client.get("/api/devices")).status_code == 200
    # A password without the second factor is not a login.
    assert (await half.get("/api/devices")).status_code == 401
    path = fill("/api/visits/{visit_id}/acknowledge", world.ids)
    no_csrf = await client.post(path, json={})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    bad = await client.post(path, json={}, headers={"X-CSRF-Token": "x"})
    assert bad.status_code == 403
    foreign = await client.post(path, json={}, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    same = await client.post(path, json={}, headers={"Origin": "http://fleet.test"})
    assert same.status_code in (200, 409), same.text  # a page script's JSON call
    form = await client.post(path, data={"csrf": "wrong"})
    assert form.status_code == 403
    ok = await client.post(path, json={}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code in (200, 409), ok.text  # past CSRF (409: closed by another test)
    # Idle past the limit: the cookie is dead and the expiry is audited.
    with Session(world.service.engine) as s:
        stale = s.get(sessions.WebSession, sessions._hash(value))
        assert stale is not None
        stale.last_seen_at = now - world.service.settings.session_idle_s - 1
        s.add(stale)
        s.commit()
    assert (await client.get("/api/devices")).status_code == 401
    await client.aclose()
    await half.aclose()


async def test_metrics_can_be_protected(world: World) -> None:
    settings = world.service.settings
    settings.metrics_public = False
    try:
        assert (await world.call("GET", "/metrics", None)).status_code == 401
        assert (await world.call("GET", "/metrics", "night")).status_code == 403
        assert (await world.call("GET", "/metrics", "it")).status_code == 200
    finally:
        settings.metrics_public = True
