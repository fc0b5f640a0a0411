"""Runs the engine cost model (engine.py) in real time: one loop per stand-in steps the batch,
sleeping as long as each step would take on the GPU, and wakes the requests it served.

Metrics follow every step, under vLLM's names: requests running and waiting, KV-cache usage,
prefix-cache queries and hits, preemptions and time to first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from modelfleet.sim.vllm.engine import CostModel, Engine, Sequence, compute_block_hashes


class Request:
    """One request's view of the engine: wait for tokens, see how many there are."""

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq
        self.event = asyncio.Event()
        self.first_token_at: float | None = None

    @property
    def produced(self) -> int:
        return self.seq.generated

    @property
    def done(self) -> bool:
        return self.seq.finished

    async def wait(self) -> None:
        """Until the engine produced more tokens (or finished) since the last call."""
        await self.event.wait()
        self.event.clear()


class BatchingEngine:
    """The engine and the task that steps it; `on_step` is called after every change."""

    def __init__(self, model: CostModel, on_step: Callable[[Engine], None]) -> None:
        self.engine = Engine(model)
        self.on_step = on_step
        self._requests: dict[Sequence, Request] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, prompt: list[str], output_len: int) -> Request:
        """Queue a request; its prompt's words are its tokens."""
        seq = Sequence(
            prompt_len=len(prompt),
            output_len=max(1, output_len),
            block_hashes=compute_block_hashes(prompt, self.engine.model.block_size),
        )
        request = self._requests[seq] = Request(seq)
        self.engine.add(seq)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")
        self._wake.set()
        self.on_step(self.engine)
        return request

    def release(self, request: Request) -> None:
        """The request is over (answered, or its client left): free what it holds."""
        self._requests.pop(request.seq, None)
        if not request.seq.finished:
            self.engine.abort(request.seq)
            self.on_step(self.engine)

    async def _run(self) -> None:
        engine = self.engine
        loop = asyncio.get_running_loop()
        next_start = loop.time()
        while True:
            plan = engine.plan_step()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                next_start = loop.time()
                continue
            self.on_step(engine)
            # Steps run back to back on the GPU: a late wake-up does not stretch the next one.
            next_start = max(next_start, loop.time() - plan.duration_s) + plan.duration_s
            await asyncio.sleep(max(0.0, next_start - loop.time()))
            stamp = time.perf_counter()
            for seq in engine.finish_step(plan):
                request = self._requests.get(seq)
                if request is not None:
                    if request.first_token_at is None:
                        request.first_token_at = stamp
                    request.event.set()
            self.on_step(engine)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
