"""A small HTTP/1.1 server on 127.0.0.1 whose answers each test writes byte for byte, to drive
the gateway's upstream client through framings and failures a real replica may produce."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    head: bytes
    body: bytes
    connection: int  # which accepted connection carried it, from 1

    @property
    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode()

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode()
        return None


# Writes the answer; returns False to close the connection afterwards.
Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawServer:
    handler: Handler
    server: asyncio.Server | None = None
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    closed: int = 0  # connections that ended (client or server side)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request = Request(head[:-4], b"", number)
                length = int(request.header("content-length") or 0)
                request.body = await reader.readexactly(length)
                self.requests.append(request)
                keep = await self.handler(request, writer)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # the test is over while a handler still waits
        finally:
            self.closed += 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def response(
    status: int, body: bytes, *extra: str, content_type: str = "application/json"
) -> bytes:
    headers = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}"]
    headers.append(f"Content-Length: {len(body)}")
    headers.extend(extra)
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# The head of the request the upstream tests send; head_for() adds the Content-Length.
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: replica\r\nContent-Type: application/json\r\n"
Serve = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


def head_for(body: bytes) -> bytes:
    return HEAD + b"Content-Length: %d\r\n\r\n" % len(body)
