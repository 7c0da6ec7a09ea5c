"""Where the agent reads time: wall clock, monotonic clock and NTP synchronisation.

The state machine takes a :class:`tillsyn_protocol.Clock` as an argument; this module is
the only place that reads the real clocks, so tests inject their own :class:`ClockSource`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import time
from typing import Protocol

from tillsyn_protocol import Clock

__all__ = ["TIME_ERROR", "ClockSource", "SystemClock", "kernel_clock_synced"]

log = logging.getLogger(__name__)

# adjtimex(2) return value when the kernel considers the clock unsynchronised.
TIME_ERROR = 5
# Larger than struct timex on every Linux ABI (208 bytes on x86_64); modes=0 reads only.
_TIMEX_BYTES = 512


class ClockSource(Protocol):
    def now(self) -> Clock:
        """Read wall time (epoch s), monotonic time (s) and whether the clock is synced."""
        ...


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def kernel_clock_synced() -> bool:
    """Ask the Linux kernel (adjtimex) whether NTP has synchronised the clock.

    Anything that prevents an answer (not Linux, no libc, the call failing) counts as
    unsynchronised: the caller only asks when synchronisation is required, so fail closed.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if libc is None:
        return False
    try:
        buf = ctypes.create_string_buffer(_TIMEX_BYTES)
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError):
        return False
    return state not in (-1, TIME_ERROR)


class SystemClock:
    """The real clocks; ``require_ntp_sync`` adds the kernel's synchronisation status."""

    def __init__(self, *, require_ntp_sync: bool = False) -> None:
        self._require_sync = require_ntp_sync
        self._last_synced: bool | None = None

    def now(self) -> Clock:
        synced = kernel_clock_synced() if self._require_sync else True
        if synced != self._last_synced and self._last_synced is not None:
            log.warning("clock synchronisation %s", "regained" if synced else "lost")
        self._last_synced = synced
        return Clock(wall=time.time(), mono=time.monotonic(), synced=synced)
