"""The upstream client's framing decisions against h11's, on generated answers (valid, then
mutated by a hostile hand) served byte for byte from 127.0.0.1 in random pieces.

Two properties:
- never more lenient than h11: whatever the client accepts, h11 accepts with the same status
  and body (the client refuses more: Content-Length values that agree but repeat, statuses
  600-999, a Content-Type that is no media type or is repeated, Content-Length beside chunked,
  bare LF, obs-fold, HTTP versions other than 1.0 and 1.1);
- the same decision as h11 on valid answers, however they are cut into reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from dataclasses import dataclass

import h11
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfleet.gateway.upstream import UpstreamBodyError, UpstreamClient, UpstreamError

REQUEST_BODY = b"{}"
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: replica\r\nContent-Length: 2\r\n\r\n"
REFUSED = ("refused",)
Decision = tuple[object, ...]


@dataclass(frozen=True)
class Answer:
    pieces: tuple[bytes, ...]  # what the replica writes, one write (and a short pause) each
    loop: str

    @property
    def raw(self) -> bytes:
        return b"".join(self.pieces)


def h11_decision(raw: bytes) -> Decision:
    """What h11 makes of `raw` as the answer to one POST, the connection closed after it."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method="POST", target="/", headers=[("Host", "r"), ("Content-Length", "2")])
    )
    conn.send(h11.Data(data=REQUEST_BODY))
    conn.send(h11.EndOfMessage())
    status = 0
    body = bytearray()
    try:
        conn.receive_data(raw)
        conn.receive_data(b"")
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return ("ok", status, bytes(body))
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return REFUSED
            elif not isinstance(event, h11.InformationalResponse):
                return REFUSED  # PAUSED: h11 saw a protocol switch
    except h11.RemoteProtocolError:
        return REFUSED


async def _client_decision(answer: Answer) -> Decision:
    handlers: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(len(REQUEST_BODY))
            for piece in answer.pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = UpstreamClient(connect_timeout_s=2, read_timeout_s=2, head_timeout_s=2)
    try:
        async with asyncio.timeout(5):  # a hang fails the test: every answer gets a decision
            resp = await client.post(address, HEAD, REQUEST_BODY)
            try:
                return ("ok", resp.status, await resp.read())
            finally:
                resp.release()
    except (UpstreamError, UpstreamBodyError):
        return REFUSED
    finally:
        await client.close()
        server.close()
        await asyncio.wait_for(asyncio.gather(*handlers), 5)
        await server.wait_closed()


def client_decision(answer: Answer) -> Decision:
    factory = uvloop.new_event_loop if answer.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_client_decision(answer))


# ---- generated answers --------------------------------------------------------------------------

TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text(" !#$%&'()*+,-./0123456789:;<=>?@ABCXYZabcxyz[]^_`{|}~", max_size=30).map(str.strip)


@st.composite
def valid_answers(draw: st.DrawFn) -> bytes:
    interim = draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    status = draw(st.integers(200, 599))
    reason = draw(st.sampled_from(["OK", "", "Whatever It Is"]))
    minor = draw(st.sampled_from(["1", "0"]))
    body = draw(st.binary(max_size=300))
    headers = [(f"x-{name}", value) for name, value in draw(st.lists(st.tuples(TOKEN, VALUE)))]
    headers.append(
        ("Content-Type", draw(st.sampled_from(["application/json", 'text/event-stream; a="b c"'])))
    )
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if status in (204, 304):
        framing, body = "length", b""
    if minor == "0" and framing == "chunked":
        framing = "length"  # HTTP/1.0 has no chunked framing
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "Chunked"]))))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n"
        if draw(st.booleans()):
            payload += b"x-trailer: 1\r\n"
        payload += b"\r\n"
    else:
        headers.append(("Connection", "close"))
        payload = body
    draw(st.randoms()).shuffle(headers)
    head = b"".join(b"HTTP/1.1 %d Continue\r\n\r\n" % code for code in interim)
    head += f"HTTP/1.{minor} {status} {reason}\r\n".encode()
    head += b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    return head + b"\r\n" + payload


HOSTILE_BYTES = list(b'\r\n :;,-+_0x9aF\t\x00\x7f\xff"')


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        if kind == "insert":
            data[where:where] = bytes([draw(st.sampled_from(HOSTILE_BYTES))])
        elif kind == "delete" and where < len(data):
            del data[where]
        elif kind == "replace" and where < len(data):
            data[where] = draw(st.sampled_from(HOSTILE_BYTES))
        elif kind == "repeat":
            start = data.rfind(b"\r\n", 0, where)
            end = data.find(b"\r\n", where)
            if 0 <= start < end:  # one line twice: a duplicated header, size line or status
                data[end:end] = data[start:end]
    return bytes(data)


@st.composite
def served(draw: st.DrawFn, raw: st.SearchStrategy[bytes]) -> Answer:
    data = draw(raw)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3))))
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    pieces = tuple(data[a:b] for a, b in itertools.pairwise(bounds) if b > a)
    return Answer(pieces, draw(st.sampled_from(["asyncio", "uvloop"])))


FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@FUZZ
@given(served(valid_answers()))
def test_valid_answers_get_the_same_decision_as_h11(answer: Answer) -> None:
    expected = h11_decision(answer.raw)
    assert expected[0] == "ok", expected  # the generator makes only valid answers
    assert client_decision(answer) == expected


@FUZZ
@given(served(valid_answers().flatmap(mutated)))
def test_mutated_answers_are_never_taken_where_h11_refuses(answer: Answer) -> None:
    ours = client_decision(answer)
    if ours != REFUSED:
        assert h11_decision(answer.raw) == ours


HOSTILE = {
    "status 000": b"HTTP/1.1 000 X\r\nContent-Length: 0\r\n\r\n",
    "status 2000": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nhi",
    "negative chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nhi\r\n0\r\n\r\n",
    "0x chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nhi\r\n0\r\n\r\n",
    "_ chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0_2\r\nhi\r\n0\r\n\r\n",
    "TE substring": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "TE chunked then gzip": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    ),
    "conflicting lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi!",
    "length and chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n"
    ),
    "non-ASCII digit length": b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nhi",
    "short body": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi",
    "no last chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nhi",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi",
    "HTTP/2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    "unasked 101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nhi",
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "chunk without CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiX0\r\n\r\n",
    "NUL in value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nhi",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_hostile_answers_are_refused(name: str, loop: str) -> None:
    raw = HOSTILE[name]
    assert client_decision(Answer((raw,), loop)) == REFUSED
    if h11_decision(raw) != REFUSED:
        # Where h11 is the more lenient one (RFC 9112 lets a recipient take these; a gateway
        # in front of replicas has no reason to), and nowhere else.
        assert name in H11_TAKES, f"h11 takes {name!r}"


H11_TAKES = {"length and chunked", "bare LF", "obs-fold", "HTTP/2.0"}
