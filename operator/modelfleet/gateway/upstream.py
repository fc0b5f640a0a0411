"""A lean HTTP/1.1 client for the gateway's upstream requests, on raw asyncio protocols.

aiohttp's client spent about a third of the gateway's CPU per request building request objects,
header multidicts and stream readers (benchmarks/RESULTS.md, Gateway). This client does only what
the proxy needs: POST pre-built header bytes and a body over kept-alive connections pooled per
replica, and hand the answer's body over whole (Content-Length) or piece by piece as it arrives
(chunked, or until the replica closes).

Responses are parsed by llhttp (Node.js's HTTP parser, through httptools), which refuses
malformed status lines, headers, chunk sizes and conflicting lengths. On top of it this module
refuses what llhttp lets through: a status outside 100-599, a protocol other than HTTP/1.0 or
1.1, a Transfer-Encoding other than `chunked`, a 101 that nobody asked for, a Content-Type that
is not a media type, a head (interim answers included) over 64 KiB or not whole within the head
timeout of its first byte, and over 64 KiB of chunk framing or trailers without a byte of body.
Body bytes of a Content-Length answer after the segment that held its head go to the reader as
they came off the socket, without passing through the parser.

Failures before a usable response head raise `UpstreamError`: its `reason` is what the proxy
counts (`connect`, `timeout`, `closed`, `protocol`) and `sent` says whether any byte of the
request may have reached the replica. Failures after the head raise `UpstreamBodyError`.

The resend rule. A request is written at most once per call of `UpstreamClient.post`. A pooled
connection is checked before a byte is written to it: one the replica has closed (its
keep-alive timeout: vLLM closes idle connections after 5 s) or that received bytes while idle is
dropped and another one used, so the request still goes out exactly once. Once any byte is
written, a close, reset or silence is reported with `sent=True` and never sent again by this
client: the replica may have read the request and started on it (or crashed on it). To keep the
stale-connection race small, a connection idle for `keepalive_s` (4 s, under vLLM's 5 s) is not
reused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from typing import Final, cast

import httptools

_IDLE_LIMIT: Final = 1024  # idle connections kept per replica; more are closed when released
_PAUSE_BYTES: Final = 1 << 20  # stop reading a replica while this much waits for a slow client
_RESUME_BYTES: Final = 1 << 18
_MAX_HEAD: Final = 65536  # the response head, interim (1xx) heads included
_MAX_FRAMING: Final = 65536  # chunk size lines, extensions and trailers without body between
_MAX_CONTENT_TYPE: Final = 256
_SWEEP_S: Final = 5.0
# Under vLLM's (uvicorn's) 5 s keep-alive timeout, so a pooled connection is not reused as the
# replica closes it.
KEEPALIVE_S: Final = 4.0

_HEAD, _BODY_LENGTH, _BODY_CHUNKED, _BODY_EOF, _DONE = range(5)

# RFC 9110 media type: type "/" subtype *( OWS ";" OWS parameter ), parameters token=token or
# token=quoted-string.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\x09\x20-\x7e\x80-\xff])*"'
_MEDIA_TYPE: Final = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))*[ \t]*"
)
_MEDIA_TYPES_SEEN: set[str] = set()  # Content-Types that matched, so each is matched once


class UpstreamError(Exception):
    """No usable response head.

    `reason`: `connect` (no connection, or it broke before the request was written), `timeout`,
    `closed` (closed without a whole head), `protocol` (the head broke HTTP/1.1).
    `sent`: whether any byte of the request may have reached the replica; when False another
    replica may take the request, when True it may already be running there.
    """

    def __init__(self, reason: str, detail: str, *, sent: bool, problem: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.sent = sent
        self.problem = problem  # what was wrong with the answer, without the replica's address


class UpstreamBodyError(Exception):
    """The replica broke off (or broke the protocol) after its response head.

    `malformed` is True when the body's framing was invalid rather than cut.
    """

    def __init__(self, detail: str, *, malformed: bool = False, problem: str = "") -> None:
        super().__init__(detail)
        self.malformed = malformed
        self.problem = problem  # what was wrong with the answer, without the replica's address


class _Framing(Exception):
    """Raised inside a parser callback: the answer breaks a rule llhttp does not check."""


class _Extra(Exception):
    """Raised inside a parser callback: bytes after the end of the answer."""


def _parser_problem(exc: Exception) -> str:
    """What was wrong, from an httptools exception (ours when a callback refused)."""
    cause = exc.__context__
    if isinstance(cause, _Framing):
        return str(cause)
    if isinstance(exc, httptools.HttpParserUpgrade):
        return "the replica switched protocols"
    if cause is not None:  # a bug of ours in a callback: say so rather than hide it
        return f"{type(cause).__name__} while parsing"
    return str(exc) or type(exc).__name__


class _Conn(asyncio.Protocol):
    """One connection to a replica: one request at a time, the response parsed as it arrives."""

    __slots__ = (
        "_direct",
        "_fields",
        "_framing",
        "_got_body",
        "_head_timeout",
        "_header_bytes",
        "_in_head",
        "_interim",
        "_left",
        "_loop",
        "_read_timeout",
        "_timer",
        "_trailer_bytes",
        "body_bytes",
        "chunked",
        "closed",
        "collect",
        "content_length",
        "error",
        "head_bytes",
        "head_deadline",
        "head_parts",
        "headers",
        "idle_since",
        "keep_alive",
        "last_read",
        "messages",
        "parser",
        "parts",
        "paused",
        "pool",
        "state",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self._loop = pool.loop
        self._read_timeout = pool.read_timeout_s
        self._head_timeout = pool.head_timeout_s
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.state = _DONE
        self.closed = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.parts: collections.deque[bytes] = collections.deque()
        self.body_bytes = 0
        self.paused = False
        self.collect = False  # read() wants the whole body: never pause for it
        self.status = 0
        self.headers: dict[str, str] = {}
        self._fields: dict[str, str] = {}  # the head being parsed
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.head_bytes = 0
        self.head_deadline = 0.0
        self.head_parts: list[bytes] = []
        self.messages = 0
        self._interim = False
        self._in_head = False  # a head has begun and is not whole yet
        self._direct = False  # body bytes bypass the parser (Content-Length or until close)
        self._framing = 0
        self._trailer_bytes = 0
        self._header_bytes = 0
        self._got_body = False
        self._left = 0
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
        state = self.state
        if state == _BODY_EOF:
            self.state = _DONE  # the body ran until the replica closed: that is its end
            self.keep_alive = False
        elif state != _DONE:
            address = self.pool.address
            if not self.status:
                what = "without an answer" if not self.head_bytes else "in the middle of its head"
                self._fail(UpstreamError("closed", f"{address} closed {what}", sent=True))
            else:
                self._fail(UpstreamBodyError(f"{address} closed mid-answer"))
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True  # seen before connection_lost on asyncio's loop
        return False  # close our side too

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        state = self.state
        if self._direct and state != _DONE:
            self._take_direct(data)
            return
        if state == _DONE:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()
            return
        if state == _HEAD:
            self.head_bytes += len(data)
            self.head_parts.append(data)
        self._got_body = False
        parser = self.parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except Exception as exc:
            self.parser = None  # llhttp stays in its error state
            if self.state == _DONE:
                self.keep_alive = False  # the answer was whole; what followed was not
            else:
                self._protocol_error(_parser_problem(exc))
            return
        self._check_limits(len(data))

    def _take_direct(self, data: bytes) -> None:
        """Body bytes after the read that held the head, used as they are (no copy)."""
        if self.state == _BODY_EOF:
            self._push(data)
            return
        n = len(data)
        if n < self._left:
            self._left -= n
            self._push(data)
            return
        if n > self._left:
            self.keep_alive = False  # more bytes than the answer: out of step
            data = data[: self._left]
        self._left = 0
        self._push(data)
        self._finish()

    def _check_limits(self, n: int) -> None:
        """After llhttp took a read of n bytes: the limits it does not know."""
        state = self.state
        if state == _HEAD:
            if self.head_bytes > _MAX_HEAD:
                self._protocol_error(f"response head over {_MAX_HEAD} bytes")
            elif self._in_head and not self.head_deadline:  # a head began and is not whole
                self._arm_head_deadline()
        elif state == _BODY_CHUNKED:
            if self._got_body:
                self._framing = 0
            else:
                self._framing += n
                if self._framing > _MAX_FRAMING:
                    self._protocol_error(
                        f"over {_MAX_FRAMING} bytes of chunk framing or trailers without data"
                    )
        elif state in (_BODY_LENGTH, _BODY_EOF):
            self._direct = True
            self.parser = None  # left mid-answer: the next request gets a fresh one

    # ---- parser callbacks (llhttp through httptools) -------------------------------------------

    def on_message_begin(self) -> None:
        if self.state == _DONE:
            raise _Extra
        self.messages += 1
        self._fields = {}
        self._in_head = True
        self.head_deadline = 0.0  # each head has the head timeout from its own first byte

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state == _HEAD:
            # Counted here too: a head that came whole in one read is not counted by pieces.
            self._header_bytes += len(name) + len(value) + 4
            if self._header_bytes > _MAX_HEAD:
                raise _Framing(f"response head over {_MAX_HEAD} bytes")
            key = name.lower().decode("latin-1")
            fields = self._fields
            seen = fields.get(key)
            text = value.decode("latin-1")
            fields[key] = text if seen is None else f"{seen}, {text}"
            return
        # A trailer: dropped, but counted (data_received counts the lines that span reads).
        self._trailer_bytes += len(name) + len(value) + 4
        if self._trailer_bytes > _MAX_FRAMING:
            raise _Framing(f"trailers over {_MAX_FRAMING} bytes")

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        self._in_head = False
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            raise _Framing(f"status {status:03d} is outside 100-599")
        if status < 200:
            if status == 101:
                raise _Framing("101 Switching Protocols, which this request did not ask for")
            self._interim = True  # 100 Continue and the like: the answer follows
            return
        self._check_protocol()
        headers = self._fields
        content_type = headers.get("content-type")
        if content_type is not None and content_type not in _MEDIA_TYPES_SEEN:
            if len(content_type) > _MAX_CONTENT_TYPE or not _MEDIA_TYPE.fullmatch(content_type):
                raise _Framing("Content-Type is not a media type")
            if len(_MEDIA_TYPES_SEEN) < 64:  # replicas send a handful; no more is kept
                _MEDIA_TYPES_SEEN.add(content_type)
        encoding = headers.get("transfer-encoding")
        if status == 204 or status == 304:
            self.content_length = self._left = 0
            self.state = _BODY_LENGTH  # no body, whatever the headers say (llhttp agrees)
        elif encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise _Framing("Transfer-Encoding other than chunked")
            self.chunked = True
            self.state = _BODY_CHUNKED
            self._framing = self._trailer_bytes = 0
        elif (length := headers.get("content-length")) is not None:
            self.content_length = self._left = int(length)  # llhttp checked it: one, digits
            self.state = _BODY_LENGTH
        else:
            self.state = _BODY_EOF
        self.keep_alive = self.state != _BODY_EOF and parser.should_keep_alive()
        self.status = status
        self.headers = headers
        self._wake()  # the head is here

    def _check_protocol(self) -> None:
        """Every head (interim ones included) starts with HTTP/1.

        llhttp also takes RTSP/1.0, ICE/1.0, HTTP/0.9 and HTTP/2.0 status lines (and no other
        versions). It refuses CR and LF inside a head, so CRLF CRLF ends each of them.
        """
        parts = self.head_parts
        if self.messages == 1 and len(parts[0]) >= 7:
            if not parts[0].startswith(b"HTTP/1."):
                raise _Framing("not an HTTP/1.x answer")
            return
        heads = b"".join(parts).split(b"\r\n\r\n", self.messages - 1)
        if not all(head.startswith(b"HTTP/1.") for head in heads):
            raise _Framing("not an HTTP/1.x answer")

    def on_body(self, body: bytes) -> None:
        self._got_body = True
        if self.state == _BODY_LENGTH:
            self._left -= len(body)
        self._push(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.state != _DONE:
            self._finish()

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
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self.state = _DONE
        self.keep_alive = False
        if self.error is None:
            self.error = exc
        self._cancel_timer()
        self._wake()

    def _protocol_error(self, what: str) -> None:
        where = f"{self.pool.address}: {what}"
        if self.status:
            self._fail(UpstreamBodyError(where, malformed=True, problem=what))
        else:
            self._fail(UpstreamError("protocol", where, sent=True, problem=what))
        self.parser = None
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

    def _arm_head_deadline(self) -> None:
        """A head began and is not whole: it has head_timeout_s from its first read to be."""
        self.head_deadline = self.last_read + self._head_timeout
        if self.head_deadline < self.last_read + self._read_timeout:
            self._cancel_timer()
            self._timer = self._loop.call_at(self.head_deadline, self._check_timer)

    def _check_timer(self) -> None:
        self._timer = None
        if self.state == _DONE:
            return
        now = self._loop.time()
        deadline = self.last_read + self._read_timeout
        if self.paused:  # we stopped reading for a slow client: the replica is not silent
            deadline = now + self._read_timeout
        in_head = self.state == _HEAD and self._in_head and self.head_deadline > 0
        head_late = in_head and self.head_deadline <= now
        if deadline > now and not head_late:  # data came meanwhile: check again later
            if in_head:
                deadline = min(deadline, self.head_deadline)
            self._timer = self._loop.call_at(deadline, self._check_timer)
            return
        address = self.pool.address
        if head_late:
            what = f"{address} did not finish its response head within {self._head_timeout:g}s"
        else:
            what = f"no data from {address} for {self._read_timeout:g}s"
        self._fail(
            UpstreamError("timeout", what, sent=True)
            if not self.status
            else UpstreamBodyError(what)
        )
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- the request --------------------------------------------------------------------------

    def start(self, payload: bytes, body: bytes) -> bool:
        """Write the request; False, with nothing written, when the replica closed it already."""
        transport = self.transport
        assert transport is not None
        if self.closed or transport.is_closing():
            return False
        self.state = _HEAD
        self.error = None
        self.status = 0
        self.content_length = None
        self.chunked = False
        self.keep_alive = True
        self.body_bytes = 0
        self.collect = False
        self.head_bytes = self._header_bytes = 0
        self.head_parts.clear()
        self.messages = 0
        self._interim = self._in_head = False
        self.head_deadline = 0.0
        self._direct = False
        self.parts.clear()
        if self.parser is None:
            self.parser = httptools.HttpResponseParser(self)
        self._arm_timer()
        if len(body) < 65536:
            transport.write(payload + body)
        else:
            transport.writelines((payload, body))
        return True

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

    def check(self) -> None:
        """Raise UpstreamBodyError if the answer already failed (its framing or its connection).

        The proxy calls it before it sends a streamed answer's head on, so that an error in the
        bytes that came with the head is a 502 rather than a 200 cut short.
        """
        error = self._conn.error
        if error is not None:
            raise error

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

    __slots__ = (
        "address",
        "connect_timeout_s",
        "head_timeout_s",
        "host",
        "idle",
        "keepalive_s",
        "loop",
        "port",
        "read_timeout_s",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: str,
        connect_s: float,
        read_s: float,
        head_s: float,
        keepalive_s: float,
    ) -> None:
        self.loop = loop
        self.address = address
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.connect_timeout_s = connect_s
        self.read_timeout_s = read_s
        self.head_timeout_s = head_s
        self.keepalive_s = keepalive_s
        self.idle: list[_Conn] = []

    def take(self) -> _Conn | None:
        """The most recently used idle connection still inside the keep-alive time."""
        idle = self.idle
        if not idle:
            return None
        cutoff = self.loop.time() - self.keepalive_s
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < cutoff:
                conn.abort()  # the rest are older still
                for old in idle:
                    old.abort()
                idle.clear()
                return None
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
                "timeout",
                f"connect to {self.address}: no answer in {self.connect_timeout_s:g}s",
                sent=False,
            ) from None
        except OSError as exc:
            raise UpstreamError(
                "connect", f"connect to {self.address}: {exc}", sent=False
            ) from None
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
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        head_timeout_s: float = 10.0,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.head_timeout_s = head_timeout_s
        self.keepalive_s = keepalive_s
        self._pools: dict[str, _Pool] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def _pool(self, address: str) -> _Pool:
        pool = self._pools.get(address)
        if pool is None:
            loop = asyncio.get_running_loop()
            pool = self._pools[address] = _Pool(
                loop,
                address,
                self.connect_timeout_s,
                self.read_timeout_s,
                self.head_timeout_s,
                self.keepalive_s,
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
        """Pooled connections to `address` that the replica has not closed."""
        pool = self._pools.get(address)
        return sum(not conn.closed for conn in pool.idle) if pool else 0

    async def post(self, address: str, head: bytes, body: bytes) -> UpstreamResponse:
        """Send `head` (request line and headers, ending in a blank line) and `body`, once.

        Returns once the response head is in; raises UpstreamError when none came.
        """
        pool = self._pool(address)
        while True:
            conn = pool.take()
            fresh = conn is None
            if conn is None:
                conn = await pool.connect()
            if conn.start(head, body):
                break
            # The replica closed this connection before a byte of the request was written.
            conn.abort()
            if fresh:
                raise UpstreamError(
                    "connect", f"{address} closed the connection as it opened", sent=False
                )
        try:
            await conn.wait_head()
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
