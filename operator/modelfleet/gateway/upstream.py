"""A lean HTTP/1.1 client for the gateway's upstream requests, on raw asyncio protocols.

aiohttp's client spent about a third of the gateway's CPU per request building request objects,
header multidicts and stream readers (benchmarks/RESULTS.md, Gateway). This client does only what
the proxy needs: POST pre-built header bytes and a body over kept-alive connections pooled per
replica, parse the status line and the few response headers the proxy reads, and hand the body
over whole (Content-Length) or piece by piece as it arrives (chunked, or until the replica closes).

Failures before the response head raise `UpstreamError` with the reason the proxy counts
(`connect`, `timeout`). A pooled connection that the replica closed while it sat idle (its
keep-alive timeout) is detected when the request gets no answer at all, and the request is sent
once more on a fresh connection: the replica cannot have started on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Final, cast

_IDLE_LIMIT: Final = 1024  # idle connections kept per replica; more are closed when released
_PAUSE_BYTES: Final = 1 << 20  # stop reading a replica while this much waits for a slow client
_RESUME_BYTES: Final = 1 << 18
_MAX_HEAD: Final = 65536  # a longer response head is a protocol error
_SWEEP_S: Final = 5.0

_HEAD, _BODY_LENGTH, _BODY_CHUNKED, _BODY_EOF, _DONE = range(5)
_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _CHUNK_TRAILER = range(4)


class UpstreamError(Exception):
    """No response head came back; `reason` is `connect` or `timeout`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UpstreamBodyError(Exception):
    """The replica broke off (or broke the protocol) after its response head."""


class _Stale(Exception):
    """A pooled connection closed before any byte of the answer: safe to send again."""


class _Conn(asyncio.Protocol):
    """One connection to a replica: one request at a time, the response parsed as it arrives."""

    __slots__ = (
        "_chunk_left",
        "_chunk_state",
        "_left",
        "_loop",
        "_read_timeout",
        "_timer",
        "body_bytes",
        "buf",
        "chunked",
        "closed",
        "collect",
        "content_length",
        "error",
        "headers",
        "idle_since",
        "keep_alive",
        "last_read",
        "parts",
        "paused",
        "pool",
        "received",
        "state",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self._loop = pool.loop
        self._read_timeout = pool.read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = _DONE
        self.closed = False
        self.received = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.parts: collections.deque[bytes] = collections.deque()
        self.body_bytes = 0
        self.paused = False
        self.collect = False  # read() wants the whole body: never pause for it
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self._left = 0
        self._chunk_state = _CHUNK_SIZE
        self._chunk_left = 0
        self._timer: asyncio.TimerHandle | None = None
        self.last_read = 0.0
        self.idle_since = 0.0

    # ---- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.state == _BODY_EOF:
            self.state = _DONE  # the body ran until the replica closed: that is its end
            self.keep_alive = False
        elif self.state != _DONE:
            if not self.received:
                self._fail(_Stale())
            elif not self.status:
                self._fail(UpstreamError("connect", f"{self.pool.address} closed mid-head"))
            else:
                self._fail(UpstreamBodyError(f"{self.pool.address} closed mid-answer"))
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.last_read = self._loop.time()
        state = self.state
        if state == _BODY_LENGTH and not self.buf:
            # The common case after the head: body bytes, used as they are (no copy).
            n = len(data)
            if n <= self._left:
                self._left -= n
                self._push(data)
                if self._left == 0:
                    self._finish()
                return
        if state == _DONE:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()
            return
        self.buf += data
        self._parse()

    # ---- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self.buf
        while buf:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        self._protocol_error("response head too long")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                if not self._parse_head(head):
                    return
            elif state == _BODY_LENGTH:
                take = min(self._left, len(buf))
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._left -= take
                if self._left == 0:
                    self._finish()
            elif state == _BODY_CHUNKED:
                if not self._parse_chunked():
                    return
            elif state == _BODY_EOF:
                self._push(bytes(buf))
                buf.clear()
            else:
                self.keep_alive = False
                if self.transport is not None:
                    self.transport.close()
                buf.clear()
                return

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        line = lines[0]
        if not line.startswith(b"HTTP/1.") or len(line) < 12 or not line[9:12].isdigit():
            self._protocol_error("not an HTTP/1.x response")
            return False
        status = int(line[9:12])
        if 100 <= status < 200:
            return True  # an interim answer (100 Continue); the real one follows
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if not sep:
                self._protocol_error("malformed response header")
                return False
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self.status = status
        self.headers = headers
        connection = headers.get("connection", "").lower()
        self.keep_alive = line[7:8] == b"1" and "close" not in connection
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if status in (204, 304):
            self.content_length = 0
            self.state = _BODY_LENGTH
            self._left = 0
        elif encoding is not None and "chunked" in encoding.lower():
            self.chunked = True
            self.state = _BODY_CHUNKED
            self._chunk_state = _CHUNK_SIZE
        elif length is not None:
            if not length.isdigit():
                self._protocol_error("bad Content-Length")
                return False
            self.content_length = self._left = int(length)
            self.state = _BODY_LENGTH
        else:
            self.state = _BODY_EOF
            self.keep_alive = False
        self._wake()  # the head is here
        if self.state == _BODY_LENGTH and self._left == 0:
            self._finish()
        return True

    def _parse_chunked(self) -> bool:
        """Consume what the buffer holds of a chunked body; False when it needs more bytes."""
        buf = self.buf
        while buf:
            cs = self._chunk_state
            if cs == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        self._protocol_error("chunk size line too long")
                    return False
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    self._protocol_error("bad chunk size")
                    return False
                if size == 0:
                    self._chunk_state = _CHUNK_TRAILER
                else:
                    self._chunk_left = size
                    self._chunk_state = _CHUNK_DATA
            elif cs == _CHUNK_DATA:
                take = min(self._chunk_left, len(buf))
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._chunk_state = _CHUNK_CRLF
            elif cs == _CHUNK_CRLF:
                if len(buf) < 2:
                    return False
                if buf[:2] != b"\r\n":
                    self._protocol_error("chunk not followed by CRLF")
                    return False
                del buf[:2]
                self._chunk_state = _CHUNK_SIZE
            else:  # trailers: lines until an empty one
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                del buf[: end + 2]
                if end == 0:
                    self._finish()
                    return True
        return False

    # ---- state changes ------------------------------------------------------------------------

    def _push(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.body_bytes += len(data)
            if self.body_bytes > _PAUSE_BYTES and not self.paused and not self.collect:
                self.paused = True
                if self.transport is not None:
                    self.transport.pause_reading()
            self._wake()

    def _finish(self) -> None:
        self.state = _DONE
        self._cancel_timer()
        if self.buf:
            self.keep_alive = False  # more bytes than the answer: out of step
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self.state = _DONE
        self.keep_alive = False
        if self.error is None:
            self.error = exc
        self._cancel_timer()
        self._wake()

    def _protocol_error(self, what: str) -> None:
        self._fail(UpstreamBodyError(what) if self.status else UpstreamError("connect", what))
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self._loop.create_future()
        await self.waiter

    def _arm_timer(self) -> None:
        self.last_read = now = self._loop.time()
        self._timer = self._loop.call_at(now + self._read_timeout, self._check_timer)

    def _check_timer(self) -> None:
        self._timer = None
        if self.state == _DONE:
            return
        now = self._loop.time()
        deadline = self.last_read + self._read_timeout
        if self.paused:  # we stopped reading for a slow client: the replica is not silent
            deadline = now + self._read_timeout
        if deadline > now:  # data came meanwhile: check again later
            self._timer = self._loop.call_at(deadline, self._check_timer)
            return
        what = f"no data from {self.pool.address} for {self._read_timeout:g}s"
        self._fail(UpstreamError("timeout", what) if not self.status else UpstreamBodyError(what))
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- the request --------------------------------------------------------------------------

    def start(self, payload: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.state = _HEAD
        self.received = False
        self.error = None
        self.status = 0
        self.content_length = None
        self.chunked = False
        self.keep_alive = True
        self.body_bytes = 0
        self.collect = False
        self.parts.clear()
        self.buf.clear()
        if self.closed or self.transport.is_closing():
            self._fail(_Stale())
            return
        self._arm_timer()
        if len(body) < 65536:
            self.transport.write(payload + body)
        else:
            self.transport.writelines((payload, body))

    async def wait_head(self) -> None:
        while self.status == 0 and self.error is None:
            await self._wait()
        if self.status == 0 and self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.state = _DONE
        self.keep_alive = False
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """The replica's answer: status, lower-cased headers, and the body to read once."""

    __slots__ = ("_conn", "_released", "headers", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._released = False
        self.status = conn.status
        self.headers = conn.headers

    @property
    def content_length(self) -> int | None:
        return self._conn.content_length

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        conn.collect = True
        if conn.paused and conn.transport is not None:
            conn.paused = False
            conn.transport.resume_reading()
        while conn.state != _DONE:
            await conn._wait()
        if conn.error is not None:
            raise conn.error
        parts = conn.parts
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body pieces as they arrive (chunked framing removed)."""
        conn = self._conn
        parts = conn.parts
        while True:
            if parts:
                data = b"".join(parts) if len(parts) > 1 else parts[0]
                parts.clear()
                conn.body_bytes = 0
                self._resume()
                yield data
                continue
            if conn.error is not None:
                raise conn.error
            if conn.state == _DONE:
                return
            await conn._wait()

    def _resume(self) -> None:
        conn = self._conn
        if conn.paused and conn.body_bytes < _RESUME_BYTES and conn.transport is not None:
            conn.paused = False
            conn.last_read = conn._loop.time()
            conn.transport.resume_reading()

    def release(self) -> None:
        """Give the connection back when the answer was read to its end, else close it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn.state == _DONE and conn.keep_alive and conn.error is None and not conn.closed:
            conn.pool.put(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Drop the connection, so the replica sees the client leave and stops generating."""
        if not self._released:
            self._released = True
            self._conn.abort()


class _Pool:
    """Idle kept-alive connections to one replica, most recently used first."""

    __slots__ = ("address", "connect_timeout_s", "host", "idle", "loop", "port", "read_timeout_s")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, address: str, connect_s: float, read_s: float
    ) -> None:
        self.loop = loop
        self.address = address
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.connect_timeout_s = connect_s
        self.read_timeout_s = read_s
        self.idle: list[_Conn] = []

    def take(self) -> _Conn | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self), self.host, self.port
                )
        except TimeoutError:
            raise UpstreamError(
                "timeout", f"connect to {self.address}: no answer in {self.connect_timeout_s:g}s"
            ) from None
        except OSError as exc:
            raise UpstreamError("connect", f"connect to {self.address}: {exc}") from None
        return conn

    def put(self, conn: _Conn) -> None:
        if len(self.idle) >= _IDLE_LIMIT:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    def sweep(self, older_than: float) -> None:
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if conn.idle_since < older_than:
                conn.abort()
            else:
                keep.append(conn)
        self.idle = keep

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle = []


class UpstreamClient:
    """Keep-alive connection pools per replica address; one per gateway process."""

    def __init__(
        self, *, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float = 30.0
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._pools: dict[str, _Pool] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def _pool(self, address: str) -> _Pool:
        pool = self._pools.get(address)
        if pool is None:
            loop = asyncio.get_running_loop()
            pool = self._pools[address] = _Pool(
                loop, address, self.connect_timeout_s, self.read_timeout_s
            )
            if self._sweeper is None:
                self._sweeper = loop.call_later(_SWEEP_S, self._sweep)
        return pool

    def _sweep(self) -> None:
        """Close connections idle longer than the keep-alive time; forget empty pools."""
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.keepalive_s
        for address, pool in list(self._pools.items()):
            pool.sweep(cutoff)
            if not pool.idle:
                del self._pools[address]
        self._sweeper = loop.call_later(_SWEEP_S, self._sweep) if self._pools else None

    def idle_connections(self, address: str) -> int:
        pool = self._pools.get(address)
        return len(pool.idle) if pool else 0

    async def post(self, address: str, head: bytes, body: bytes) -> UpstreamResponse:
        """Send `head` (request line and headers, ending in a blank line) and `body`.

        Returns once the response head is in; raises UpstreamError when none came.
        """
        pool = self._pool(address)
        conn = pool.take()
        reused = conn is not None
        if conn is None:
            conn = await pool.connect()
        while True:
            conn.start(head, body)
            try:
                await conn.wait_head()
            except _Stale:
                if reused:
                    # The replica closed this idle connection before it saw the request.
                    reused = False
                    conn = await pool.connect()
                    continue
                raise UpstreamError(
                    "connect", f"{address} closed the connection without an answer"
                ) from None
            except BaseException:
                conn.abort()
                raise
            return UpstreamResponse(conn)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
