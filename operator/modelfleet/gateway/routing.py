"""LLM-aware routing, the pure parts: the hash ring, the routing keys and the load score.

- **Ring**: consistent hashing over replica names, `VNODES` points each. The names are the
  Pods' (`<deployment>-instance-<n>`), so every gateway replica builds the same ring from the
  same Pods and sends a given key to the same replica without talking to the others; a replica
  that joins or leaves moves only the keys on its own arcs.
- **Bounded load** (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads",
  2016): walking the ring from the key, the first replica whose load stays within
  `load_factor` x the average takes the request; so a hot prefix spills over to the next replica
  on the ring (the same one for every gateway) instead of queueing behind itself.
- **Keys**: the prompt prefix (chat messages' contents in order or the completion prompt,
  whitespace collapsed, cut at `prefix_chars`: a chat whose one user message reads like a
  completion prompt hashes alike), or a session id (`x-session-id`, else the OpenAI `user`).
- **Load**: the gateway's in-flight requests to the replica, or with engine figures fresher than
  their limit, the larger of that and the engine's running + waiting, plus the waiting again
  (a queue in the engine means it is saturated, whoever sent the requests).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet.api.v1alpha1 import Balancing

VNODES = 128  # points per replica on the ring: spreads keys within a few % for a handful
DEFAULT_PREFIX_CHARS = 256
DEFAULT_LOAD_FACTOR = 1.25
SESSION_HEADER = "x-session-id"
_MAX_SESSION_CHARS = 256


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """One model's routing, resolved from spec.routing and the gateway's defaults."""

    policy: Balancing = Balancing.ROUND_ROBIN
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    load_factor: float = DEFAULT_LOAD_FACTOR
    engine_load: bool = False

    @property
    def hashed(self) -> bool:
        return self.policy in (Balancing.PREFIX_HASH, Balancing.SESSION_AFFINITY)

    @property
    def uses_engine_load(self) -> bool:
        return self.policy == Balancing.LOAD_AWARE or (self.hashed and self.engine_load)


def hash_key(data: bytes) -> int:
    """A 64-bit position on the ring; the same on every machine and Python process."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """Replica indexes placed on a 64-bit ring by the hash of their names."""

    __slots__ = ("names", "owners", "points")

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        placed = sorted(
            (hash_key(f"{name}#{v}".encode()), index)
            for index, name in enumerate(self.names)
            for v in range(VNODES)
        )
        self.points = [p for p, _ in placed]
        self.owners = [i for _, i in placed]

    def walk(self, key: int) -> Iterator[int]:
        """Replica indexes in ring order from `key`, each once."""
        points = len(self.points)
        if not points:
            return
        count = len(self.names)
        seen: set[int] = set()
        at = bisect.bisect_left(self.points, key)
        for step in range(points):
            owner = self.owners[(at + step) % points]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == count:
                    return

    def owner(self, key: int) -> int | None:
        """The replica index a key belongs to when nothing is loaded."""
        if not self.points:
            return None
        return self.owners[bisect.bisect_left(self.points, key) % len(self.points)]


def choose_bounded(
    ring: Ring, key: int, loads: Sequence[float], eligible: Sequence[bool], load_factor: float
) -> int | None:
    """The first eligible replica from `key` on the ring whose load after this request stays
    within `load_factor` x the average (at least 1); None when none is eligible."""
    count = sum(eligible)
    if count == 0:
        return None
    total = sum(load for load, ok in zip(loads, eligible, strict=True) if ok)
    capacity = max(1.0, math.ceil(load_factor * (total + 1) / count))
    first: int | None = None
    for index in ring.walk(key):
        if not eligible[index]:
            continue
        if first is None:
            first = index
        if loads[index] + 1 <= capacity:
            return index
    return first


def compute_load(outstanding: int, engine: tuple[float, float] | None) -> float:
    """A replica's load: in-flight, or with fresh engine figures the larger of in-flight and
    the engine's running + waiting, plus its waiting again. `engine` is (running, waiting)."""
    if engine is None:
        return float(outstanding)
    running, waiting = engine
    return max(float(outstanding), running + waiting) + waiting


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text ones
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def extract_prefix(doc: dict[str, Any], chars: int) -> str | None:
    """The normalized first `chars` characters of a chat or completions request's prompt;
    None when it has none (embeddings, an empty prompt)."""
    messages = doc.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        # Whitespace runs collapse to one space, so twice the characters is always enough.
        for message in messages:
            if isinstance(message, dict):
                text = _text(message.get("content"))
                parts.append(text)
                size += len(text) + 1
                if size >= 2 * chars:
                    break
        raw = "\n".join(parts)
    else:
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if isinstance(prompt, list):  # token ids
            raw = " ".join(str(t) for t in prompt[: 2 * chars])
        elif isinstance(prompt, str):
            raw = prompt
        else:
            return None
    text = " ".join(raw[: 4 * chars].split())[:chars]
    return text or None


def extract_session(header: str | None, doc: dict[str, Any] | None) -> str | None:
    """The session a request belongs to: the x-session-id header, else the `user` field."""
    if header:
        return header[:_MAX_SESSION_CHARS]
    if doc is not None:
        user = doc.get("user")
        if isinstance(user, str) and user:
            return user[:_MAX_SESSION_CHARS]
    return None
