"""Give freed C-heap memory back to the operating system (glibc ``malloc_trim``).

A storm (10,000 devices making first contact, a window edge) briefly needs far more
memory than the steady state; CPython frees it, but glibc keeps the freed pages in the
process's heap, so the resident size stays at the storm's high-water mark. Trimming now
and then returns them. A no-op where the C library has no ``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["trim"]


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
