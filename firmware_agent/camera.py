"""Camera drivers: the one interface the agent turns the camera on and off through.

``lock``       the device is LOCKED: camera off and unable to start
``unlock``     the device is ARMED: camera still off, a look may start
``look_start`` the device is VIEWING: camera on for one look
``look_end``   the look is over: camera off again
``health``     ok / fault / unplugged

Two drivers: :class:`SimulatedCamera` (tests, demos: it records every switch with a
monotonic timestamp) and :class:`ExecHookCamera` (runs a vendor program per event).
No driver ever hands an image or a sound to the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from tillsyn_protocol import CameraHealth, DeviceKind

from .config import AgentConfig, ExecCameraConfig, SimulatedCameraConfig
from .errors import CameraError

__all__ = [
    "CameraDriver",
    "CameraEvent",
    "CameraRecord",
    "ExecHookCamera",
    "SimulatedCamera",
    "SimulatedVideoPhone",
    "build_camera",
    "driver_timeout",
]

log = logging.getLogger(__name__)

CameraEvent = Literal["lock", "unlock", "look-start", "look-end"]
# Also run by the exec hook: showing the pairing code, and pairing done.
HookEvent = CameraEvent | Literal["pairing-code", "paired", "call-wait"]
_STDERR_LOG_CHARS = 200


class CameraDriver(Protocol):
    async def lock(self) -> None: ...

    async def unlock(self) -> None: ...

    async def look_start(self, look_id: str) -> None: ...

    async def look_end(self, look_id: str) -> None: ...

    async def health(self) -> CameraHealth: ...


@dataclass(frozen=True, slots=True)
class CameraRecord:
    mono: float
    event: CameraEvent
    look_id: str | None
    on: bool  # whether the camera was on after this event


class SimulatedCamera:
    """An in-memory camera. Turning off always works; turning on fails unless healthy."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self.history: list[CameraRecord] = []
        self.on = False
        self.armed = False
        self._health = CameraHealth.OK
        self.pairing_codes: list[str] = []

    def set_health(self, health: CameraHealth) -> None:
        """Simulate a fault, an unplugged camera, or its repair."""
        self._health = health

    async def lock(self) -> None:
        self.on = self.armed = False
        self._record("lock", None)

    async def unlock(self) -> None:
        self.armed = True
        self._record("unlock", None)

    async def look_start(self, look_id: str) -> None:
        if self._health is not CameraHealth.OK:
            raise CameraError("look-start", f"camera {self._health.value}")
        self.on = True
        self._record("look-start", look_id)

    async def look_end(self, look_id: str) -> None:
        self.on = False
        self._record("look-end", look_id)

    async def health(self) -> CameraHealth:
        return self._health

    def on_intervals(self) -> list[tuple[float, float | None, str | None]]:
        """(on, off, look_id) for every period the camera was on; off None if still on."""
        intervals: list[tuple[float, float | None, str | None]] = []
        start: tuple[float, str | None] | None = None
        for rec in self.history:
            if rec.on and start is None:
                start = (rec.mono, rec.look_id)
            elif not rec.on and start is not None:
                intervals.append((start[0], rec.mono, start[1]))
                start = None
        if start is not None:
            intervals.append((start[0], None, start[1]))
        return intervals

    def _record(self, event: CameraEvent, look_id: str | None) -> None:
        self.history.append(CameraRecord(self._monotonic(), event, look_id, self.on))

    # Pairing display hooks (firmware_agent/enroll.py): a real device blinks or shows it.
    async def show_pairing_code(self, user_code: str, verification_uri: str) -> None:
        self.pairing_codes.append(user_code)

    async def pairing_done(self) -> None:
        self.pairing_codes.append("paired")


class SimulatedVideoPhone(SimulatedCamera):
    """A video phone: a look rings the resident, and only an answered call turns it on.

    There is no way to ring it but ``look_start``, which the agent calls only for a
    verified ``look`` token: the device never places a call by itself.
    """

    def __init__(
        self,
        *,
        answer: bool = True,
        answer_after_s: float = 0.2,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(monotonic=monotonic)
        self.answer = answer
        self.answer_after_s = answer_after_s
        self.rings: list[str] = []
        self._ringing: str | None = None

    async def look_start(self, look_id: str) -> None:
        if await self.health() is not CameraHealth.OK:
            raise CameraError("look-start", "phone not healthy")
        self.rings.append(look_id)  # ringing; nothing is on until the resident answers
        self._ringing = look_id

    async def look_end(self, look_id: str) -> None:
        self._ringing = None  # hang up: a late answer connects nothing
        await super().look_end(look_id)

    async def call_answered(self, look_id: str, within_s: float) -> bool:
        if not self.answer or self.answer_after_s > within_s:
            await asyncio.sleep(within_s)
            return False
        await asyncio.sleep(self.answer_after_s)
        if self._ringing != look_id:
            return False
        self.on = True
        self._record("look-start", look_id)
        return True


class ExecHookCamera:
    """Runs ``program EVENT`` for each switch, bounded by a timeout.

    The environment carries only ``TILLSYN_DEVICE_ID``, ``TILLSYN_EVENT`` and, for looks,
    ``TILLSYN_LOOK_ID`` (plus ``PATH``): never a staff id or any other personal data. The
    program runs in its own process group, which is killed as a whole on timeout. A hook
    that fails or times out is a :class:`CameraError`; ``health`` reports ``fault`` until a
    later hook succeeds.
    """

    def __init__(
        self, program: str | os.PathLike[str], timeout_s: float = 5.0, *, device_id: str = ""
    ) -> None:
        self.program = Path(program)
        self.timeout_s = timeout_s
        self.device_id = device_id
        self._health = CameraHealth.OK

    async def lock(self) -> None:
        await self._run("lock", None)

    async def unlock(self) -> None:
        await self._run("unlock", None)

    async def look_start(self, look_id: str) -> None:
        await self._run("look-start", look_id)

    async def look_end(self, look_id: str) -> None:
        await self._run("look-end", look_id)

    async def show_pairing_code(self, user_code: str, verification_uri: str) -> None:
        """``program pairing-code`` with TILLSYN_USER_CODE (an LED pattern, a display)."""
        await self._exec(
            "pairing-code",
            None,
            {"TILLSYN_USER_CODE": user_code, "TILLSYN_VERIFICATION_URI": verification_uri},
        )

    async def pairing_done(self) -> None:
        await self._exec("paired", None)

    async def health(self) -> CameraHealth:
        if not os.access(self.program, os.X_OK):
            return CameraHealth.UNPLUGGED
        return self._health

    async def _run(self, event: CameraEvent, look_id: str | None) -> None:
        try:
            await self._exec(event, look_id)
        except CameraError:
            self._health = CameraHealth.FAULT
            raise
        self._health = CameraHealth.OK

    async def call_answered(self, look_id: str, within_s: float) -> bool:
        """Video phone: ``program call-wait`` exits 0 once the resident answered the call
        (within ``within_s``); anything else is "not answered" (not a camera fault)."""
        try:
            await self._exec("call-wait", look_id, timeout_s=within_s)
        except CameraError:
            return False
        return True

    async def _exec(
        self,
        event: HookEvent,
        look_id: str | None,
        extra: dict[str, str] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TILLSYN_DEVICE_ID": self.device_id,
            "TILLSYN_EVENT": event,
        }
        if look_id is not None:
            env["TILLSYN_LOOK_ID"] = look_id
        env.update(extra or {})
        try:
            proc = await asyncio.create_subprocess_exec(
                str(self.program),
                event,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise CameraError(event, f"cannot run hook: {exc.strerror}") from None
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                _, stderr = await proc.communicate()
        except TimeoutError:
            _kill_group(proc)
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
            raise CameraError(event, f"hook timed out after {self.timeout_s:g} s") from None
        except asyncio.CancelledError:
            _kill_group(proc)
            raise
        if proc.returncode != 0:
            tail = stderr.decode("utf-8", "replace").strip()[:_STDERR_LOG_CHARS]
            log.debug("camera hook %s stderr: %s", event, tail)
            raise CameraError(event, f"hook exited with status {proc.returncode}")


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def build_camera(config: AgentConfig) -> CameraDriver:
    """The driver the config names."""
    match config.camera:
        case SimulatedCameraConfig(answer_calls=answer, answer_after_s=after) if (
            config.kind is DeviceKind.VIDEO_PHONE
        ):
            return SimulatedVideoPhone(answer=answer, answer_after_s=after)
        case SimulatedCameraConfig():
            return SimulatedCamera()
        case ExecCameraConfig(program=program, timeout_s=timeout_s):
            return ExecHookCamera(program, timeout_s, device_id=config.device_id)


def build_display(camera: SimulatedCameraConfig | ExecCameraConfig, state_dir: Path) -> object:
    """What shows the pairing code while the device has no identity yet."""
    match camera:
        case SimulatedCameraConfig():
            return SimulatedCamera()
        case ExecCameraConfig(program=program, timeout_s=timeout_s):
            return ExecHookCamera(program, timeout_s)


def driver_timeout(config: AgentConfig) -> float:
    """How long the agent waits for any one driver call before calling it a fault."""
    match config.camera:
        case ExecCameraConfig(timeout_s=timeout_s):
            return timeout_s + 2.0
        case SimulatedCameraConfig():
            return 5.0
