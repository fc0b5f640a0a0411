"""Hostile replicas on 127.0.0.1 against the upstream client and the gateway: each framing an
attacker (or a broken replica) may send is refused with a clear error, within bounded time and
memory, and no request is sent twice once it may have reached a replica."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from gwharness import FleetFactory
from gwrawhttp import RawServer, Request, Serve, chunk, head_for

from modelfleet.gateway.upstream import UpstreamBodyError, UpstreamClient, UpstreamError

# Every hostile exchange is over well before this; the old client hung forever on some.
DEADLINE_S = 4.0


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(connect_timeout_s=2, read_timeout_s=30, head_timeout_s=0.5)
    yield upstream
    await upstream.close()


def answering(*pieces: bytes, keep_open: bool = True) -> Serve:
    """A replica that writes `pieces` (a pause between them) and then stays silent."""

    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)
        if keep_open:
            await asyncio.sleep(DEADLINE_S * 2)
        return False

    return serve


async def fetch(client: UpstreamClient, server: RawServer) -> tuple[int, bytes]:
    """One request, its whole answer; bounded by DEADLINE_S."""
    async with asyncio.timeout(DEADLINE_S):
        resp = await client.post(server.address, head_for(b"{}"), b"{}")
        try:
            return resp.status, await resp.read()
        finally:
            resp.release()


async def refused_head(client: UpstreamClient, server: RawServer) -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        await fetch(client, server)
    assert info.value.reason == "protocol"
    assert info.value.sent
    return info.value


async def refused_body(client: UpstreamClient, server: RawServer) -> UpstreamBodyError:
    with pytest.raises(UpstreamBodyError) as info:
        await fetch(client, server)
    assert info.value.malformed
    return info.value


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


# ---- the findings, one test each ----------------------------------------------------------------


async def test_status_000_is_refused_not_hung(raw, client) -> None:
    server = await raw(answering(b"HTTP/1.1 000 Nothing\r\nContent-Length: 0\r\n\r\n"))
    error = await refused_head(client, server)
    assert "status 000" in str(error)


async def test_status_2000_is_refused_not_read_as_200(raw, client) -> None:
    server = await raw(answering(b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nhi"))
    await refused_head(client, server)


@pytest.mark.parametrize("status", [b"099", b"600", b"999"])
async def test_status_outside_100_to_599_is_refused(raw, client, status: bytes) -> None:
    server = await raw(answering(b"HTTP/1.1 %s X\r\nContent-Length: 2\r\n\r\nhi" % status))
    await refused_head(client, server)


def endless(start: bytes, filler: bytes, counter: list[int]) -> Serve:
    """A replica that sends `start`, then `filler` in 64 KiB writes until the client hangs up
    (16 MiB at most); `counter` gets the filler bytes it got out."""

    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(start)
        piece = filler * (65536 // len(filler))
        for _ in range((16 << 20) // len(piece)):
            writer.write(piece)
            await writer.drain()
            counter[0] += len(piece)
        return False

    return serve


async def test_endless_trailer_line_is_cut_off_early(raw, client) -> None:
    written = [0]
    server = await raw(endless(CHUNKED + chunk(b"{}") + b"0\r\nX-Trailer: ", b"a", written))
    started = time.perf_counter()
    await refused_body(client, server)
    assert time.perf_counter() - started < 2
    await asyncio.sleep(0.05)
    # The client stops reading at its cap: what the replica got out is bounded by the socket
    # buffers, not by the 16 MiB it meant to send.
    assert written[0] < 8 << 20


async def test_endless_trailers_and_chunk_extension_are_cut_off(raw, client) -> None:
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(20000))  # 240 KB at once
    server = await raw(answering(CHUNKED + chunk(b"{}") + b"0\r\n" + trailers + b"\r\n"))
    error = await refused_body(client, server)
    assert "trailers over 65536 bytes" in str(error)
    written = [0]
    server = await raw(endless(CHUNKED + chunk(b"{}") + b"2;", b"e", written))
    await refused_body(client, server)
    assert written[0] < 8 << 20


@pytest.mark.parametrize("size", [b"-2", b"0x2", b"0_2", b"+2", b" 2"])
async def test_malformed_chunk_sizes_are_refused(raw, client, size: bytes) -> None:
    server = await raw(answering(CHUNKED + size + b"\r\n{}\r\n0\r\n\r\n"))
    await refused_body(client, server)


@pytest.mark.parametrize(
    "encoding", [b"notchunked", b"chunked, gzip", b"gzip, chunked", b"xchunked", b"identity"]
)
async def test_transfer_encoding_other_than_chunked_is_refused(
    raw, client, encoding: bytes
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n2\r\n{}\r\n0\r\n\r\n" % encoding
    server = await raw(answering(answer, keep_open=False))
    await refused_head(client, server)


@pytest.mark.parametrize(
    "lengths",
    [
        b"Content-Length: 2\r\nContent-Length: 5\r\n",
        b"Content-Length: 2, 5\r\n",
        b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: \xb2\r\n",  # a digit to str.isdigit, not to int()
        b"Content-Length: -2\r\n",
    ],
)
async def test_conflicting_or_malformed_content_length_is_refused(
    raw, client, lengths: bytes
) -> None:
    server = await raw(answering(b"HTTP/1.1 200 OK\r\n" + lengths + b"\r\n{}hello"))
    await refused_head(client, server)


async def test_response_head_has_a_deadline_from_its_first_byte(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(200):  # a header byte every 20 ms: never silent for the read timeout
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.02)
        return False

    server = await raw(serve)
    started = time.perf_counter()
    with pytest.raises(UpstreamError) as info:
        await fetch(client, server)
    assert info.value.reason == "timeout"
    assert "response head within 0.5s" in str(info.value)
    assert 0.4 < time.perf_counter() - started < 2


async def test_a_slow_first_byte_is_not_cut_by_the_head_deadline(raw, client) -> None:
    # vLLM sends nothing until a non-streamed completion is done; only the read timeout counts.
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(1.0)  # twice the head timeout
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        return True

    server = await raw(serve)
    assert await fetch(client, server) == (200, b"{}")


async def test_a_slow_final_head_after_an_interim_one_is_not_cut(raw, client) -> None:
    # Each head has the head timeout from its own first byte, not from an earlier 100 Continue.
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1.0)  # twice the head timeout
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        return True

    server = await raw(serve)
    assert await fetch(client, server) == (200, b"{}")


async def test_endless_interim_answers_are_cut_off(raw, client) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" * 4000  # 100 KiB of 100 Continue
    server = await raw(answering(interim))
    await refused_head(client, server)


async def test_unasked_protocol_switch_and_other_protocols_are_refused(raw, client) -> None:
    for answer in (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"RTSP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 100 Continue\r\n\r\nICE/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ):
        server = await raw(answering(answer))
        await refused_head(client, server)


async def test_response_head_over_64_kib_is_refused(raw, client) -> None:
    big = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\nContent-Length: 0\r\n\r\n"
    server = await raw(answering(big))
    error = await refused_head(client, server)
    assert "over 65536 bytes" in str(error)


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json, text/html",
        b"json",
        b"text/html; charset",
        b"application/json\x01",
        b"text/event-stream; x=\xff",
        b"",
    ],
)
async def test_relayed_content_type_must_be_a_media_type(raw, client, content_type: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: 2\r\n\r\n{}" % content_type
    server = await raw(answering(answer))
    await refused_head(client, server)


async def test_post_is_not_sent_twice_when_a_reused_connection_closes(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        if len(server.requests) == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            return True
        return False  # read the second request on the kept-alive connection, then closed

    server = await raw(serve)
    assert await fetch(client, server) == (200, b"{}")
    with pytest.raises(UpstreamError) as info:
        await fetch(client, server)
    assert info.value.reason == "closed"
    assert info.value.sent
    assert len(server.requests) == 2  # the second one once
    assert server.connections == 1


# ---- through the gateway: 502 with a clear body, never 200-then-cut -----------------------------


async def _gateway_answer(fleet, text: str = "hello") -> tuple[int, bytes]:
    body = {"model": "gemma3-4b", "messages": [{"role": "user", "content": text}]}
    async with asyncio.timeout(DEADLINE_S):
        async with fleet.http.post(fleet.url + "/v1/chat/completions", json=body) as resp:
            try:
                return resp.status, await resp.read()
            except aiohttp.ClientPayloadError:
                return -resp.status, b""  # the answer was cut after its head


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}",  # an exception in the old parser
        CHUNKED + b"-2\r\n{}\r\n0\r\n\r\n",  # a bad chunk that came with the head
        CHUNKED.replace(b"application/json", b"text/event-stream") + b"zz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html, application/json\r\n\r\n{}",
    ],
)
async def test_gateway_answers_502_for_a_malformed_answer(
    make_fleet: FleetFactory, raw, answer: bytes
) -> None:
    server = await raw(answering(answer))
    fleet = await make_fleet()
    fleet.add_pod("raw", port=server.port)
    status, data = await _gateway_answer(fleet, text="private words")
    assert status == 502
    error = json.loads(data)["error"]
    assert error["code"] in ("upstream_bad_answer", "upstream_broke_off")
    assert "malformed answer" in error["message"]
    assert "private" not in error["message"]
    assert server.address not in error["message"]
    assert len(server.requests) == 1


async def test_gateway_sends_a_post_to_one_replica_once(make_fleet: FleetFactory, raw) -> None:
    async def drop(request: Request, writer: asyncio.StreamWriter) -> bool:
        return False  # reads the request, answers nothing

    async def ok(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        return True

    dropping = await raw(drop)
    healthy = await raw(ok)
    fleet = await make_fleet()
    fleet.add_pod("a", port=dropping.port)
    fleet.add_pod("b", port=healthy.port)
    answers = [await _gateway_answer(fleet) for _ in range(4)]
    # Round-robin: the requests that went to the dropping replica were neither sent to it again
    # nor passed on to the healthy one: the replica may have been running them.
    failed = [status for status, _ in answers if status != 200]
    assert failed == [502, 502]
    assert len(dropping.requests) == 2
    assert len(healthy.requests) == 2


async def test_gateway_answers_504_when_the_head_does_not_come_in_time(
    make_fleet: FleetFactory, raw
) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(100):
            writer.write(b"s")
            await writer.drain()
            await asyncio.sleep(0.02)
        return False

    server = await raw(serve)
    fleet = await make_fleet(upstream_head_timeout_s=0.3)
    fleet.add_pod("raw", port=server.port)
    status, data = await _gateway_answer(fleet)
    assert status == 504
    assert json.loads(data)["error"]["code"] == "upstream_timeout"
