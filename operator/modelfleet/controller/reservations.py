"""GPUs freed by an eviction, held for the deployment that evicted until it places its replica.

A reservation is decided under the placement lock together with the eviction, kept here for the
placement view, and written to the evicting ModelDeployment as an annotation before any victim is
deleted, so an operator that restarts between the eviction and the create still holds the GPUs
(`seed` reads them back from the deployments' annotations).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from modelfleet.api import labels as L
from modelfleet.api.times import format_time, parse_time

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Reservation:
    """GPUs `gpu_ids` on `node`, held until `until`."""

    node: str
    gpu_ids: tuple[str, ...]
    until: datetime


def format_reservation(reservation: Reservation) -> str:
    """The annotation value: JSON with the GPU IDs and the expiry."""
    return json.dumps(
        {"gpus": list(reservation.gpu_ids), "until": format_time(reservation.until)},
        separators=(",", ":"),
    )


def parse_reservation(text: str | None) -> Reservation | None:
    """The annotation value back; None when absent or malformed (a hand edit holds nothing)."""
    if not text:
        return None
    try:
        doc: Any = json.loads(text)
        gpus = tuple(str(g) for g in doc["gpus"])
        until = parse_time(str(doc["until"]))
    except (ValueError, KeyError, TypeError):
        return None
    nodes = {g.rpartition(":")[0] for g in gpus}
    if until is None or len(nodes) != 1 or "" in nodes:
        return None
    return Reservation(nodes.pop(), gpus, until)


class Reservations:
    """The reservations of every evicting deployment, by (namespace, name)."""

    def __init__(self) -> None:
        self._held: dict[Key, Reservation] = {}

    def hold(self, key: Key, reservation: Reservation) -> None:
        self._held[key] = reservation

    def release(self, key: Key) -> bool:
        """Drop `key`'s reservation; True when it had one."""
        return self._held.pop(key, None) is not None

    def active(self, now: datetime) -> dict[Key, Reservation]:
        """The reservations that have not expired."""
        return {k: r for k, r in self._held.items() if r.until > now}

    def seed(self, annotations: Iterable[tuple[Key, Mapping[str, str]]], now: datetime) -> None:
        """Take up the reservations the deployments' annotations still hold (after a restart)."""
        for key, ann in annotations:
            found = parse_reservation(ann.get(L.ANN_RESERVATION))
            if found is not None and found.until > now and key not in self._held:
                self.hold(key, found)


__all__ = [
    "Reservation",
    "Reservations",
    "format_reservation",
    "parse_reservation",
]
