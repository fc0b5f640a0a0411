"""Who may read the agent: nobody checked, a shared bearer token, or Kubernetes TokenReview."""

from __future__ import annotations

import enum
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


class Decision(enum.Enum):
    ALLOW = "allow"
    UNAUTHENTICATED = "unauthenticated"  # 401: no valid token
    FORBIDDEN = "forbidden"  # 403: a valid token of an identity that may not read the agent


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one token check: the decision, who the token belongs to where known, why."""

    decision: Decision
    username: str = ""
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.decision is Decision.ALLOW


class Authenticator(Protocol):
    async def check(self, token: str) -> Verdict:
        """Who `token` is and whether it may read the agent; raise AuthUnavailable when it
        cannot tell."""
        ...


def parse_bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None.

    A token is visible ASCII without spaces (RFC 6750's b64token is narrower still; JWTs and
    generated secrets fit). Anything else, such as bytes that are not UTF-8 (the server hands
    them over as surrogates) or control characters, is no token: the caller answers 401.
    """
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip(" \t")
    if scheme.lower() != "bearer" or not token or not _is_visible_ascii(token):
        return None
    return token


def _is_visible_ascii(text: str) -> bool:
    return text.isascii() and all("!" <= ch <= "~" for ch in text)


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

    async def check(self, token: str) -> Verdict:
        try:
            self._reload()
        except OSError as exc:
            log.warning("token file unreadable, keeping the previous token: %s", exc)
        # Constant time, so the comparison leaks nothing about the token's content.
        if self._token and hmac.compare_digest(token.encode(), self._token):
            return Verdict(Decision.ALLOW)
        return Verdict(Decision.UNAUTHENTICATED, reason="invalid bearer token")


@dataclass(frozen=True, slots=True)
class _Review:
    username: str  # empty: not authenticated
    reason: str
    expires: float


@dataclass
class TokenReviewAuth:
    """Asks the API server (TokenReview) who a token belongs to; caches answers briefly.

    `allowed_subjects` (usernames) may read the agent; empty: any authenticated identity. With
    `audiences`, the token must be meant for one of them, and the API server must say so.
    """

    client: KubeClient
    audiences: tuple[str, ...] = ()
    allowed_subjects: frozenset[str] = frozenset()
    ttl_ok_s: float = 30.0
    ttl_denied_s: float = 5.0
    max_entries: int = 1024
    _cache: dict[str, _Review] = field(default_factory=dict)

    async def check(self, token: str) -> Verdict:
        # Keys are digests: the cache never holds a usable token.
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached.expires > now:
            return self.decide(cached.username, cached.reason)
        review = await self._review(token, now)
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = review
        verdict = self.decide(review.username, review.reason)
        if verdict.decision is Decision.FORBIDDEN:
            # Once per review (the cache holds it ttl_ok_s), not once per request.
            log.warning("refused %s: not one of the allowed subjects", verdict.username)
        return verdict

    def decide(self, username: str, reason: str = "") -> Verdict:
        """Allowed, forbidden (authenticated, not allowed) or unauthenticated (no username)."""
        if not username:
            return Verdict(Decision.UNAUTHENTICATED, reason=reason or "invalid bearer token")
        if self.allowed_subjects and username not in self.allowed_subjects:
            return Verdict(
                Decision.FORBIDDEN,
                username=username,
                reason=(
                    f"{username} may not read this agent: it is not one of the allowed "
                    "subjects (MODELFLEET_AGENT_ALLOWED_SUBJECTS)"
                ),
            )
        return Verdict(Decision.ALLOW, username=username)

    async def _review(self, token: str, now: float) -> _Review:
        spec: dict[str, object] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            reply = await self.client.create(TOKENREVIEW_PATH, body)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise AuthUnavailable(f"TokenReview failed: {exc}") from exc
        status = reply.get("status") or {}
        username = ""
        reason = "invalid bearer token"
        if status.get("authenticated"):
            username = str((status.get("user") or {}).get("username") or "")
            if not username:
                reason = "the token's identity has no username"
            elif self.audiences and not set(status.get("audiences") or ()) & set(self.audiences):
                # An authenticator that ignores audiences answers none: the token may be meant
                # for someone else, so it is not good here.
                log.info(
                    "token of %s refused: not meant for the audiences %s",
                    username,
                    ",".join(self.audiences),
                )
                username = ""
                reason = "the bearer token is not meant for this agent's audiences"
        elif status.get("error"):
            log.info("token refused by TokenReview: %s", status["error"])
        ttl = self.ttl_ok_s if username else self.ttl_denied_s
        return _Review(username=username, reason=reason, expires=now + ttl)


AuthMode = Literal["none", "token", "tokenreview"]
