"""Login pages: password, then the TOTP code (or, the first time, enrolment with a QR code).

``/login`` -> ``/login/totp`` or ``/login/enrol`` -> the role's home page; ``/logout``.
The password step gives only a short pending session that opens no other page; the
second factor replaces it with a full session under a new id.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlmodel import Session

from .. import accounts, sessions
from .common import Pages, home_of, redirect

if TYPE_CHECKING:
    from ..service import FleetService

MESSAGES = ("expired", "logged_out", "locked")


def _safe_next(value: str | None) -> str:
    """Only a local path: never an open redirect to another site."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value[:500]
    return ""


def _ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def _origin_ok(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"


def login_router(service: FleetService, pages: Pages) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    settings = service.settings
    policy = accounts.Policy(settings.login_max_failures, settings.login_lockout_s)

    async def pending(request: Request, stage: str) -> sessions.WebSession | None:
        value = sessions.read_cookie(request)
        if value is None:
            return None
        now = service.clock()

        def q(s: Session) -> sessions.WebSession | None:
            return sessions.lookup(s, value, now=now, idle_s=settings.session_idle_s)

        row: sessions.WebSession | None = await service.db(service.ops.run, q)
        return row if row is not None and row.stage == stage else None

    async def begin(request: Request, staff_id: str, stage: str, nxt: str) -> Response:
        old = sessions.read_cookie(request)
        now = service.clock()

        def q(s: Session) -> str:
            if old:
                sessions.end(s, old, now=now, why="step")
            value, _ = sessions.create(s, staff_id, stage, now=now, max_s=settings.session_max_s)
            return value

        value: str = await service.db(service.ops.run, q)
        if stage == "full":
            principal = await service.db(
                service.ops.run, lambda s: sessions.account_principal(s, staff_id)
            )
            target = nxt or (home_of(principal) if principal else "/login")
            max_age = settings.session_max_s
        else:
            target = f"/login/{stage}" + (f"?next={nxt}" if nxt else "")
            max_age = sessions.PENDING_TTL_S
        response = redirect(target)
        sessions.set_cookie(response, settings, request, value, max_age)
        return response

    @router.get("/")
    async def root(request: Request) -> Response:
        principal = await service.authenticate(request)
        return redirect(home_of(principal) if principal else "/login")

    @router.get("/login")
    async def login_page(request: Request) -> Response:
        principal = await service.authenticate(request)
        if principal is not None:
            return redirect(_safe_next(request.query_params.get("next")) or home_of(principal))
        message = request.query_params.get("m")
        return pages.render(
            request,
            "login.html",
            next=_safe_next(request.query_params.get("next")),
            message=message if message in MESSAGES else None,
        )

    @router.post("/login")
    async def login_submit(request: Request) -> Response:
        form = await sessions.form(request)
        nxt = _safe_next(form.get("next"))
        if not _origin_ok(request):
            return pages.render(request, "login.html", 403, next=nxt, error="login_failed")
        staff_id = form.get("staff_id", "").strip()[:64]
        password = form.get("password", "")
        now = service.clock()
        ip = _ip(request)

        def q(s: Session) -> accounts.PasswordResult:
            return accounts.check_password(s, staff_id, password, now=now, policy=policy, ip=ip)

        result: accounts.PasswordResult = await service.db(service.ops.run, q)
        if result.refusal is not None or result.staff_id is None or result.step is None:
            error = "locked" if result.refusal is accounts.Refusal.LOCKED else "login_failed"
            return pages.render(
                request, "login.html", 401, next=nxt, error=error, staff_id=staff_id
            )
        return await begin(request, result.staff_id, result.step.value, nxt)

    @router.get("/login/totp")
    async def totp_page(request: Request) -> Response:
        row = await pending(request, "totp")
        if row is None:
            return redirect("/login?m=expired")
        return pages.render(
            request,
            "totp.html",
            next=_safe_next(request.query_params.get("next")),
            pending_csrf=row.csrf,
        )

    async def _code_step(
        request: Request,
        stage: str,
        check: Callable[..., accounts.Refusal | None],
        refused: Callable[[str, str | None], Response],
    ) -> Response:
        """The posted TOTP code of a pending session (login or enrolment) -> full session."""
        row = await pending(request, stage)
        form = await sessions.form(request)
        nxt = _safe_next(form.get("next"))
        if row is None or not hmac.compare_digest(form.get("csrf", ""), row.csrf):
            return redirect("/login?m=expired")
        staff_id, box, now, ip = row.staff_id, service.totp_box, service.clock(), _ip(request)

        def q(s: Session) -> accounts.Refusal | None:
            return check(s, staff_id, form.get("code", ""), box, now=now, policy=policy, ip=ip)

        refusal: accounts.Refusal | None = await service.db(service.ops.run, q)
        if refusal is accounts.Refusal.LOCKED:
            return await _end_pending(request, "/login?m=locked")
        if refusal is not None:
            return refused(row.csrf, nxt)
        return await begin(request, staff_id, "full", nxt)

    @router.post("/login/totp")
    async def totp_submit(request: Request) -> Response:
        def refused(csrf: str, nxt: str | None) -> Response:
            return pages.render(
                request, "totp.html", 401, next=nxt, pending_csrf=csrf, error="code_failed"
            )

        return await _code_step(request, "totp", accounts.check_totp, refused)

    @router.get("/login/enrol")
    async def enrol_page(request: Request) -> Response:
        row = await pending(request, "enrol")
        if row is None:
            return redirect("/login?m=expired")
        staff_id, box = row.staff_id, service.totp_box

        def q(s: Session) -> accounts.Enrolment:
            shown = accounts.pending_enrolment(s, staff_id, box)
            return shown or accounts.begin_enrolment(s, staff_id, box)

        enrolment: accounts.Enrolment = await service.db(service.ops.run, q)
        return pages.render(
            request,
            "enrol.html",
            next=_safe_next(request.query_params.get("next")),
            pending_csrf=row.csrf,
            enrolment=enrolment,
            request_error=request.query_params.get("e") == "1",
            secret_groups=" ".join(
                enrolment.secret[i : i + 4] for i in range(0, len(enrolment.secret), 4)
            ),
        )

    @router.post("/login/enrol")
    async def enrol_submit(request: Request) -> Response:
        def refused(_csrf: str, nxt: str | None) -> Response:
            return redirect("/login/enrol?e=1" + (f"&next={nxt}" if nxt else ""))

        return await _code_step(request, "enrol", accounts.confirm_enrolment, refused)

    async def _end_pending(request: Request, target: str) -> Response:
        value = sessions.read_cookie(request)
        now = service.clock()
        if value:
            await service.db(service.ops.run, lambda s: sessions.end(s, value, now=now))
        response = redirect(target)
        sessions.clear_cookie(response, settings, request)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        principal = await service.authenticate(request)  # checks the CSRF token too
        value = sessions.read_cookie(request)
        now = service.clock()
        if principal is not None and value:
            await service.db(service.ops.run, lambda s: sessions.end(s, value, now=now))
        response = redirect("/login?m=logged_out")
        sessions.clear_cookie(response, settings, request)
        return response

    return router
