"""Requests the gateway holds for a model with no ready replica, as ModelDeployment annotations.

Each gateway replica publishes its own count under its own key, `held.modelfleet.io/<gateway>`,
with the value `<count> <RFC 3339 time>`: refreshed while it holds requests, removed when it
holds none. Several gateway replicas never overwrite each other, and the operator adds up the
counts that are fresh; a count a gateway could not remove (it stopped) goes stale and is ignored.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime

from modelfleet.api.labels import PREFIX
from modelfleet.api.times import format_time_ms, parse_time

HELD_PREFIX = f"held.{PREFIX}/"
# The name part of an annotation key: at most 63 characters, alphanumeric at both ends.
_NAME_MAX = 63
_BAD = re.compile(r"[^a-z0-9._-]+")


def held_key(gateway: str) -> str:
    """The annotation key of one gateway replica (its Pod name, which is its hostname)."""
    name = _BAD.sub("-", gateway.lower()).strip("-._") or "gateway"
    if len(name) > _NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = name[: _NAME_MAX - 11].rstrip("-._") + "-" + digest
    return HELD_PREFIX + name


def format_held(count: int, at: datetime | float) -> str:
    return f"{count} {format_time_ms(at)}"


def parse_held(value: str) -> tuple[int, datetime] | None:
    """(count, time) from an annotation value; None for anything else."""
    parts = value.split()
    if len(parts) != 2 or not (parts[0].isascii() and parts[0].isdigit()):
        return None
    at = parse_time(parts[1])
    return None if at is None else (int(parts[0]), at)


def sum_held(annotations: Mapping[str, str], now: datetime, fresh_s: float) -> int:
    """The requests held for a model by every gateway replica whose count is fresh."""
    total = 0
    for key, value in annotations.items():
        if not key.startswith(HELD_PREFIX):
            continue
        parsed = parse_held(value)
        if parsed is not None and (now - parsed[1]).total_seconds() <= fresh_s:
            total += parsed[0]
    return total


def stale_held_keys(annotations: Mapping[str, str], now: datetime, stale_s: float) -> list[str]:
    """Keys of counts older than `stale_s` (or unreadable): left by a gateway that stopped."""
    out = []
    for key, value in annotations.items():
        if not key.startswith(HELD_PREFIX):
            continue
        parsed = parse_held(value)
        if parsed is None or (now - parsed[1]).total_seconds() > stale_s:
            out.append(key)
    return sorted(out)
