"""The gateway's upstream HTTP/1.1 client against real servers on 127.0.0.1: framings,
keep-alive reuse, stale pooled connections, timeouts, disconnects and large bodies; then the same
failures seen through the gateway."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator

import pytest
from gwharness import FleetFactory, wait_until
from gwrawhttp import RawServer, Request, chunk, head_for, response

from modelfleet.gateway.upstream import UpstreamBodyError, UpstreamClient, UpstreamError


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(connect_timeout_s=2, read_timeout_s=5)
    yield upstream
    await upstream.close()


async def post(client: UpstreamClient, server: RawServer, body: bytes = b"{}") -> tuple[int, bytes]:
    resp = await client.post(server.address, head_for(body), body)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


async def echo(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(response(200, b'{"got":%d}' % len(request.body)))
    return True


async def test_content_length_answers_reuse_one_connection(raw, client) -> None:
    server = await raw(echo)
    for size in (0, 10, 1000):
        assert await post(client, server, b"x" * size) == (200, b'{"got":%d}' % size)
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [1, 1, 1]
    assert client.idle_connections(server.address) == 1
    sent = server.requests[0]
    assert sent.path == "/v1/completions"
    assert sent.header("content-type") == "application/json"


async def test_chunked_answer_with_extensions_and_trailers(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        # Framing split at awkward places: inside the size line and between data and CRLF.
        for piece in (b"5;ext=1\r\nhel", b"lo\r", b"\n6\r\n world\r\n", b"0\r\nX-T: 1\r\n\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.001)
        return True

    server = await raw(serve)
    assert await post(client, server) == (200, b"hello world")
    assert await post(client, server) == (200, b"hello world")
    assert server.connections == 1  # the chunked end was found, so the connection was reused


async def test_sse_arrives_chunk_by_chunk(raw, client) -> None:
    release = asyncio.Event()

    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: one\n\n")
        )
        await writer.drain()
        await release.wait()  # the second event only once the client has seen the first
        writer.write(chunk(b"data: two\n\n") + b"0\r\n\r\n")
        return True

    server = await raw(serve)
    resp = await client.post(server.address, head_for(b"{}"), b"{}")
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.content_length is None
    seen = []
    async for data in resp.iter_chunks():
        seen.append(data)
        release.set()
    resp.release()
    assert seen == [b"data: one\n\n", b"data: two\n\n"]


async def test_body_until_close_and_connection_close_are_not_pooled(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.body == b"eof":
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        else:
            writer.write(response(200, b"closing", "Connection: close"))
        return False

    server = await raw(serve)
    assert await post(client, server, b"eof") == (200, b"all of it")
    assert await post(client, server, b"x") == (200, b"closing")
    assert server.connections == 2
    assert client.idle_connections(server.address) == 0


async def test_interim_and_bodiless_answers(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    server = await raw(serve)
    assert await post(client, server) == (204, b"")
    assert await post(client, server) == (204, b"")
    assert server.connections == 1


async def test_a_pooled_connection_the_replica_closed_is_replaced_once(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(200, b"ok"))
        return False  # says keep-alive (HTTP/1.1) but closes: an idle timeout on the replica

    server = await raw(serve)
    assert await post(client, server) == (200, b"ok")
    await wait_until(lambda: client.idle_connections(server.address) == 0)  # the close seen
    assert await post(client, server) == (200, b"ok")
    assert server.connections == 2
    assert len(server.requests) == 2  # each request reached the replica exactly once


async def test_a_pooled_connection_closed_without_an_answer_is_not_sent_again(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1 and len(server.requests) == 2:
            return False  # read the request on the kept-alive connection, then dropped it
        writer.write(response(200, b"ok"))
        return True

    server = await raw(serve)
    assert await post(client, server) == (200, b"ok")
    with pytest.raises(UpstreamError) as info:
        await post(client, server)
    assert (info.value.reason, info.value.sent) == ("closed", True)
    assert len(server.requests) == 2  # the second request once: it may have been running
    assert server.connections == 1


async def test_a_fresh_connection_closed_without_an_answer_is_a_connect_error(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        return False

    server = await raw(serve)
    with pytest.raises(UpstreamError) as info:
        await post(client, server)
    assert (info.value.reason, info.value.sent) == ("closed", True)
    assert server.connections == 1  # not retried: the replica saw the request and dropped it


async def test_refused_connection(raw, client) -> None:
    server = await raw(echo)
    address = server.address
    await server.stop()
    with pytest.raises(UpstreamError) as info:
        await client.post(address, head_for(b"{}"), b"{}")
    assert info.value.reason == "connect"


async def test_silent_replica_times_out_before_and_after_the_head(raw) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.body == b"after":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(30)
        return False

    server = await raw(serve)
    client = UpstreamClient(connect_timeout_s=2, read_timeout_s=0.2)
    try:
        with pytest.raises(UpstreamError) as info:
            await client.post(server.address, head_for(b"before"), b"before")
        assert info.value.reason == "timeout"
        resp = await client.post(server.address, head_for(b"after"), b"after")
        assert resp.status == 200
        with pytest.raises(UpstreamBodyError):
            await resp.read()
        resp.release()
        assert client.idle_connections(server.address) == 0
    finally:
        await client.close()


async def test_broken_answers(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.body == b"garbage":
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        elif request.body == b"short":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        return False

    server = await raw(serve)
    with pytest.raises(UpstreamError):
        await post(client, server, b"garbage")
    with pytest.raises(UpstreamBodyError):
        await post(client, server, b"short")
    with pytest.raises(UpstreamBodyError):
        await post(client, server, b"badchunk")


async def test_closing_mid_stream_reaches_the_replica(raw, client) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:  # until the client goes away
            writer.write(chunk(b"data: x\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)

    server = await raw(serve)
    resp = await client.post(server.address, head_for(b"{}"), b"{}")
    async for _ in resp.iter_chunks():
        break
    resp.close()
    resp.release()
    await wait_until(lambda: server.closed == 1)
    assert client.idle_connections(server.address) == 0


async def test_large_bodies_both_ways_with_a_slow_reader(raw, client) -> None:
    big = bytes(range(256)) * (8 * 4096)  # 8 MiB

    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        assert request.body == big
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(big), 1 << 16):
            writer.write(chunk(big[start : start + (1 << 16)]))
        writer.write(b"0\r\n\r\n")
        return True

    server = await raw(serve)
    resp = await client.post(server.address, head_for(big), big)
    received = bytearray()
    async for data in resp.iter_chunks():
        received += data
        await asyncio.sleep(0)  # a slow client: the reader pauses the replica meanwhile
    resp.release()
    assert bytes(received) == big
    assert await post(client, server, big) == (200, big)
    assert server.connections == 1


# ---- through the gateway ------------------------------------------------------------------------


async def test_gateway_survives_replicas_closing_idle_connections(
    make_fleet: FleetFactory, raw
) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(200, b'{"ok":true}', "x-modelfleet-instance: raw"))
        return False

    server = await raw(serve)
    fleet = await make_fleet()
    fleet.add_pod("raw", port=server.port)
    assert fleet.gateway.gateway.proxy is not None
    upstream = fleet.gateway.gateway.proxy.upstream
    for _ in range(3):
        # Once the gateway has seen the close: a close at the instant a request goes out is
        # not retried (the replica may have read it), see upstream.py.
        await wait_until(lambda: upstream.idle_connections(server.address) == 0)
        status, instance, data = await fleet.chat()
        assert (status, instance, data) == (200, "raw", {"ok": True})
    async with fleet.http.get(fleet.url + "/metrics") as resp:
        assert "upstream_errors_total{" not in await resp.text()


async def test_gateway_answers_502_when_a_replica_breaks_off(make_fleet: FleetFactory, raw) -> None:
    async def serve(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        return False

    server = await raw(serve)
    fleet = await make_fleet()
    fleet.add_pod("raw", port=server.port)
    status, _, data = await fleet.chat(text="private words")
    assert status == 502
    assert data["error"]["code"] == "upstream_broke_off"
    assert "private" not in json.dumps(data)
    async with fleet.http.get(fleet.url + "/metrics") as resp:
        text = await resp.text()
    assert 'modelfleet_gateway_upstream_errors_total{model="gemma3-4b",reason="body"}' in text


async def test_gateway_forwards_a_body_at_the_cap_and_the_chosen_headers(
    make_fleet: FleetFactory, raw
) -> None:
    server = await raw(echo)
    fleet = await make_fleet(max_body_bytes=1 << 20)
    fleet.add_pod("raw", port=server.port)
    body = json.dumps({"model": "gemma3-4b", "prompt": "w" * 1000}).encode()
    body += b" " * ((1 << 20) - len(body))
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer k",
        "Cookie": "private",
        "X-Request-Id": "r1",
    }
    async with fleet.http.post(
        fleet.url + "/v1/completions", data=io.BytesIO(body), headers=headers
    ) as resp:
        assert resp.status == 200
        assert await resp.json() == {"got": 1 << 20}
    sent = server.requests[-1]
    assert sent.body == body
    assert sent.header("authorization") == "Bearer k"
    assert sent.header("x-request-id") == "r1"
    assert sent.header("cookie") is None
    assert sent.header("host") == server.address
    async with fleet.http.post(fleet.url + "/v1/completions", data=io.BytesIO(body + b" ")) as resp:
        assert resp.status == 413
