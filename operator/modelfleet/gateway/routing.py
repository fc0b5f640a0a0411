"""LLM-aware routing, the pure parts: the hash ring, the routing keys and the load score.

- **Ring**: consistent hashing over replica names, `VNODES` points each. The names are the
  Pods' (`<deployment>-instance-<n>`), so every gateway replica builds the same ring from the
  same Pods and sends a given key to the same replica without talking to the others; a replica
  that joins or leaves moves only the keys on its own arcs.
- **Bounded load** (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads",
  2016): walking the ring from the key, the first replica whose load stays within
  `load_factor` x the average takes the request; so a hot prefix spills over to the next replica
  on the ring (the same one for every gateway) instead of queueing behind itself.
- **What a gateway remembers** (KeyMemory): where each key went last, in bounded memory. A new
  key of a model whose keys rarely come back (a prompt nobody shares) buys nothing from its
  owner's cache, so it goes to the replica with the fewest requests in flight, its owner
  whenever that is among them: such prompts are balanced as by least-outstanding. A key seen
  twice is counted on its replica, and a replica takes a reused key it does not hold only
  within a key bound, so that no replica's cache has to hold far more prefixes than the
  others'. A key goes back to the replica it went to last (its prefix is cached there) while
  that is within both bounds.
- **Keys**: the prompt prefix (chat messages' contents in order or the completion prompt,
  whitespace collapsed, cut at `prefix_chars`: a chat whose one user message reads like a
  completion prompt hashes alike), or a session id (`x-session-id`, else the OpenAI `user`).
- **Load**: the gateway's in-flight requests to the replica, or with engine figures fresher than
  their limit, the larger of that and the engine's running + waiting, plus the waiting again
  (a queue in the engine means it is saturated, whoever sent the requests).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet.api.v1alpha1 import Balancing

VNODES = 128  # points per replica on the ring: spreads keys within a few % for a handful
DEFAULT_PREFIX_CHARS = 256
DEFAULT_LOAD_FACTOR = 1.5
SESSION_HEADER = "x-session-id"
_MAX_SESSION_CHARS = 256
# Routing keys remembered per gateway (all models together); beyond this the least recently
# seen are forgotten. A key is an entry of about 200 bytes, so this is ~13 MiB at most.
MEMORY_KEYS = 65536
# A replica takes a reused key it does not hold only within this factor of the average count
# (plus one): tighter than the load bound, since a prefix occupies a cache between requests.
KEY_FACTOR = 1.1
# A model's new keys go by least-outstanding while fewer than this share of its
# requests carry a key seen before; the share is a moving average with this weight.
REUSE_THRESHOLD = 0.5
REUSE_ALPHA = 1 / 128


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
    ring: Ring,
    key: int,
    loads: Sequence[float],
    eligible: Sequence[bool],
    load_factor: float,
    held: Sequence[int] | None = None,
    last: int | None = None,
    counted: bool = False,
) -> int | None:
    """The first eligible replica from `key` on the ring whose load after this request stays
    within `load_factor` x the average (at least 1); None when none is eligible.

    With `held` (how many reused keys this gateway counts on each replica) a replica takes a
    key it does not hold only while its count stays within `KEY_FACTOR` x the average plus one:
    prefixes, not only requests, are spread so that no replica's cache must hold far more than
    the others'. `last` is the replica the key went to last (its prefix is cached there),
    `counted` whether the key is counted there: the key stays there while that replica is
    within both bounds. When no replica passes both, the first within the load bound takes it,
    else the first.
    """
    count = sum(eligible)
    if count == 0:
        return None
    total = sum(load for load, ok in zip(loads, eligible, strict=True) if ok)
    capacity = max(1.0, math.ceil(load_factor * (total + 1) / count))
    if held is None:
        return _first_within(ring, key, eligible, lambda i: loads[i] + 1 <= capacity)
    keys = sum(h for h, ok in zip(held, eligible, strict=True) if ok)
    at_last = last is not None and eligible[last]
    if not (counted and at_last):
        keys += 1
    key_cap = math.ceil(KEY_FACTOR * keys / count) + 1

    def within(index: int) -> bool:
        extra = 0 if counted and index == last else 1
        return loads[index] + 1 <= capacity and held[index] + extra <= key_cap

    if last is not None and at_last and within(last):
        return last  # stay where the prefix is cached
    chosen = _first_within(ring, key, eligible, within)
    if chosen is not None and within(chosen):
        return chosen
    return _first_within(ring, key, eligible, lambda i: loads[i] + 1 <= capacity)


def _first_within(
    ring: Ring, key: int, eligible: Sequence[bool], ok: Callable[[int], bool]
) -> int | None:
    """The first eligible replica from `key` on the ring that is `ok`, else the first eligible
    one; None when none is eligible."""
    first: int | None = None
    for index in ring.walk(key):
        if eligible[index]:
            if ok(index):
                return index
            if first is None:
                first = index
    return first


def choose_least(
    ring: Ring, key: int, loads: Sequence[float], eligible: Sequence[bool]
) -> int | None:
    """The first eligible replica from `key` on the ring among those with the lowest load
    (the owner whenever it is one of them); None when none is eligible."""
    lowest = min((load for load, ok in zip(loads, eligible, strict=True) if ok), default=None)
    if lowest is None:
        return None
    for index in ring.walk(key):
        if eligible[index] and loads[index] <= lowest:
            return index
    return None  # not reached: the walk visits every replica


@dataclass(frozen=True, slots=True)
class KeyView:
    """What this gateway remembers of a request's key, for the balancer."""

    least_loaded: bool = False  # a new key of a model whose keys rarely come back
    held: Sequence[int] | None = None  # reused keys counted on each replica, in route order
    last: int | None = None  # the replica the key went to last
    counted: bool = False  # whether it is counted there (seen at least twice)


class KeyMemory:
    """Which replica each routing key of each model went to last, in bounded memory.

    From it: whether a key is new (not seen lately, or forgotten); how many reused keys (seen
    at least twice) each replica holds, for the key bound; how often a model's keys come back
    (a moving average over its requests, starting at "always"); and the router's view of
    prefix-cache hits: a request whose key last went to the same replica probably finds its
    prefix cached there ("hit"), one sent elsewhere starts cold ("moved"), a new key is "new".
    One memory for all models: the least recently seen key is forgotten first.
    """

    def __init__(self, limit: int = MEMORY_KEYS) -> None:
        self.limit = limit
        self.last: dict[tuple[str, int], tuple[str, bool]] = {}  # -> (replica, reused)
        self.held: dict[str, dict[str, int]] = {}  # model -> replica -> reused keys
        self.reuse: dict[str, float] = {}  # model -> share of requests with a known key

    def view(self, model: str, key: int, names: Sequence[str]) -> KeyView:
        """The balancer's view of `key` over replicas `names` (the route's, in order)."""
        entry = self.last.get((model, key))
        if entry is None and self.reuse.get(model, 1.0) < REUSE_THRESHOLD:
            return KeyView(least_loaded=True)
        counts = self.held.get(model, {})
        held = [counts.get(name, 0) for name in names]
        if entry is None:
            return KeyView(held=held)
        last = None
        with contextlib.suppress(ValueError):  # the replica may have left
            last = names.index(entry[0])
        return KeyView(held=held, last=last, counted=entry[1])

    def record(self, model: str, key: int, replica: str) -> str:
        """Remember where `key` went; "new", "hit" or "moved"."""
        entry = (model, key)
        last = self.last.pop(entry, None)
        reuse = self.reuse.get(model, 1.0)
        self.reuse[model] = reuse + REUSE_ALPHA * ((last is not None) - reuse)
        if last is None:
            if len(self.last) >= self.limit:
                oldest = next(iter(self.last))
                self._release(oldest[0], *self.last.pop(oldest))
            self.last[entry] = (replica, False)
            return "new"
        self._release(model, *last)
        counts = self.held.setdefault(model, {})
        counts[replica] = counts.get(replica, 0) + 1
        self.last[entry] = (replica, True)
        return "hit" if last[0] == replica else "moved"

    def _release(self, model: str, replica: str, reused: bool) -> None:
        if not reused:
            return
        counts = self.held[model]
        left = counts[replica] - 1
        if left:
            counts[replica] = left
        else:
            del counts[replica]


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
