"""Routing benchmark: policies side by side in front of 4 vLLM stand-ins with the engine cost model.

Four `modelfleet sim-vllm` processes on 127.0.0.1 model Llama-3.1-8B-Instruct on an A100 40GB
(MODELFLEET_SIM_COST_MODEL: continuous batching, prefill and decode time, a paged KV cache with
prefix caching); each runs at --gpu-memory-utilization 0.6, which leaves 3,328 KV blocks
(53,248 tokens). In front of the same four: one modelfleet gateway per policy, and vllm-router
with its cache-aware policy from the benchmark's own environment.

Workloads of streamed chat completions from `--users` clients:
- shared-prefix (closed loop: each user waits for its answer): every user has a long system
  prompt of its own and a conversation that grows turn by turn (each turn: a new user message,
  the answer appended), starting over after `--turns` turns. All users' prefixes together
  (~160k tokens) exceed one replica's cache three times, but a quarter of them fit: a replica
  only hits its cache when it keeps seeing the same users. Users wait `--think` seconds on
  average between requests, so a replica's in-flight count says nothing of which users it
  served last.
- control: every request a fresh prompt of the same length; no prefix is ever shared.
- open: the shared-prefix workload as an open loop, the load the issue asks for ("at a load that
  saturates round-robin"). Requests arrive as a Poisson process at `--rate` per second from a
  seeded schedule, the same times, users and turns for every policy, whether or not earlier
  ones have been answered; `--rate`'s default, 60/s, is about 1.7x what round-robin serves
  here (33-37/s) and below what PrefixHash serves. A closed loop cannot overload a policy: its
  queue stops growing at `--users`. Here round-robin's queue grows for the whole window, so
  its TTFT grows with the window's length (`--warmup` + `--open-duration`). Bounded by
  `--max-outstanding` (arrivals beyond it are dropped and counted) and `--open-grace`.

Every run uses prompts no earlier run used and waits for the engines to drain, so no run
inherits another's cache or queue. Figures: TTFT (first bytes of the stream) and end-to-end
p50/p99, output tokens/s, the replicas' prefix-cache hit ratio (from their own vllm: counters;
each replica's in the progress lines), requests per replica, and the gateway's CPU per request
(/proc, over the measured window). In the open loop, TTFT and end-to-end count from each
request's scheduled arrival, with the offered and completed rates, the generator's lag behind
its schedule and the requests dropped by the cap.

Everything shares the machine's cores: the load generator, the routers and the four stand-ins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import free_port, processes, spawn, tree_cpu_seconds

MODEL = "llama"
ENGINE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
COST_MODEL = "a100-40gb-llama-3.1-8b"
PATH = "/v1/chat/completions"
REPLICAS = 4

_SAMPLE = re.compile(r"^(vllm:[a-z_]+)\{[^}]*\} ([0-9.e+-]+)$", re.M)


@dataclass
class Target:
    name: str
    url: str
    pid: int | None = None
    error: str = ""
    metrics: str = ""  # a modelfleet gateway's /metrics


_AFFINITY = re.compile(
    r'^modelfleet_gateway_affinity_requests_total\{[^}]*result="(\w+)"[^}]*\} (\S+)$', re.M
)
_seen_affinity: dict[str, dict[str, float]] = {}


async def router_hit_ratio(url: str) -> float:
    """The gateway's own view: the share of hashed requests that went where their key went
    last (since the previous call for this gateway)."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        text = await resp.text()
    now: dict[str, float] = {}
    for result, value in _AFFINITY.findall(text):  # summed over the choice label
        now[result] = now.get(result, 0.0) + float(value)
    before = _seen_affinity.get(url, {})
    _seen_affinity[url] = now
    delta = {k: v - before.get(k, 0.0) for k, v in now.items()}
    total = sum(delta.values())
    return delta.get("hit", 0.0) / total if total else float("nan")


@dataclass
class RunResult:
    target: str
    workload: str
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0
    duration_s: float = 0.0
    hit_ratio: float = float("nan")
    per_replica: list[int] = field(default_factory=list)
    hit_per_replica: list[float] = field(default_factory=list)
    cpu_ms_per_req: float = float("nan")
    preemptions: int = 0
    router_hit_ratio: float = float("nan")  # the gateway's affinity "hit" share
    # Open loop only: arrivals in the measured window, those answered within it, those dropped
    # by the cap on outstanding requests, those cancelled unfinished after the grace period,
    # and how late the generator sent each one after its scheduled time.
    offered: int = 0
    completed: int = 0
    dropped: int = 0
    unfinished: int = 0
    lag_s: list[float] = field(default_factory=list)

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] * 1000

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0


def words(rng: random.Random, count: int, tag: str) -> list[str]:
    """`count` words no other prompt in the run shares (the tag keeps runs apart)."""
    return [f"{tag}{rng.randrange(1 << 30):x}" for _ in range(count)]


class User:
    """One client: a system prompt of its own and a conversation that grows."""

    def __init__(self, index: int, args: argparse.Namespace, tag: str, shared: bool) -> None:
        self.index = index
        self.args = args
        self.rng = random.Random(f"{tag}-{index}")
        self.tag = f"{tag}u{index}"
        self.shared = shared
        self.system = " ".join(words(self.rng, args.system_words, self.tag))
        self.messages: list[dict[str, str]] = []
        self.turn = 0

    def next_body(self) -> tuple[dict[str, object], list[str]]:
        args = self.args
        if not self.shared:  # control: a fresh prompt of the same size every time
            text = words(self.rng, args.system_words + args.user_words, self.tag)
            messages = [{"role": "user", "content": " ".join(text)}]
            return self._body(messages), text
        if self.turn >= args.turns:  # the conversation ends; the user starts another
            self.messages, self.turn = [], 0
        message = words(self.rng, args.user_words, self.tag)
        self.messages.append({"role": "user", "content": " ".join(message)})
        self.turn += 1
        messages = [{"role": "system", "content": self.system}, *self.messages]
        return self._body(messages), message

    def answered(self, message: list[str]) -> None:
        """The stand-in echoes the last user message, cut at max_tokens."""
        if self.shared:
            reply = " ".join(message[: self.args.max_tokens])
            self.messages.append({"role": "assistant", "content": reply})

    def _body(self, messages: list[dict[str, str]]) -> dict[str, object]:
        return {
            "model": MODEL,
            "messages": messages,
            "max_tokens": self.args.max_tokens,
            "stream": True,
            "user": f"{self.tag}",
        }


async def one_request(
    http: aiohttp.ClientSession, url: str, body: dict[str, object] | bytes
) -> tuple[float, float] | None:
    """(TTFT, end-to-end) of one streamed request; None when it failed."""
    started = time.perf_counter()
    first: float | None = None
    sent = (
        http.post(url, data=body, headers={"Content-Type": "application/json"})
        if isinstance(body, bytes)
        else http.post(url, json=body)
    )
    try:
        async with sent as resp:
            if resp.status != 200:
                await resp.read()
                return None
            async for _ in resp.content.iter_any():
                if first is None:
                    first = time.perf_counter() - started
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    if first is None:
        return None
    return first, time.perf_counter() - started


async def replica_counters(
    http: aiohttp.ClientSession, replicas: list[str]
) -> list[dict[str, float]]:
    out = []
    for url in replicas:
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
        sums: dict[str, float] = {}
        for name, value in _SAMPLE.findall(text):
            sums[name] = sums.get(name, 0.0) + float(value)
        out.append(sums)
    return out


async def drain(http: aiohttp.ClientSession, replicas: list[str], timeout_s: float = 60) -> None:
    """Until no replica has a request running or waiting."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counters = await replica_counters(http, replicas)
        if all(
            c.get("vllm:num_requests_running", 0) == 0
            and c.get("vllm:num_requests_waiting", 0) == 0
            for c in counters
        ):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the replicas did not drain within 60 s")


def replica_figures(
    result: RunResult, before: list[dict[str, float]], after: list[dict[str, float]]
) -> None:
    """Hit ratios, requests per replica and preemptions from the replicas' own counters."""
    queries = sum(
        a.get("vllm:prefix_cache_queries_total", 0) - b.get("vllm:prefix_cache_queries_total", 0)
        for a, b in zip(after, before, strict=True)
    )
    hits = sum(
        a.get("vllm:prefix_cache_hits_total", 0) - b.get("vllm:prefix_cache_hits_total", 0)
        for a, b in zip(after, before, strict=True)
    )
    result.hit_ratio = hits / queries if queries else float("nan")
    result.per_replica = [
        round(a.get("vllm:request_success_total", 0) - b.get("vllm:request_success_total", 0))
        for a, b in zip(after, before, strict=True)
    ]
    result.hit_per_replica = [
        (a.get("vllm:prefix_cache_hits_total", 0) - b.get("vllm:prefix_cache_hits_total", 0))
        / max(1.0, a.get("vllm:prefix_cache_queries_total", 0)
              - b.get("vllm:prefix_cache_queries_total", 0))
        for a, b in zip(after, before, strict=True)
    ]  # fmt: skip
    result.preemptions = round(
        sum(
            a.get("vllm:num_preemptions_total", 0) - b.get("vllm:num_preemptions_total", 0)
            for a, b in zip(after, before, strict=True)
        )
    )


async def run(
    target: Target,
    workload: str,
    replicas: list[str],
    args: argparse.Namespace,
    tag: str,
) -> RunResult:
    result = RunResult(target.name, workload)
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await drain(http, replicas)
        loop = asyncio.get_running_loop()
        counted: list[list[dict[str, float]]] = []

        async def count_at(when: float) -> None:
            await asyncio.sleep(max(0.0, when - loop.time()))
            counted.append(await replica_counters(http, replicas))

        start = loop.time()
        measure_from = start + args.warmup
        stop_at = measure_from + args.duration
        cpu: dict[str, float] = {}

        def window(edge: str) -> None:
            if target.pid is not None:
                cpu[edge] = tree_cpu_seconds(target.pid)

        loop.call_later(args.warmup, window, "start")
        loop.call_later(args.warmup + args.duration, window, "stop")
        window_requests = 0

        async def client(user: User) -> None:
            nonlocal window_requests
            # Users start spread over the first second, as they would arrive.
            await asyncio.sleep(user.rng.random())
            while loop.time() < stop_at:
                body, message = user.next_body()
                t0 = loop.time()
                timing = await one_request(http, target.url, body)
                t1 = loop.time()
                if timing is None:
                    if t0 >= measure_from:
                        result.errors += 1
                    await asyncio.sleep(0.05)
                    continue
                user.answered(message)
                # A person reads the answer and types the next message.
                await asyncio.sleep(user.rng.uniform(0.5, 1.5) * args.think)
                if t0 >= measure_from and t1 <= stop_at:
                    result.ttft_s.append(timing[0])
                    result.e2e_s.append(timing[1])
                    window_requests += 1
                if measure_from <= t1 <= stop_at:
                    result.output_tokens += min(args.max_tokens, len(message))

        users = [User(i, args, tag, workload == "shared-prefix") for i in range(args.users)]
        # The replicas' own counters over the measured window.
        await asyncio.gather(count_at(measure_from), count_at(stop_at), *(client(u) for u in users))
        result.duration_s = args.duration
        before, after = counted
    replica_figures(result, before, after)
    if target.metrics:
        result.router_hit_ratio = await router_hit_ratio(target.metrics)
    if "start" in cpu and "stop" in cpu and window_requests:
        result.cpu_ms_per_req = (cpu["stop"] - cpu["start"]) * 1000 / window_requests
    return result


def open_schedule(args: argparse.Namespace, tag: str) -> list[tuple[float, bytes]]:
    """The open loop's arrivals: (seconds from the start, request body), fixed by `--seed`.

    Arrivals are a Poisson process at `--rate` over the warm-up and the window; each one is
    the next turn of a user drawn at random from `--users`, so every policy gets the same
    times, users and turns (only the words differ, by `tag`, to keep runs' caches apart). A
    turn's prompt holds the previous answers, which the stand-in's answer (the last user message
    cut at max_tokens) makes known beforehand: a turn arrives on schedule whether or not the
    previous one has been answered, as a request from a new user would.
    """
    rng = random.Random(args.seed)
    users = [User(i, args, tag, shared=True) for i in range(args.users)]
    out: list[tuple[float, bytes]] = []
    at = rng.expovariate(args.rate)
    while at < args.warmup + args.open_duration:
        user = users[rng.randrange(len(users))]
        body, message = user.next_body()
        user.answered(message)
        out.append((at, json.dumps(body).encode()))
        at += rng.expovariate(args.rate)
    return out


async def run_open(
    target: Target, replicas: list[str], args: argparse.Namespace, tag: str
) -> RunResult:
    """The shared-prefix workload as an open loop: requests arrive on a fixed schedule.

    TTFT and end-to-end are counted from each request's scheduled arrival, so a generator that
    falls behind does not hide queueing (its lag is reported). Requests that arrive in the
    measured window are followed until they finish, for at most `--open-grace` seconds after
    the last arrival; then the rest are cancelled (the stand-ins abort them) and counted.
    """
    result = RunResult(target.name, "open")
    schedule = open_schedule(args, tag)
    timeout = aiohttp.ClientTimeout(total=args.warmup + args.open_duration + args.open_grace)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await drain(http, replicas)
        loop = asyncio.get_running_loop()
        counted: list[list[dict[str, float]]] = []

        async def count_at(when: float) -> None:
            await asyncio.sleep(max(0.0, when - loop.time()))
            counted.append(await replica_counters(http, replicas))

        start = loop.time() + 0.1
        measure_from = start + args.warmup
        stop_at = measure_from + args.open_duration
        tokens = min(args.max_tokens, args.user_words)  # the stand-in echoes the message
        outstanding = 0

        async def send(due: float, body: bytes, measured: bool) -> None:
            nonlocal outstanding
            sent = loop.time()
            try:
                timing = await one_request(http, target.url, body)
            finally:
                outstanding -= 1
            done = loop.time()
            if measure_from <= done <= stop_at and timing is not None:
                result.completed += 1
                result.output_tokens += tokens
            if not measured:
                return
            result.lag_s.append(sent - due)
            if timing is None:
                result.errors += 1
                return
            result.ttft_s.append(sent - due + timing[0])
            result.e2e_s.append(done - due)

        async def arrivals() -> None:
            nonlocal outstanding
            for at, body in schedule:
                due = start + at
                await asyncio.sleep(max(0.0, due - loop.time()))
                measured = due >= measure_from
                result.offered += measured
                if outstanding >= args.max_outstanding:
                    result.dropped += measured
                    continue
                outstanding += 1
                tasks.append(asyncio.create_task(send(due, body, measured)))

        tasks: list[asyncio.Task[None]] = []
        await asyncio.gather(count_at(measure_from), count_at(stop_at), arrivals())
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, stop_at + args.open_grace - loop.time()))
        left = [task for task in tasks if not task.done()]
        for task in left:
            task.cancel()
        result.unfinished = len(left)
        await asyncio.gather(*tasks, return_exceptions=True)
        result.duration_s = args.open_duration
        before, after = counted
    replica_figures(result, before, after)
    if target.metrics:
        result.router_hit_ratio = await router_hit_ratio(target.metrics)
    return result


async def wait_ready(url: str, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ready"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"exited with code {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def report(
    results: dict[tuple[str, str], RunResult],
    targets: dict[str, Target],
    logdir: Path,
    args: argparse.Namespace,
) -> int:
    """The table, then the headline figures as the last line."""
    closed = {key: r for key, r in results.items() if key[0] != "open"}
    if closed:
        print()
        print(
            f"{'closed loop':<13} {'policy':<17} {'reqs':>5} {'ttft p50':>9} {'ttft p99':>9} "
            f"{'e2e p50':>8} {'e2e p99':>8} {'tok/s':>7} {'hit':>5} {'router':>6} {'cpu ms':>6} "
            f"{'preempt':>7} {'errors':>6}  per replica"
        )
    for (workload, name), r in closed.items():
        print(
            f"{workload:<13} {name:<17} {len(r.e2e_s):>5} {r.pct(r.ttft_s, 50):>9.1f} "
            f"{r.pct(r.ttft_s, 99):>9.1f} {r.pct(r.e2e_s, 50):>8.1f} {r.pct(r.e2e_s, 99):>8.1f} "
            f"{r.tokens_per_s:>7.0f} {r.hit_ratio:>5.2f} {r.router_hit_ratio:>6.2f} "
            f"{r.cpu_ms_per_req:>6.3f} {r.preemptions:>7} {r.errors:>6}  {r.per_replica}"
        )
    opened = {name: r for (workload, name), r in results.items() if workload == "open"}
    if opened:
        print()
        print(
            f"{'open loop':<17} {'offered/s':>9} {'done/s':>7} {'dropped':>7} {'unfin':>5} "
            f"{'lag p50':>7} {'lag p99':>7} {'reqs':>5} {'ttft p50':>9} {'ttft p99':>9} "
            f"{'e2e p50':>8} {'e2e p99':>8} {'tok/s':>7} {'hit':>5} {'errors':>6}  per replica"
        )
    for name, r in opened.items():
        print(
            f"{name:<17} {r.offered / r.duration_s:>9.1f} {r.completed / r.duration_s:>7.1f} "
            f"{r.dropped:>7} {r.unfinished:>5} {r.pct(r.lag_s, 50):>7.1f} "
            f"{r.pct(r.lag_s, 99):>7.1f} {len(r.e2e_s):>5} {r.pct(r.ttft_s, 50):>9.1f} "
            f"{r.pct(r.ttft_s, 99):>9.1f} "
            f"{r.pct(r.e2e_s, 50):>8.1f} {r.pct(r.e2e_s, 99):>8.1f} {r.tokens_per_s:>7.0f} "
            f"{r.hit_ratio:>5.2f} {r.errors:>6}  {r.per_replica}"
        )
    for target in targets.values():
        if target.error:
            print(f"{target.name}: not measured: {target.error}")
    print(f"logs: {logdir}")

    def ttft(workload: str, name: str) -> float:
        r = results.get((workload, name))
        return r.pct(r.ttft_s, 50) if r else float("nan")

    rr, prefix = ttft("shared-prefix", "round-robin"), ttft("shared-prefix", "prefix")
    router_ttft = ttft("shared-prefix", "vllm-router")
    lo_control, prefix_control = ttft("control", "least-outstanding"), ttft("control", "prefix")
    open_rr, open_prefix = ttft("open", "round-robin"), ttft("open", "prefix")
    open_router = ttft("open", "vllm-router")
    lag = max((r.pct(r.lag_s, 99) for r in opened.values()), default=float("nan"))
    cpu = median([r.cpu_ms_per_req for (w, n), r in results.items() if n != "vllm-router"])
    errors = sum(r.errors for r in results.values())
    print(
        f"shared_ttft_p50_ms_rr={rr:.1f} shared_ttft_p50_ms_prefix={prefix:.1f} "
        f"shared_ttft_p50_ms_vllm_router={router_ttft:.1f} "
        f"prefix_vs_rr={rr / prefix:.1f}x "
        f"control_ttft_p50_ms_lo={lo_control:.1f} control_ttft_p50_ms_prefix={prefix_control:.1f} "
        f"control_prefix_vs_lo={prefix_control / lo_control:.2f} "
        f"gateway_cpu_ms_per_req={cpu:.3f} "
        f"open_rate={args.rate:g}/s open_ttft_p50_ms_rr={open_rr:.1f} "
        f"open_ttft_p50_ms_prefix={open_prefix:.1f} open_ttft_p50_ms_vllm_router={open_router:.1f} "
        f"open_ttft_p50_prefix_vs_rr={open_rr / open_prefix:.1f}x "
        f"open_ttft_p50_prefix_vs_vllm_router={open_router / open_prefix:.1f}x "
        f"open_lag_p99_ms={lag:.1f} errors={errors}"
    )
    return 0 if errors == 0 else 1


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers-venv", default="benchmarks/.peers-venv")
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--system-words", type=int, default=1000, help="tokens of a system prompt")
    parser.add_argument("--user-words", type=int, default=50, help="tokens of a user message")
    parser.add_argument(
        "--think", type=float, default=0.5, help="mean seconds a user waits between requests"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6, help="turns before a conversation ends")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=12.0, help="measured seconds per run")
    parser.add_argument(
        "--workloads",
        default="shared-prefix,control,open",
        help="comma-separated workloads to run: shared-prefix and control (closed loops), open",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=60.0,
        help="open loop: requests per second offered (round-robin serves 33-37 here)",
    )
    parser.add_argument(
        "--open-duration", type=float, default=12.0, help="open loop: measured seconds per run"
    )
    parser.add_argument(
        "--open-grace",
        type=float,
        default=60.0,
        help="open loop: seconds after the last arrival to wait for answers before cancelling",
    )
    parser.add_argument(
        "--max-outstanding",
        type=int,
        default=2000,
        help="open loop: requests in flight at most; arrivals beyond it are dropped and counted",
    )
    parser.add_argument("--seed", type=int, default=1, help="open loop: the arrival schedule's")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument(
        "--policies", default="", help="comma-separated policies to run (default: all)"
    )
    parser.add_argument(
        "--load-factor", type=float, default=0.0, help="bound of the hashed policies (0: default)"
    )
    args = parser.parse_args()
    modelfleet = shutil.which("modelfleet", path=str(Path(sys.executable).parent)) or "modelfleet"
    logdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    peers = Path(args.peers_venv)

    async with processes() as procs:
        ports = [free_port() for _ in range(REPLICAS)]
        replicas = [f"http://127.0.0.1:{p}" for p in ports]
        for i, port in enumerate(ports):
            procs.append(
                await spawn(
                    [modelfleet, "sim-vllm", "--model", ENGINE_MODEL, "--served-model-name",
                     MODEL, "--port", str(port), "--gpu-memory-utilization", "0.6",
                     "--stream-interval", "8"],
                    env={"POD_NAME": f"replica-{i + 1}", "MODELFLEET_SIM_COST_MODEL": COST_MODEL},
                    log=logdir / f"sim-{i + 1}.log",
                )
            )  # fmt: skip
        for url, proc in zip(replicas, procs, strict=True):
            await wait_ready(url + PATH, proc, 30)

        upstreams = f"{MODEL}={','.join(replicas)}"
        gateways = [
            ("round-robin", "RoundRobin", {}),
            ("least-outstanding", "LeastOutstanding", {}),
            ("prefix", "PrefixHash", {}),
            ("prefix+load", "PrefixHash", {"MODELFLEET_GATEWAY_ENGINE_LOAD": "true"}),
            ("session", "SessionAffinity", {}),
        ]
        targets: dict[str, Target] = {}
        for name, policy, env in gateways:
            if args.load_factor:
                env = {**env, "MODELFLEET_GATEWAY_LOAD_FACTOR": str(args.load_factor)}
            port = free_port()
            proc = await spawn(
                [modelfleet, "gateway", "--host", "127.0.0.1", "--port", str(port),
                 "--static-upstreams", upstreams, "--balancing", policy],
                env={**env, "MODELFLEET_GATEWAY_ENGINE_METRICS_INTERVAL_S": "0.25"},
                log=logdir / f"gateway-{name}.log",
            )  # fmt: skip
            procs.append(proc)
            target = targets[name] = Target(
                name,
                f"http://127.0.0.1:{port}{PATH}",
                proc.pid,
                metrics=f"http://127.0.0.1:{port}/metrics"
                if "Hash" in policy or "Session" in policy
                else "",
            )
            await wait_ready(target.url, proc, 30)
        router = Target("vllm-router", "")
        exe = peers / "bin" / "vllm-router"
        if args.skip_peers:
            router.error = "skipped (--skip-peers)"
        elif not exe.exists():
            router.error = f"{exe} not found (make bench-routing installs it into {peers})"
        else:
            port = free_port()
            proc = await spawn(
                [str(exe), "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware",
                 "--log-level", "warning", "--prometheus-port", str(free_port()),
                 "--worker-urls", *replicas],
                log=logdir / "vllm-router.log",
            )  # fmt: skip
            procs.append(proc)
            router.url, router.pid = f"http://127.0.0.1:{port}{PATH}", proc.pid
            try:
                await wait_ready(router.url, proc, 60)
            except RuntimeError as exc:
                router.error = f"vllm-router did not start: {exc}"
        targets["vllm-router"] = router

        plan = [
            ("shared-prefix", ["round-robin", "least-outstanding", "prefix", "prefix+load",
                               "session", "vllm-router"]),
            ("control", ["least-outstanding", "prefix", "prefix+load", "vllm-router"]),
            ("open", ["round-robin", "least-outstanding", "prefix", "prefix+load", "session",
                      "vllm-router"]),
        ]  # fmt: skip
        results: dict[tuple[str, str], RunResult] = {}
        for workload, names in plan:
            for name in names:
                target = targets[name]
                if target.error or (args.policies and name not in args.policies.split(",")):
                    continue
                if workload not in args.workloads.split(","):
                    continue
                tag = f"r{len(results)}"
                if workload == "open":
                    result = await run_open(target, replicas, args, tag)
                else:
                    result = await run(target, workload, replicas, args, tag)
                results[(workload, name)] = result
                print(
                    f"{workload:<13} {name:<17} ttft p50 {result.pct(result.ttft_s, 50):8.1f} ms"
                    f"  p99 {result.pct(result.ttft_s, 99):8.1f} ms  hit {result.hit_ratio:5.2f}"
                    f" ({' '.join(f'{h:.2f}' for h in result.hit_per_replica)})",
                    flush=True,
                )

    return report(results, targets, logdir, args)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # asyncio.run then cancels main(), which stops every process


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    sys.exit(asyncio.run(main()))
