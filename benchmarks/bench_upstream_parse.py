"""Upstream response parsing: the gateway's client of an earlier revision against this one.

Both clients' connection objects (`_Conn` in gateway/upstream.py) are fed the same answers
through `data_received`, as the event loop feeds them, with a transport that takes the request
bytes and drops them: no socket, so only the client's own work per answer is timed (starting the
request, parsing the head, framing the body, handing it over). The earlier revision's module is
read from git (`--baseline-rev`, default the commit before the parser change), so one run
measures both side by side, alternating in rounds; figures are medians over the rounds.

Answers, as vLLM writes them: a small non-streamed chat completion in one read; a streamed one
(SSE, chunked, one read per token event); a 256 KiB answer with Content-Length in 64 KiB reads.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODULE = "operator/modelfleet/gateway/upstream.py"
# The commit this benchmark's parser change branched from: the hand-written parser.
DEFAULT_BASELINE = "0e29aa9"

REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 2\r\n\r\n"
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-0a1b2c3d4e5f",
        "object": "chat.completion",
        "created": 1764800000,
        "model": "gemma3-4B",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello world " * 8},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28},
    }
).encode()


def head(extra: str) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\ndate: Thu, 04 Dec 2026 10:00:00 GMT\r\nserver: uvicorn\r\n{extra}\r\n"
    ).encode()


def answers() -> dict[str, list[bytes]]:
    """Each answer as the reads the client gets."""
    small = [
        head(f"content-length: {len(COMPLETION)}\r\ncontent-type: application/json\r\n")
        + COMPLETION
    ]
    events = [
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"tok%d "}}]}\n\n' % i
        for i in range(16)
    ] + [b"data: [DONE]\n\n"]
    stream = [
        head("content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n")
        + b"%x\r\n%s\r\n" % (len(events[0]), events[0])
    ]
    stream += [b"%x\r\n%s\r\n" % (len(e), e) for e in events[1:]]
    stream[-1] += b"0\r\n\r\n"
    big_body = bytes(range(256)) * 1024
    big = [head(f"content-length: {len(big_body)}\r\ncontent-type: application/json\r\n")]
    big[0] += big_body[: 65536 - len(big[0])]
    done = 65536 - len(head("content-length: 262144\r\ncontent-type: application/json\r\n"))
    while done < len(big_body):
        big.append(big_body[done : done + 65536])
        done += 65536
    return {"small_json": small, "sse_17_events": stream, "large_256k": big}


class NullTransport:
    """Takes what the client writes; the answer comes from the benchmark, not a socket."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def load(rev: str | None) -> ModuleType:
    """gateway/upstream.py at `rev` (None: this checkout) as a module of its own."""
    if rev is None:
        path = ROOT / MODULE
    else:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{MODULE}"],
            check=True,
            capture_output=True,
        ).stdout
        path = Path(tempfile.mkdtemp(prefix="bench-upstream-")) / "upstream_base.py"
        path.write_bytes(source)
    name = f"upstream_{rev or 'here'}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_conn(module: ModuleType, loop: asyncio.AbstractEventLoop) -> Any:
    client = module.UpstreamClient(connect_timeout_s=5, read_timeout_s=600)
    pool = client._pool("127.0.0.1:8000")
    conn = module._Conn(pool)
    conn.connection_made(NullTransport())
    return conn


def time_answers(conn: Any, reads: list[bytes], count: int) -> float:
    """Microseconds per answer: start the request, take the reads, collect the body."""
    expected = None
    started = time.perf_counter()
    for _ in range(count):
        conn.start(REQUEST, b"{}")
        for data in reads:
            conn.data_received(data)
        parts = conn.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        if expected is None:
            expected = body
        elif conn.error is not None or conn.status != 200 or len(body) != len(expected):
            raise SystemExit(f"the client did not parse the answer: {conn.error!r}")
    return (time.perf_counter() - started) * 1e6 / count


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--count", type=int, default=20000, help="answers per round and kind")
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    builds = {"base": load(args.baseline_rev), "new": load(None)}
    conns = {name: make_conn(module, loop) for name, module in builds.items()}
    kinds = answers()
    times: dict[tuple[str, str], list[float]] = {}
    for round_no in range(args.rounds):
        # Alternate which build goes first, so neither always runs on a warmer machine.
        order = list(builds) if round_no % 2 == 0 else list(reversed(builds))
        for kind, reads in kinds.items():
            count = args.count if kind != "large_256k" else args.count // 10
            for name in order:
                times.setdefault((kind, name), []).append(time_answers(conns[name], reads, count))
    print(f"baseline: {args.baseline_rev}; {args.rounds} rounds; medians, microseconds per answer")
    print(f"{'answer':<16} {'base us':>9} {'new us':>9} {'new/base':>9}")
    figures = []
    for kind in kinds:
        base = statistics.median(times[(kind, "base")])
        new = statistics.median(times[(kind, "new")])
        print(f"{kind:<16} {base:>9.2f} {new:>9.2f} {new / base:>9.2f}")
        figures.append(f"{kind}_base_us={base:.2f} {kind}_new_us={new:.2f}")
    print(" ".join(figures))
    return 0


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main()))
