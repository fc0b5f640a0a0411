"""A compact closed-loop HTTP/1.1 load generator on raw asyncio protocols.

Each of `concurrency` keep-alive connections sends one request, waits for the whole answer, and
sends the next, for a fixed time. A full HTTP client (aiohttp) costs more CPU per request than
the proxies measured here, and on a 2-core machine every microsecond the generator burns is taken
from the servers under test; this one pre-builds the request bytes and parses only the status line,
Content-Length and chunked framing.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    requests: int
    errors: int
    duration_s: float
    latencies_s: list[float] = field(repr=False)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index] * 1000

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000 if self.latencies_s else float("nan")


class _Conn(asyncio.Protocol):
    """One keep-alive connection: `request()` resolves with the status of a complete answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def request(self, payload: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.buffer.clear()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        start = head.find(b"content-length:")
        if start >= 0:
            stop = head.find(b"\r\n", start)
            length = int(head[start + 15 : stop if stop >= 0 else None])
            if len(buf) - end - 4 < length:
                return
        elif b"transfer-encoding: chunked" in head and not buf.endswith(b"0\r\n\r\n"):
            return
        if self.waiter and not self.waiter.done():
            self.waiter.set_result(status)


def build_request(url: str, body: bytes, extra_headers: dict[str, str] | None = None) -> bytes:
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (extra_headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run_load(
    urls: str | list[str],
    body: bytes,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.5,
    headers: dict[str, str] | None = None,
    on_window: Callable[[str], None] | None = None,
) -> LoadResult:
    """Closed loop for `duration_s` after `warmup_s`; latencies of 2xx answers only.

    With several URLs, connection i goes to URL i mod n. `on_window("start")` and
    `on_window("stop")` are called when the measured window opens and closes (CPU sampling).
    """
    targets = [urls] if isinstance(urls, str) else list(urls)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    if on_window is not None:
        loop.call_later(warmup_s, on_window, "start")
        loop.call_later(warmup_s + duration_s, on_window, "stop")

    async def worker(index: int) -> None:
        nonlocal errors
        url = targets[index % len(targets)]
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        payload = build_request(url, body, headers)
        conn: _Conn | None = None
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            t0 = now
            try:
                if conn is None or conn.transport is None or conn.transport.is_closing():
                    _, conn = await loop.create_connection(_Conn, host, port)
                    t0 = time.perf_counter()
                status = await conn.request(payload)
                t1 = time.perf_counter()
            except (ConnectionError, OSError):
                conn = None
                if t0 >= measure_from:
                    errors += 1
                await asyncio.sleep(0.01)
                continue
            if t0 >= measure_from and t1 <= stop_at:
                statuses[status] = statuses.get(status, 0) + 1
                if 200 <= status < 300:
                    latencies.append(t1 - t0)
                else:
                    errors += 1
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return LoadResult(len(latencies), errors, duration_s, latencies, statuses)
