"""Helpers shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path

from broker.pki import PkiPaths

__all__ = ["make_client_ssl_context", "unique_client_id"]


def make_client_ssl_context(
    pki: PkiPaths, cert: Path | None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS client context trusting ``pki``'s CA, presenting ``cert``/``key`` if given.

    Hostname checking stays on: the broker certificate names ``localhost`` and
    ``127.0.0.1``. Pass ``cert=None`` for a client without a certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=pki.ca_cert)
    if cert is not None:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    return ctx


def unique_client_id(prefix: str) -> str:
    """An MQTT client id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
