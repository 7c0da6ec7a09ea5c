"""Camera drivers: the simulated camera's record, and the exec hook's contract."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from firmware_agent import CameraError, ExecHookCamera, SimulatedCamera
from tillsyn_protocol import CameraHealth


async def test_simulated_camera_records_on_off_intervals() -> None:
    ticks = iter(range(100))
    cam = SimulatedCamera(monotonic=lambda: float(next(ticks)))
    await cam.lock()
    await cam.unlock()
    await cam.look_start("a")
    await cam.look_end("a")
    await cam.look_start("b")
    assert cam.on
    assert cam.on_intervals() == [(2.0, 3.0, "a"), (4.0, None, "b")]
    await cam.lock()
    assert not cam.on and not cam.armed
    assert [r.event for r in cam.history] == [
        "lock", "unlock", "look-start", "look-end", "look-start", "lock",
    ]  # fmt: skip


async def test_simulated_camera_fault_refuses_to_turn_on_but_always_turns_off() -> None:
    cam = SimulatedCamera()
    cam.set_health(CameraHealth.UNPLUGGED)
    assert await cam.health() is CameraHealth.UNPLUGGED
    with pytest.raises(CameraError) as info:
        await cam.look_start("x")
    assert info.value.operation == "look-start"
    assert not cam.on
    await cam.look_end("x")
    await cam.lock()
    cam.set_health(CameraHealth.OK)
    await cam.look_start("y")
    assert cam.on


# --- exec hook --------------------------------------------------------------------------


def _hook(tmp_path: Path, body: str) -> Path:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n" + body)
    hook.chmod(0o755)
    return hook


RECORDER = (
    'echo "$1 id=$TILLSYN_DEVICE_ID look=${TILLSYN_LOOK_ID:-none}" >> "$(dirname "$0")/calls"\n'
)


async def test_exec_hook_runs_program_with_event_and_ids(tmp_path: Path) -> None:
    cam = ExecHookCamera(_hook(tmp_path, RECORDER), 5, device_id="dev-hook1")
    await cam.lock()
    await cam.unlock()
    await cam.look_start("look42")
    await cam.look_end("look42")
    assert (tmp_path / "calls").read_text().splitlines() == [
        "lock id=dev-hook1 look=none",
        "unlock id=dev-hook1 look=none",
        "look-start id=dev-hook1 look=look42",
        "look-end id=dev-hook1 look=look42",
    ]
    assert await cam.health() is CameraHealth.OK


async def test_exec_hook_environment_carries_no_personal_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "leak")
    cam = ExecHookCamera(_hook(tmp_path, 'env > "$(dirname "$0")/env"\n'), 5, device_id="dev-x1")
    await cam.look_start("look1")
    names = {line.split("=", 1)[0] for line in (tmp_path / "env").read_text().splitlines()}
    # /bin/sh may add PWD, SHLVL and _ on its own; nothing else may be there.
    extra = names - {"PATH", "TILLSYN_DEVICE_ID", "TILLSYN_EVENT", "TILLSYN_LOOK_ID"}
    assert extra <= {"PWD", "SHLVL", "_", "OLDPWD"}


async def test_exec_hook_failure_is_a_camera_error_and_a_fault(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    cam = ExecHookCamera(
        _hook(tmp_path, f'[ -e "{flag}" ] && {{ echo broken >&2; exit 3; }}\nexit 0\n'), 5
    )
    flag.write_text("")
    with pytest.raises(CameraError) as info:
        await cam.look_start("l1")
    assert info.value.operation == "look-start"
    assert info.value.why == "hook exited with status 3"
    assert await cam.health() is CameraHealth.FAULT
    flag.unlink()
    await cam.look_end("l1")
    assert await cam.health() is CameraHealth.OK


async def test_exec_hook_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The hook starts a grandchild and both hang: the timeout must kill them both.
    hook = _hook(tmp_path, f'sleep 30 &\necho $! > "{pidfile}"\nsleep 30\n')
    cam = ExecHookCamera(hook, 0.5)
    started = time.monotonic()
    with pytest.raises(CameraError, match=r"timed out after 0\.5 s"):
        await cam.look_start("l1")
    assert time.monotonic() - started < 3
    assert await cam.health() is CameraHealth.FAULT
    child = int(pidfile.read_text())
    for _ in range(100):
        if not _alive(child):
            break
        await asyncio.sleep(0.02)
    assert not _alive(child), "the hook's child survived the timeout"


async def test_exec_hook_missing_program(tmp_path: Path) -> None:
    cam = ExecHookCamera(tmp_path / "gone", 1)
    assert await cam.health() is CameraHealth.UNPLUGGED
    with pytest.raises(CameraError, match="cannot run hook"):
        await cam.lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- clock ------------------------------------------------------------------------------


def test_system_clock_sync_status(monkeypatch: pytest.MonkeyPatch) -> None:
    from firmware_agent import SystemClock, clock

    assert isinstance(clock.kernel_clock_synced(), bool)  # really asks the kernel
    assert SystemClock().now().synced is True  # not required: never consulted
    monkeypatch.setattr(clock, "kernel_clock_synced", lambda: False)
    reading = SystemClock(require_ntp_sync=True).now()
    assert reading.synced is False
    assert abs(reading.wall - time.time()) < 1
