"""Client limits: slow clients time out and give their connections back, the connection cap
refuses with 503, and normal clients are served meanwhile. All traffic on 127.0.0.1, every
loop bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import time

from gwharness import Fleet, FleetFactory, wait_until

from modelfleet.api.headers import INSTANCE_HEADER

_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
_CHAT = json.dumps({"model": "gemma3-4b", "messages": [{"role": "user", "content": "hi"}]})


def _open(fleet: Fleet) -> float:
    value = fleet.gateway.gateway.metrics.registry.get_sample_value(
        "modelfleet_gateway_client_connections"
    )
    return value or 0.0


def _sample(fleet: Fleet, name: str, labels: dict[str, str] | None = None) -> float:
    value = fleet.gateway.gateway.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def _connect(fleet: Fleet) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(fleet.url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_to_close(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Everything the gateway sends until it closes the connection, within a deadline."""
    received = b""
    async with asyncio.timeout(timeout_s):
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


async def _served_fleet(make_fleet: FleetFactory, **settings: float) -> Fleet:
    fleet = await make_fleet(**settings)
    await fleet.add_sim("a")
    fleet.add_pod("a")
    return fleet


async def test_slow_loris_connections_are_freed_while_normal_clients_are_served(
    make_fleet: FleetFactory,
) -> None:
    fleet = await _served_fleet(make_fleet, client_header_timeout_s=1.0, client_body_timeout_s=1.0)
    slow = []
    for i in range(60):  # half stop inside the head, half inside a large body
        reader, writer = await _connect(fleet)
        if i % 2:
            writer.write(_HEAD[: 20 + i])
        else:
            writer.write(_HEAD + b"Content-Length: 4000000\r\n\r\n" + b"{" + b" " * 60000)
        slow.append((i % 2 == 1, reader, writer))
    await wait_until(lambda: _open(fleet) >= 60)

    started = time.monotonic()
    latencies = []
    while time.monotonic() - started < 0.6:  # normal requests while every slow one is held
        began = time.perf_counter()
        status, instance, _ = await fleet.chat()
        latencies.append(time.perf_counter() - began)
        assert (status, instance) == (200, "a")
    assert _open(fleet) >= 60, "the slow connections were let go before their timeout"
    assert max(latencies) < 1.0, latencies

    answers = await asyncio.gather(*(_read_to_close(r, 5.0) for _, r, _ in slow))
    for (in_head, _, writer), answer in zip(slow, answers, strict=True):
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_timeout"
        assert ("head" if in_head else "body") in body["error"]["message"]
        writer.close()
    await wait_until(lambda: _open(fleet) <= 1)  # the normal client's kept-alive connection
    assert _sample(fleet, "modelfleet_gateway_client_timeouts_total", {"phase": "header"}) == 30
    assert _sample(fleet, "modelfleet_gateway_client_timeouts_total", {"phase": "body"}) == 30
    assert (await fleet.chat())[0] == 200


async def test_connection_that_sends_nothing_is_closed_without_an_answer(
    make_fleet: FleetFactory,
) -> None:
    fleet = await _served_fleet(make_fleet, client_header_timeout_s=0.3)
    reader, writer = await _connect(fleet)
    began = time.monotonic()
    assert await _read_to_close(reader, 5.0) == b""
    assert 0.2 < time.monotonic() - began < 3.0
    writer.close()


async def test_head_deadline_restarts_at_the_next_request_and_spares_long_answers(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(client_header_timeout_s=0.3, client_idle_timeout_s=30.0)
    await fleet.add_sim("a", token_latency_s=0.05)  # 12 tokens: the stream outlasts 0.3 s
    fleet.add_pod("a")
    reader, writer = await _connect(fleet)
    body = json.dumps(
        {"model": "gemma3-4b", "stream": True, "messages": [{"role": "user", "content": "w " * 12}]}
    ).encode()
    for _ in range(2):  # idle past the head deadline between the two: the idle timeout counts
        writer.write(_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        began = time.monotonic()
        async with asyncio.timeout(5.0):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert INSTANCE_HEADER.encode() in head
            stream = await reader.readuntil(b"0\r\n\r\n")  # the chunked stream's end
        assert time.monotonic() - began > 0.4
        assert stream.count(b"data: ") >= 12
        assert b"data: [DONE]" in stream
        await asyncio.sleep(0.5)
    writer.write(_HEAD[:30])  # then a head that stops halfway
    answer = await _read_to_close(reader, 5.0)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    writer.close()


async def test_idle_kept_alive_connection_is_closed(make_fleet: FleetFactory) -> None:
    fleet = await _served_fleet(make_fleet, client_idle_timeout_s=0.3)
    reader, writer = await _connect(fleet)
    writer.write(_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(_CHAT), _CHAT.encode()))
    async with asyncio.timeout(5.0):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    began = time.monotonic()
    assert await _read_to_close(reader, 5.0) == b""
    assert time.monotonic() - began < 3.0
    writer.close()


async def test_connections_over_the_cap_get_503_with_retry_after(make_fleet: FleetFactory) -> None:
    fleet = await _served_fleet(make_fleet, max_client_connections=3, retry_after_s=2)
    held = [await _connect(fleet) for _ in range(3)]
    await wait_until(lambda: _open(fleet) == 3)

    reader, writer = await _connect(fleet)
    writer.write(_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(_CHAT), _CHAT.encode()))
    answer = await _read_to_close(reader, 5.0)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 2" in head
    assert b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    refusals = {"reason": "connections"}
    assert _sample(fleet, "modelfleet_gateway_client_refusals_total", refusals) == 1
    assert _open(fleet) == 3

    async with fleet.http.get(fleet.url + "/healthz") as resp:  # as an HTTP client sees it
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "2"
    for _, held_writer in held:
        held_writer.close()
    await wait_until(lambda: _open(fleet) == 0)
    assert (await fleet.chat())[0] == 200


async def test_large_bodies_in_flight_share_a_budget(make_fleet: FleetFactory) -> None:
    mib = 1024 * 1024
    fleet = await _served_fleet(
        make_fleet, max_body_bytes=mib, max_buffered_body_bytes=3 * mib // 2, retry_after_s=3
    )
    proxy = fleet.gateway.gateway.proxy
    assert proxy is not None
    silent = []
    for declared in (mib, mib // 2):  # together they fill the budget, then go silent
        _, writer = await _connect(fleet)
        writer.write(_HEAD + b"Content-Length: %d\r\n\r\n{" % declared)
        silent.append(writer)
    await wait_until(lambda: proxy.buffered_body_bytes == 3 * mib // 2)
    small = {"model": "gemma3-4b", "prompt": "x"}
    large = {"model": "gemma3-4b", "prompt": "x" * 100_000}  # over the 64 KiB always let in

    async def chunks():  # no Content-Length: counted at max_body_bytes
        yield json.dumps(small).encode()

    assert (await fleet.post("/v1/completions", small))[0] == 200
    status, headers, data = await fleet.post("/v1/completions", large)
    assert status == 503
    assert headers["Retry-After"] == "3"
    assert data["error"]["code"] == "gateway_busy"
    async with fleet.http.post(fleet.url + "/v1/completions", data=chunks()) as resp:
        assert resp.status == 503
    refusals = {"reason": "bodies"}
    assert _sample(fleet, "modelfleet_gateway_client_refusals_total", refusals) == 2

    silent[0].close()  # a silent client leaves: its share goes with it
    await wait_until(lambda: proxy.buffered_body_bytes == mib // 2)
    assert (await fleet.post("/v1/completions", large))[0] == 200
    async with fleet.http.post(fleet.url + "/v1/completions", data=chunks()) as resp:
        assert resp.status == 200
    silent[1].close()
