"""Server-rendered staff pages: login with a second factor, the night staff's checks, the
technician's devices, the auditor's log and follow-up. Swedish and English, usable on a
phone and with a keyboard, no build step: Jinja2 templates, one stylesheet and one small
script for live updates (``static/``), a strict Content-Security-Policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from .common import HERE, PageForbidden, PageRedirect, Pages
from .login import login_router
from .night import night_router
from .staff_pages import staff_router

if TYPE_CHECKING:
    from ..service import FleetService

__all__ = ["mount_pages"]


def mount_pages(app: FastAPI, service: FleetService) -> None:
    pages = Pages(service)
    app.include_router(login_router(service, pages))
    app.include_router(night_router(service, pages))
    app.include_router(staff_router(service, pages))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    async def login_first(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageRedirect)
        return Response(status_code=303, headers=exc.headers)

    async def forbidden(request: Request, exc: Exception) -> Response:
        return pages.render(request, "error.html", 403, message="forbidden")

    app.add_exception_handler(PageRedirect, login_first)
    app.add_exception_handler(PageForbidden, forbidden)
