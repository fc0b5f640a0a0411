"""Who may read the agent: nobody checked, a shared bearer token, or Kubernetes TokenReview."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import aiohttp

from modelfleet.kube import ApiError, KubeClient

log = logging.getLogger(__name__)

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


class AuthUnavailable(RuntimeError):
    """The token could not be checked (the API server did not answer)."""


class Authenticator(Protocol):
    async def check(self, token: str) -> bool:
        """True when `token` may read the agent; raise AuthUnavailable when it cannot tell."""
        ...


def parse_bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class TokenFileAuth:
    """Accepts exactly the token in a file; the file is re-read when it changes (rotation)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._mtime = -1.0
        self._token = b""
        self._reload()
        if not self._token:
            raise ValueError(f"token file {path} is empty")

    def _reload(self) -> None:
        mtime = self._path.stat().st_mtime
        if mtime != self._mtime:
            self._token = self._path.read_bytes().strip()
            self._mtime = mtime

    async def check(self, token: str) -> bool:
        try:
            self._reload()
        except OSError as exc:
            log.warning("token file unreadable, keeping the previous token: %s", exc)
        # Constant time, so the comparison leaks nothing about the token's content.
        return bool(self._token) and hmac.compare_digest(token.encode(), self._token)


@dataclass
class TokenReviewAuth:
    """Asks the API server (TokenReview) whether a token is valid; caches answers briefly."""

    client: KubeClient
    audiences: tuple[str, ...] = ()
    ttl_ok_s: float = 30.0
    ttl_denied_s: float = 5.0
    max_entries: int = 1024
    _cache: dict[str, tuple[bool, float]] = field(default_factory=dict)

    async def check(self, token: str) -> bool:
        # Keys are digests: the cache never holds a usable token.
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit and hit[1] > now:
            return hit[0]
        spec: dict[str, object] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            reply = await self.client.create(TOKENREVIEW_PATH, body)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise AuthUnavailable(f"TokenReview failed: {exc}") from exc
        status = reply.get("status") or {}
        ok = bool(status.get("authenticated"))
        if not ok and status.get("error"):
            log.info("token refused by TokenReview: %s", status["error"])
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = (ok, now + (self.ttl_ok_s if ok else self.ttl_denied_s))
        return ok


AuthMode = Literal["none", "token", "tokenreview"]
