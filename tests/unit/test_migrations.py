"""Alembic migrations produce exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from sqlalchemy import inspect, text
from sqlmodel import Session, select

from fleet import migrate
from fleet.db import init_db, make_engine
from fleet.errors import SchemaError
from fleet.models import Device


def test_migrations_match_the_models(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    assert migrate.current(engine) is None
    assert migrate.upgrade(engine) == migrate.head()
    assert migrate.differences(engine) == []


def test_upgrade_is_idempotent(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    init_db(engine)
    with Session(engine) as session:
        session.add(Device(id="dev-a1"))
        session.commit()
    init_db(engine)
    assert migrate.upgrade(engine) == migrate.head()
    with Session(engine) as session:
        assert [d.id for d in session.exec(select(Device))] == ["dev-a1"]


def test_create_all_database_is_stamped_then_upgraded(
    empty_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(empty_database_url)
    # What init_db's create_all made before migrations: the baseline schema, unversioned.
    migrate.upgrade(engine, migrate.BASELINE)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    with Session(engine) as session:
        session.add(Device(id="dev-old"))
        session.commit()
    with caplog.at_level(logging.WARNING, logger="fleet.migrate"):
        init_db(engine)
    assert "stamped at baseline" in caplog.text
    assert migrate.current(engine) == migrate.head()
    assert migrate.differences(engine) == []
    with Session(engine) as session:
        assert session.get(Device, "dev-old") is not None


def test_downgrade_to_base_then_upgrade(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    init_db(engine)
    assert migrate.downgrade(engine, "base") is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert migrate.upgrade(engine) == migrate.head()
    assert migrate.differences(engine) == []


def test_database_newer_than_the_code_is_refused(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'fffe'"))
    with pytest.raises(SchemaError, match="fffe"):
        init_db(engine)


def test_concurrent_starts_migrate_once(empty_database_url: str) -> None:
    # Two processes (alembic's context is process-global, so not threads) starting at once:
    # the migration lock makes the second wait, then find the schema done.
    code = (
        "import sys; from fleet.db import init_db, make_engine; init_db(make_engine(sys.argv[1]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, empty_database_url], stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
    engine = make_engine(empty_database_url)
    assert migrate.current(engine) == migrate.head()
    assert migrate.differences(engine) == []


def test_db_commands(empty_database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from tillsyn_cli.main import cli

    monkeypatch.setenv("TILLSYN_DATABASE_URL", empty_database_url)

    def run(*args: str):
        return CliRunner().invoke(cli, ["--text-logs", "db", *args], catch_exceptions=False)

    assert "current: none" in run("current").output
    assert run("check").exit_code == 1
    assert run("upgrade").output.strip() == f"database at revision {migrate.head()}"
    checked = run("check")
    assert checked.exit_code == 0 and "schema matches the models" in checked.output


def test_stamped_database_from_older_code_is_reported(
    empty_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # create_all never altered a table: a database from older code may lack a column.
    engine = make_engine(empty_database_url)
    migrate.upgrade(engine, migrate.BASELINE)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("ALTER TABLE device DROP COLUMN hold_until"))
    with caplog.at_level(logging.WARNING, logger="fleet.migrate"):
        init_db(engine)
    assert "schema differs from the models (1 differences)" in caplog.text


def test_long_outbox_payload_stays_valid_json(database_url: str) -> None:
    # Revision 0002: a bad night's coverage report is longer than the old 8,000 characters.
    import json

    from fleet import outbox

    engine = make_engine(database_url)
    problems = [{"kind": "arm", "why": "device offline", "check_id": i} for i in range(400)]
    with Session(engine) as session:
        event = outbox.enqueue(
            session, kind="coverage.report", payload={"problems": problems}, now=1.0
        )
        session.commit()
        assert len(event.payload) > 8000
        assert json.loads(event.payload)["problems"] == problems
