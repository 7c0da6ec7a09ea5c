"""README command 1's stack (`tillsyn dev up` / `dev down`), run twice in a row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def tillsyn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tillsyn_cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def alive(pid: int) -> bool:
    """Running (a zombie is not: the stack's processes outlive `dev up`, their parent, and
    are reaped by whoever adopts them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_second_dev_stack_after_a_stopped_one_starts_clean(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    first = tillsyn("dev", "up", "--devices", "1", "--dir", str(root))
    assert first.returncode == 0, first.stderr[-2000:]
    pids = [json.loads((root / "stack.json").read_text())["broker"]["pid"]]
    assert tillsyn("dev", "down", "--dir", str(root)).returncode == 0

    # Its database knows the dev staff (second factor enrolled), the device and its plan:
    # the second run used to stop at "a second factor is already enrolled", broker running.
    second = tillsyn("dev", "up", "--devices", "1", "--dir", str(root))
    try:
        assert second.returncode == 0, second.stderr[-2000:]
        assert "previous stack's files" in second.stdout
        assert (root.with_name("dev.previous") / "fleet" / "fleet.db").exists()
        stack = json.loads((root / "stack.json").read_text())
        pids += [stack["broker"]["pid"], stack["fleet"]["pid"], stack["devices"][0]["pid"]]
    finally:
        assert tillsyn("dev", "down", "--dir", str(root)).returncode == 0
    assert not [pid for pid in pids if alive(pid)]
