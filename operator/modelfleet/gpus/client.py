"""HTTP client side of the pool: fetch one agent's `GET /v1/gpus` and say precisely what failed.

Everything goes through one aiohttp session that the caller creates (`create_session`) and
closes; each request carries its own timeout. A pool polls the same URLs every few seconds, so
the per-request objects (the parsed URL, the timeout) can be built once by the caller and passed
in, and a body identical to the endpoint's previous one is not parsed again (`LastReply`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import aiohttp
from pydantic import ValidationError
from yarl import URL

from modelfleet.api.gpustats import GpuReport

GPUS_PATH = "/v1/gpus"
_TOKEN_REREAD_S = 60.0  # projected service-account tokens rotate; re-read the file now and then
_MAX_BODY = 4 * 1024 * 1024  # a 64-GPU report with pods is a few tens of KiB


class FailureKind(StrEnum):
    """Bounded failure classes (a metric label); the reason string carries the details."""

    TIMEOUT = "timeout"
    CONNECT = "connect"
    HTTP_STATUS = "http_status"
    AUTH = "auth"
    BAD_JSON = "bad_json"
    BAD_SCHEMA = "bad_schema"
    NODE_MISMATCH = "node_mismatch"
    DUPLICATE = "duplicate"
    #: Anything the client did not foresee; logged with its traceback, the round goes on.
    UNEXPECTED = "unexpected"


class FetchError(Exception):
    """One failed request; `retryable` is false when sending it again cannot help."""

    def __init__(self, kind: FailureKind, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Fetched:
    report: GpuReport
    latency_s: float
    attempts: int


@dataclass(slots=True)
class LastReply:
    """One endpoint's last accepted body and its report: the same bytes give the same report."""

    body: bytes = b""
    report: GpuReport | None = None


def build_target(url: str) -> URL:
    """The parsed `<url>/v1/gpus`, built once per endpoint instead of once per request."""
    return URL(url + GPUS_PATH)


def create_session(concurrency: int, user_agent: str = "modelfleet-pool") -> aiohttp.ClientSession:
    """The one session for polling: enough pooled connections for `concurrency` requests."""
    connector = aiohttp.TCPConnector(limit=max(concurrency, 1), keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": user_agent})


class TokenSource:
    """The bearer token from a file, re-read every minute off the event loop."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._token: str | None = None
        self._read_at: float | None = None

    async def header(self) -> dict[str, str]:
        if not self.path:
            return {}
        now = self._clock()
        if self._read_at is None or now - self._read_at >= _TOKEN_REREAD_S:
            try:
                text = await asyncio.to_thread(Path(self.path).read_text, encoding="utf-8")
            except OSError as exc:
                raise FetchError(
                    FailureKind.AUTH,
                    f"cannot read the agent token file {self.path} "
                    f"(MODELFLEET_AGENT_TOKEN_FILE): {exc.strerror or exc}",
                    retryable=False,
                ) from None
            self._token = text.strip()
            self._read_at = now
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}


def _describe_validation(exc: ValidationError) -> tuple[FailureKind, str]:
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return FailureKind.BAD_JSON, f"reply is not JSON: {errors[0]['msg']}"
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    where = ".".join(str(p) for p in first["loc"])
    # Our own checks (node name, GPU IDs, memory) say what they found in their message.
    msg = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    detail = f"{where}: {msg}" if where else msg
    return FailureKind.BAD_SCHEMA, f"reply does not match GpuReport: {detail}{more}"


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body, or its first `cap + 1` bytes when it is longer (so the caller can tell).

    `StreamReader.read(n)` returns what has arrived so far, not n bytes: a reply that comes in
    several TCP segments must be read until EOF. A declared Content-Length above the cap is
    refused before anything is read.
    """
    if resp.content_length is not None and resp.content_length > cap:
        return b"\0" * (cap + 1)
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await resp.content.read(cap + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def fetch_report(
    session: aiohttp.ClientSession,
    url: str,
    *,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    expected_node: str | None = None,
    target: URL | None = None,
    client_timeout: aiohttp.ClientTimeout | None = None,
    last: LastReply | None = None,
) -> GpuReport:
    """One `GET <url>/v1/gpus`, parsed and checked; raises FetchError with a readable reason.

    `target` and `client_timeout` default to ones built from `url` and `timeout_s`; with `last`,
    a body equal to the last accepted one reuses its report, and an accepted body is kept there.
    """
    try:
        async with session.get(
            target if target is not None else build_target(url),
            headers=headers,
            timeout=(
                client_timeout
                if client_timeout is not None
                else aiohttp.ClientTimeout(total=timeout_s)
            ),
            allow_redirects=False,
        ) as resp:
            status = resp.status
            body = await read_capped(resp, _MAX_BODY)
    except TimeoutError:
        raise FetchError(
            FailureKind.TIMEOUT, f"no reply within {timeout_s:g} s", retryable=True
        ) from None
    except aiohttp.ClientConnectorError as exc:
        cause = exc.os_error.strerror or str(exc.os_error)
        raise FetchError(
            FailureKind.CONNECT, f"cannot connect to {url}: {cause}", retryable=True
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise FetchError(
            FailureKind.CONNECT, f"connection failed: {type(exc).__name__}: {exc}", retryable=True
        ) from None
    if status in (401, 403):
        raise FetchError(
            FailureKind.AUTH,
            f"HTTP {status}: the agent refused the request; check the token "
            "(MODELFLEET_AGENT_TOKEN_FILE) and the agent's auth setting",
            retryable=False,
        )
    if status != 200:
        snippet = body[:200].decode("utf-8", errors="replace").strip()
        raise FetchError(
            FailureKind.HTTP_STATUS,
            f"HTTP {status} from {GPUS_PATH}" + (f": {snippet}" if snippet else ""),
            retryable=status >= 500 or status == 429,
        )
    if len(body) > _MAX_BODY:
        raise FetchError(
            FailureKind.BAD_SCHEMA, f"reply larger than {_MAX_BODY} bytes", retryable=False
        )
    if last is not None and last.report is not None and body == last.body:
        report = last.report  # the agent has not sampled since: same bytes, same report
    else:
        try:
            # Straight from bytes: pydantic-core's JSON parser, no intermediate dict.
            report = GpuReport.model_validate_json(body)
        except ValidationError as exc:
            kind, reason = _describe_validation(exc)
            raise FetchError(kind, reason, retryable=False) from None
    if expected_node is not None and report.node != expected_node:
        raise FetchError(
            FailureKind.NODE_MISMATCH,
            f"agent reports node {report.node!r} but its pod runs on node {expected_node!r}; "
            "check the agent's MODELFLEET_AGENT_NODE / NODE_NAME",
            retryable=False,
        )
    if last is not None:
        last.body, last.report = body, report
    return report


async def fetch_with_retries(
    session: aiohttp.ClientSession,
    url: str,
    *,
    timeout_s: float,
    retries: int,
    headers: dict[str, str] | None = None,
    expected_node: str | None = None,
    target: URL | None = None,
    client_timeout: aiohttp.ClientTimeout | None = None,
    last: LastReply | None = None,
    timer: Callable[[], float] = time.perf_counter,
    on_attempt: Callable[[float, FailureKind | None], None] | None = None,
) -> Fetched:
    """`fetch_report` with up to `retries` immediate retries of retryable failures."""
    attempt = 0
    while True:
        attempt += 1
        started = timer()
        try:
            report = await fetch_report(
                session,
                url,
                timeout_s=timeout_s,
                headers=headers,
                expected_node=expected_node,
                target=target,
                client_timeout=client_timeout,
                last=last,
            )
        except FetchError as exc:
            if on_attempt is not None:
                on_attempt(timer() - started, exc.kind)
            if not exc.retryable or attempt > retries:
                raise
            continue
        latency = timer() - started
        if on_attempt is not None:
            on_attempt(latency, None)
        return Fetched(report, latency, attempt)
