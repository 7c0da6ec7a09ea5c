"""Session fixtures shared by every test package: a dev PKI and a real Mosquitto.

- ``pki_dir``: :class:`broker.pki.PkiPaths` of a PKI made by ``init_pki``.
- ``device_cert``: factory, ``device_cert("dev-abc") -> (cert_path, key_path)``.
- ``mosquitto``: a running :class:`broker.launcher.MosquittoProcess` with the
  production config on a free port (a test that kills it must restart it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths, init_pki, issue_device_cert


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """A complete dev PKI (CA, broker, fleet, empty CRL) for the whole session."""
    return init_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def device_cert(pki_dir: PkiPaths) -> Callable[[str], tuple[Path, Path]]:
    """Factory issuing (once per id) a device certificate from the session CA."""
    issued: dict[str, tuple[Path, Path]] = {}

    def make(device_id: str) -> tuple[Path, Path]:
        if device_id not in issued:
            issued[device_id] = issue_device_cert(pki_dir.directory, device_id)
        return issued[device_id]

    return make


@pytest.fixture(scope="session")
def mosquitto(
    pki_dir: PkiPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoProcess]:
    """Mosquitto running the production config (TLS, ACL, CRL) on 127.0.0.1."""
    proc = MosquittoProcess(pki=pki_dir, workdir=tmp_path_factory.mktemp("mosquitto"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
