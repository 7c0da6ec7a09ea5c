"""Run a fleet service process on a simulated clock shared through a file (test-only).

    python -m tests.integration.sim_fleet --config fleet.toml --offset-file offset

Simulated time = real time + the number in ``offset-file`` (written by the test, which
moves it forward). The process can be SIGKILLed at any moment and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

from tillsyn_protocol import Clock


class FileClock:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0.0

    def set(self, instant: float) -> None:
        """Move forward to ``instant`` (atomic replace: readers never see half a number)."""
        self._offset = max(self._read(), instant - time.time())
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(repr(self._offset))
        tmp.replace(self._path)

    def _read(self) -> float:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self._offset = float(self._path.read_text())
        return self._offset

    def __call__(self) -> float:
        return time.time() + self._read()

    def now(self) -> Clock:  # firmware_agent.clock.ClockSource
        offset = self._read()
        return Clock(wall=time.time() + offset, mono=time.monotonic() + offset, synced=True)


def main() -> None:
    from fleet.config import load_settings
    from fleet.service import FleetService

    args = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=False))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings(Path(args["--config"]))
    service = FleetService(settings, clock=FileClock(Path(args["--offset-file"])))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
