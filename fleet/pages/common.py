"""What every page shares: templates, language, the signed-in scope, CSP, redirects."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..auth import Principal, Role
from ..scope import WIDE_ROLES, Scope
from . import i18n

if TYPE_CHECKING:
    from ..service import FleetService

HERE = Path(__file__).parent
STOCKHOLM_FMT = "%H:%M"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes form posts send Origin: null
    "Cache-Control": "no-store",
}

HOME_BY_ROLE = (
    (Role.NIGHT_STAFF, "/night"),
    (Role.AUDITOR, "/audit"),
    (Role.TECHNICIAN, "/tech"),
    (Role.IT_ADMIN, "/tech"),
)


class PageRedirect(HTTPException):
    """Not signed in (or the session ended): off to the login page."""

    def __init__(self, location: str) -> None:
        super().__init__(303, "login required", headers={"Location": location})


class PageForbidden(HTTPException):
    def __init__(self) -> None:
        super().__init__(403, "forbidden")


def home_of(principal: Principal) -> str:
    for role, path in HOME_BY_ROLE:
        if role in principal.roles:
            return path
    return "/login"


class Pages:
    """Renders templates with the request's language, user and CSRF token."""

    def __init__(self, service: FleetService) -> None:
        self.service = service
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["hm"] = self._hm
        self.env.filters["dt"] = self._dt

    def _hm(self, ts: float | None) -> str:
        return "" if ts is None else datetime.fromtimestamp(ts, self._tz()).strftime("%H:%M")

    def _dt(self, ts: float | None) -> str:
        if ts is None:
            return ""
        return datetime.fromtimestamp(ts, self._tz()).strftime("%Y-%m-%d %H:%M:%S")

    def _tz(self) -> Any:
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.service.settings.tz)

    def context(self, request: Request, **values: Any) -> dict[str, Any]:
        lang = i18n.pick(request)
        web = getattr(request.state, "web", None)
        principal: Principal | None = getattr(request.state, "principal", None)
        return {
            "lang": lang,
            "other_lang": "en" if lang == "sv" else "sv",
            "t": lambda key: i18n.text(lang, key),
            "csrf": web.csrf if web is not None and web.stage == "full" else "",
            "me": principal,
            "roles": {r.value for r in principal.roles} if principal else set(),
            "path": request.url.path,
            **values,
        }

    def render(
        self, request: Request, template: str, status: int = 200, **values: Any
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(self.context(request, **values))
        response = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
        if request.query_params.get("lang") in i18n.LANGS:
            response.set_cookie(
                "lang",
                request.query_params["lang"],
                max_age=365 * 86400,
                samesite="strict",
                httponly=True,
            )
        return response

    def fragment(self, request: Request, template: str, **values: Any) -> str:
        return self.env.get_template(template).render(self.context(request, **values))


def redirect(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})


PageScope = Callable[..., Coroutine[Any, Any, Scope]]


def page_scope(service: FleetService, *roles: Role) -> PageScope:
    """Dependency for a page: the signed-in scope, or a redirect to the login page."""
    admitted = frozenset(roles)

    async def dependency(request: Request) -> Scope:
        principal = await service.authenticate(request)
        if principal is None:
            target = request.url.path
            if request.url.query:
                target += "?" + request.url.query
            raise PageRedirect("/login?next=" + quote(target, safe=""))
        request.state.principal = principal
        if admitted and not principal.roles & admitted:
            raise PageForbidden()
        return Scope(principal, bool(principal.roles & admitted & WIDE_ROLES))

    dependency.roles = admitted  # type: ignore[attr-defined]
    return dependency


def scope_dep(service: FleetService, *roles: Role) -> Any:
    return Depends(page_scope(service, *roles))
