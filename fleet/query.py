"""``IN`` lists of a few distinct lengths.

Each length of an ``IN (?, ?, ...)`` list is a distinct SQL text, and each text is a
statement the driver keeps prepared: Python's sqlite3 caches the last 128 per connection
(about 120 KB each for 500 values), psycopg prepares the ones it sees often. Batches of
device messages come in every size from 1 to 500, so their lookups filled the cache with
near-duplicates: 5-6 MB per connection with 10,000 devices connected, the largest part of
the fleet's memory per device, and a fresh prepare for most batches. Padded to the next
power of two (repeating the last value, which changes no result), a query has at most ten
texts.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import ColumnElement
from sqlmodel import col

MAX_PADDED = 512  # lists up to this long are padded; callers chunk at this size


def padded_length(n: int) -> int:
    """The length an ``IN`` list of ``n`` values is padded to."""
    if n <= 1 or n > MAX_PADDED:
        return n
    return 1 << (n - 1).bit_length()


def among(column: Any, values: Collection[Any]) -> ColumnElement[bool]:
    """``column IN values``, the list padded to :func:`padded_length`."""
    listed = list(values)
    if listed:
        listed += [listed[-1]] * (padded_length(len(listed)) - len(listed))
    return col(column).in_(listed)
