"""Session fixtures shared by every test package: a dev PKI and a real Mosquitto.

- ``pki_dir``: :class:`broker.pki.PkiPaths` of a PKI made by ``init_pki``.
- ``device_cert``: factory, ``device_cert("dev-abc") -> (cert_path, key_path)``.
- ``mosquitto``: a running :class:`broker.launcher.MosquittoProcess` with the
  production config on a free port (a test that kills it must restart it).
- ``database_url``: parametrized ``sqlite`` / ``postgres``, a migrated database of its own
  per test; ``empty_database_url`` the same without the schema (migration tests).
  PostgreSQL is ``$TILLSYN_TEST_PG`` (libpq keywords, default the local server); if it is
  unreachable the postgres variants fail, never skip: CI runs PostgreSQL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
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


# --- databases ---------------------------------------------------------------------------

PG_ADMIN = os.environ.get("TILLSYN_TEST_PG", "host=127.0.0.1 port=5432 user=postgres")


def _pg_admin(sql: str) -> None:
    try:
        conn = psycopg.connect(PG_ADMIN, dbname="postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        why = str(exc)
    else:
        with conn:
            conn.execute(sql)
        return
    pytest.fail(
        f"PostgreSQL unreachable ({PG_ADMIN!r}): {why}\n"
        "the postgres variants of the database tests need it: start it "
        "(bash scripts/setup.sh --test) or point TILLSYN_TEST_PG at one",
        pytrace=False,
    )


def _pg_url(name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(PG_ADMIN)
    host, port, user = info.get("host", "127.0.0.1"), info.get("port", 5432), info.get("user")
    return f"postgresql+psycopg://{user}@{host}:{port}/{name}"


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A PostgreSQL database migrated once per session; each test gets a copy of it."""
    from fleet.db import init_db, make_engine

    name = f"tmpl_{uuid.uuid4().hex[:16]}"
    _pg_admin(f"CREATE DATABASE {name}")
    try:
        engine = make_engine(_pg_url(name))
        init_db(engine)
        engine.dispose()  # a template must have no connections when it is copied
        yield name
    finally:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _fresh_db(request: pytest.FixtureRequest, directory: Path, *, migrated: bool) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{directory / 'fleet.db'}"
        if migrated:
            from fleet.db import init_db, make_engine

            engine = make_engine(url)
            init_db(engine)
            engine.dispose()
        yield url
        return
    name = f"t_{uuid.uuid4().hex[:16]}"
    template = f" TEMPLATE {request.getfixturevalue('pg_template')}" if migrated else ""
    _pg_admin(f"CREATE DATABASE {name}{template}")
    try:
        yield _pg_url(name)
    finally:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own at the newest schema, on each backend."""
    yield from _fresh_db(request, tmp_path, migrated=True)


@pytest.fixture(scope="module", params=BACKENDS)
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The same, shared by a module's tests (for module-scoped worlds)."""
    yield from _fresh_db(request, tmp_path_factory.mktemp("db"), migrated=True)


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of this test's own, on each backend (for migration tests)."""
    yield from _fresh_db(request, tmp_path, migrated=False)
