"""Timestamps on the wire: RFC 3339 in UTC with a `Z`, and one tolerant parser.

Kubernetes writes `Time` fields (creationTimestamp, a condition's lastTransitionTime) at second
precision, and reads `MicroTime` fields (a Lease's acquireTime and renewTime) only with exactly
six fraction digits (Go's layout `RFC3339Micro`). So there is one formatter per precision:

- `format_time`: seconds, `2026-01-02T03:04:05Z` (Kubernetes `Time`, modelfleet's annotations);
- `format_time_ms`: milliseconds, `2026-01-02T03:04:05.678Z` (the gateway's last-request and
  demand annotations);
- `format_micro_time`: microseconds, `2026-01-02T03:04:05.678901Z` (Kubernetes `MicroTime`).

Each takes an aware `datetime`, a naive one (read as UTC: Kubernetes never writes local times),
or seconds since the epoch, and truncates to its precision. `parse_time` reads what any of them,
Kubernetes or Go's `RFC3339Nano` writes, and returns None for what is not a time.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

# A fraction of more than 6 digits (Go writes nanoseconds): keep the microseconds.
_LONG_FRACTION = re.compile(r"(\.\d{6})\d+")


def _as_utc(value: datetime | float) -> datetime:
    """`value` as an aware UTC datetime; a naive datetime is taken to be UTC already."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime.fromtimestamp(value, UTC)


def _format(value: datetime | float, timespec: str) -> str:
    return _as_utc(value).replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def format_time(value: datetime | float) -> str:
    """RFC 3339 in UTC at second precision, e.g. 2026-01-02T03:04:05Z (Kubernetes `Time`)."""
    return _format(value, "seconds")


def format_time_ms(value: datetime | float) -> str:
    """RFC 3339 in UTC at millisecond precision, e.g. 2026-01-02T03:04:05.678Z."""
    return _format(value, "milliseconds")


def format_micro_time(value: datetime | float) -> str:
    """RFC 3339 in UTC with microseconds, e.g. 2026-01-02T03:04:05.678901Z (`MicroTime`)."""
    return _format(value, "microseconds")


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 (or ISO 8601) time as an aware UTC datetime; None when absent or malformed.

    Tolerant by design: it reads values written by other programs (the API server, kubectl,
    people editing annotations), where a bad value must not stop a reconcile. Accepts `Z`, `z` or
    a numeric offset, `T`, `t` or a space between date and time, any number of fraction digits
    (beyond microseconds they are dropped), and no offset at all (read as UTC).
    """
    if not text:
        return None
    normal = _LONG_FRACTION.sub(r"\1", text.strip())
    if len(normal) > 10 and normal[10] == "t":
        normal = normal[:10] + "T" + normal[11:]
    if normal.endswith("z"):
        normal = normal[:-1] + "Z"
    try:
        value = datetime.fromisoformat(normal)
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
