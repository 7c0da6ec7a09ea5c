"""The device-facing enrollment endpoint: HTTPS, two routes, nothing else.

Served on its own listener (``pairing.enroll_port``) so that what home devices can reach
is exactly this: no staff API, no pages, no metrics. Its server certificate is issued by
the fleet CA (``broker.pki.issue_server_cert``), which devices already trust for the
broker, so a device verifies the fleet with the CA bundle it ships with.

Error bodies follow RFC 8628 / RFC 6749 section 5.2: ``{"error": ..., "error_description":
...}`` with status 400 (429 when rate limited).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from broker.pki import issue_server_cert
from tillsyn_protocol.enrollment import (
    ENROLL_AUTHORIZE_PATH,
    ENROLL_TOKEN_PATH,
    DeviceAuthorizationRequest,
    TokenError,
    TokenRequest,
)

from .pairing_errors import PairingRefused

if TYPE_CHECKING:
    from .pairing import Pairing

__all__ = ["create_enroll_app", "serve_enrollment"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024
_NO_STORE = {"Cache-Control": "no-store"}


def _error(error: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=_NO_STORE
    )


def create_enroll_app(pairing: Pairing) -> FastAPI:
    app = FastAPI(title="Tillsyn enrollment", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _bounded(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error("invalid_request", "request too large", 413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "body"
        return _error("invalid_request", f"{where}: {err.get('msg', 'invalid')}"[:200])

    @app.exception_handler(PairingRefused)
    async def _refused(_: Request, exc: PairingRefused) -> JSONResponse:
        status = 429 if exc.status == 429 else 400
        return _error(exc.reason, exc.why, status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.post(ENROLL_AUTHORIZE_PATH)
    async def authorize(body: DeviceAuthorizationRequest, request: Request) -> JSONResponse:
        peer = request.client.host if request.client else None
        grant = await pairing.authorize(body, peer)
        return JSONResponse(grant.model_dump(exclude_none=True), headers=_NO_STORE)

    @app.post(ENROLL_TOKEN_PATH)
    async def token(body: TokenRequest) -> JSONResponse:
        result = await pairing.token(body.device_code)
        if isinstance(result, TokenError):
            return JSONResponse(
                result.model_dump(exclude_none=True), status_code=400, headers=_NO_STORE
            )
        return JSONResponse(result.model_dump(), headers=_NO_STORE)

    return app


class _Server(uvicorn.Server):
    """The fleet service owns the process's signals; this server never installs handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def server_files(pairing: Pairing) -> tuple[str, str]:
    s = pairing.settings
    if s.enroll_cert_file is not None and s.enroll_key_file is not None:
        return str(s.enroll_cert_file), str(s.enroll_key_file)
    assert s.pki_dir is not None
    cert, key = issue_server_cert(s.pki_dir, "tillsyn-enroll", s.enroll_hosts)
    return str(cert), str(key)


async def serve_enrollment(pairing: Pairing) -> None:
    s = pairing.settings
    assert s.enroll_port is not None
    cert, key = await asyncio.to_thread(server_files, pairing)
    config = uvicorn.Config(
        create_enroll_app(pairing),
        host=s.enroll_host,
        port=s.enroll_port,
        ssl_certfile=cert,
        ssl_keyfile=key,
        log_level="warning",
        lifespan="off",
        access_log=False,
        server_header=False,
    )
    server = _Server(config)
    task: asyncio.Task[Any] = asyncio.create_task(server.serve(), name="enroll-uvicorn")
    try:
        # uvicorn has no "started" event to wait on; this only learns the bound port.
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if server.started and server.servers:
            sockets = server.servers[0].sockets
            pairing.enroll_port = sockets[0].getsockname()[1] if sockets else s.enroll_port
            pairing.enroll_listening = True
            log.info("enrollment endpoint on https://%s:%s", s.enroll_host, pairing.enroll_port)
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        raise
