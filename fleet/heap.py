"""The process's memory: freed C heap given back to the system (glibc ``malloc_trim``), and
the cyclic GC kept off what lives as long as the process.

A storm (10,000 devices making first contact, a window edge) briefly needs far more
memory than the steady state; CPython frees it, but glibc keeps the freed pages in the
process's heap, so the resident size stays at the storm's high-water mark. Trimming now
and then returns them. A no-op where the C library has no ``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

__all__ = ["settle", "trim"]

# Collection thresholds once start-up's objects are frozen (CPython's are 700, 10, 10): a
# full collection after 100 middle ones instead of 10, i.e. every ~700,000 net allocations
# instead of ~70,000. Young collections as before: a first threshold of 10,000 saved no
# more CPU than this in a storm's database work measured alone.
GC_THRESHOLDS = (700, 10, 100)


def _load() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    trim_fn: Callable[[int], int] = fn
    return trim_fn


_malloc_trim = _load()


def trim() -> bool:
    """Release free heap pages; True if the C library released any."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False


def settle() -> None:
    """What start-up built lives as long as the process: keep it out of the cyclic GC's
    scans (``gc.freeze``), and collect less often from then on.

    CPython runs a full collection once the objects that survived young collections since
    the last one reach a quarter of those that survived it; frozen objects do not count,
    so after the freeze a full collection came every ~70,000 allocations, each scanning
    everything the storm in progress holds (a pass's 10,000 ORM rows, a batch of 5,000
    messages). In a 10,000-device window start that was 23 full collections of ~80 ms,
    2.8 s in the GC while the fleet used 9 CPU-s (``gc.callbacks``, wall time: an upper
    bound). Short-lived cycles (sessions, futures) still die in the young generations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
