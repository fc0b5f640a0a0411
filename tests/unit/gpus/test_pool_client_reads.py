"""The pool reads an agent's whole reply, however the network splits it, and no more than the cap.

A raw HTTP server on 127.0.0.1 writes the reply in pieces with pauses between them, as a real
network delivers a reply larger than one segment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from pool_fakes import make_report

from modelfleet.gpus.client import FetchError, fetch_report

Pieces = Callable[[bytes], list[bytes]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


class Server:
    """Answers each GET with `body`, written as `pieces(head + body)` 20 ms apart."""

    def __init__(self, body: bytes, pieces: Pieces, length: int | None = None) -> None:
        self.body, self.pieces, self.length = body, pieces, length
        self.handlers: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        declared = len(self.body) if self.length is None else self.length
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\nConnection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(ConnectionError):
            for i, piece in enumerate(self.pieces(head + self.body)):
                if i:
                    await asyncio.sleep(0.02)
                writer.write(piece)
                await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    def _start_handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.append(asyncio.ensure_future(self.handle(reader, writer)))

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._start_handler, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        await asyncio.gather(*self.handlers, return_exceptions=True)


def halves(data: bytes) -> list[bytes]:
    return [data[: len(data) // 2], data[len(data) // 2 :]]


def segments(data: bytes) -> list[bytes]:
    return [data[i : i + 1400] for i in range(0, len(data), 1400)]


@pytest.mark.parametrize(("gpus", "pieces"), [(8, halves), (64, segments)], ids=["split", "95KB"])
async def test_a_reply_in_pieces_is_read_whole(
    session: aiohttp.ClientSession, gpus: int, pieces: Pieces
) -> None:
    pods = {i: [f"ns/pod-with-a-rather-long-name-{i}-{k}" for k in range(12)] for i in range(gpus)}
    report = make_report("node-a", gpus, pods=pods if gpus > 8 else None)
    body = report.model_dump_json(by_alias=True).encode()
    async with Server(body, pieces) as url:
        got = await fetch_report(session, url, timeout_s=10.0)
    assert got == report
    if gpus > 8:
        assert len(body) > 65_536  # more than one read's worth: the case that was cut before


async def test_a_reply_over_the_cap_is_refused_without_reading_it(
    session: aiohttp.ClientSession,
) -> None:
    async with Server(b"{}", halves, length=64 * 1024 * 1024) as url:
        with pytest.raises(FetchError, match="reply larger than 4194304 bytes"):
            await fetch_report(session, url, timeout_s=10.0)
