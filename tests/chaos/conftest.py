"""Fixtures of the chaos tests: a PKI and a broker of each test's own (the tests SIGKILL
the broker and issue hundreds of device certificates), and ``chaos_report``.

Each test reports its figures with ``chaos_report(title, rows)``: they go into the
JUnit XML (``record_property``) and into one table per test printed in the terminal
summary, with or without ``-s``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.launcher import MosquittoProcess
from broker.pki import PkiPaths, init_pki
from tests.chaos.harness import table

_REPORTS = pytest.StashKey[list[str]]()

Report = Callable[[str, list[tuple[str, Any]]], None]


@pytest.fixture
def chaos_pki(tmp_path: Path) -> PkiPaths:
    return init_pki(tmp_path / "pki")


@pytest.fixture
def broker(chaos_pki: PkiPaths, tmp_path: Path) -> Iterator[MosquittoProcess]:
    """Mosquitto with the production config (TLS, ACL, CRL, persistence) for this test."""
    proc = MosquittoProcess(pki=chaos_pki, workdir=tmp_path / "broker")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def chaos_report(
    request: pytest.FixtureRequest, record_property: Callable[[str, object], None]
) -> Report:
    def report(title: str, rows: list[tuple[str, Any]]) -> None:
        for key, value in rows:
            record_property(key, value)
        text = table(f"{request.node.nodeid}: {title}", rows)
        request.config.stash.setdefault(_REPORTS, []).append(text)
        print(text)

    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    reports = config.stash.get(_REPORTS, [])
    if reports:
        terminalreporter.section("chaos figures")
        for text in reports:
            terminalreporter.write_line(text)
