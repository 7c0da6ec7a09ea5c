"""fleet.heap.trim gives freed C-heap pages back (glibc), where RSS otherwise stays."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from fleet import heap


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_returns_freed_heap_pages_to_the_system() -> None:
    assert heap._malloc_trim is not None
    # 64 MiB in 2 KiB blocks (malloc, not pymalloc: > 512 B; not mmap: < 128 KiB), then
    # free all but every 64th: the heap keeps its size, the pages between are free.
    blocks = [bytes(2048) + bytes([i % 256]) for i in range(32_768)]
    kept = blocks[::64]
    del blocks
    before = rss_kib()
    assert heap.trim() is True
    after = rss_kib()
    assert before - after > 32 * 1024, (before, after)  # most of the 64 MiB came back
    assert len(kept) == 512


def test_settle_freezes_start_up_and_collects_less_often() -> None:
    import gc

    before = gc.get_threshold()
    try:
        kept = [[i] for i in range(1000)]  # start-up's state
        heap.settle()
        assert gc.get_threshold() == heap.GC_THRESHOLDS
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.set_threshold(*before)
