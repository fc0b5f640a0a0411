"""The stand-in's engine cost model: continuous batching over a paged KV cache with automatic
prefix caching, as vLLM's V1 scheduler does it, reduced to what routing depends on.

Pure: no I/O and no clock. `Engine.plan_step()` chooses the next batch and says how long the
"GPU" takes for it; the caller waits that long and calls `Engine.finish_step()`, which hands out
the tokens the step produced. The driver in batching.py does the waiting.

Tokens are approximated by whitespace-separated words: one word is one token, in the prompt as
in the output (the output is the prompt echoed back, see shapes.py). A chat prompt is the words
of every message's content in order; no chat template is applied.

What it models, after vLLM V1 (vllm/v1/core/sched/scheduler.py, kv_cache_manager.py):

- requests wait in FCFS order and run in one batch of at most `max_num_seqs`; each step has a
  token budget (`max_num_batched_tokens`): one token per decoding request first, then prompt
  tokens of requests still in prefill (chunked prefill), then newly admitted requests;
- the KV cache is `num_blocks` blocks of `block_size` tokens. A full prompt block is known by a
  hash chained over every token before it, so two prompts share a block only when they share
  the whole prefix up to it. A newly admitted request takes the longest run of cached blocks
  from the start of its prompt (at least its last token is always computed again, as vLLM
  does), and computes only the rest;
- a finished request's blocks stay cached and are evicted least recently used first, the end of
  a prompt before its beginning;
- when a running request needs a block and none is free, the most recently admitted request is
  preempted (its blocks freed, it goes back to the front of the queue and recomputes, finding
  its own blocks still cached if nobody evicted them).

Generated tokens are not put in the prefix cache (vLLM caches full blocks of output too; the
next turn of a conversation then hits a little more there than here).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CostModel:
    """How long a step takes on one GPU/model pair, and how big its batch and cache may be.

    step time = step_base_s + prefill_token_s * prompt tokens computed in the step
                + decode_seq_s * decoding requests + decode_context_token_s * their context
    """

    name: str
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    step_base_s: float
    prefill_token_s: float
    decode_seq_s: float
    decode_context_token_s: float
    source: str = ""

    def with_blocks(self, num_blocks: int) -> CostModel:
        return CostModel(**{**self.__dict__, "num_blocks": num_blocks})


# Llama-3.1-8B-Instruct (BF16) on one NVIDIA A100 40GB, vLLM V1 defaults.
#
# - Decode: a published concurrency sweep of vLLM serving exactly this pair (1,024 prompt and
#   128 output tokens) measured about 75 output tokens/s for one request (13.3 ms a token, 77 %
#   of the memory-bandwidth roofline) and 6.6x the throughput at 8 concurrent requests with
#   almost no latency cost, i.e. ~16 ms a step at batch 8 with ~1,100 tokens of context each:
#   13 ms base + 8 x (0.25 ms + 1,100 x 0.1 us).
# - Prefill: 2 x 8.0e9 FLOPs a token at ~55 % of the A100's 312 TFLOPS (BF16 dense) is about
#   10,700 tokens/s, 0.093 ms a token.
# - KV cache: 32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes = 128 KiB a token, so a
#   16-token block is 2 MiB. vLLM gives the cache what is left of gpu_memory_utilization x 40 GiB
#   after the weights (~15 GiB) and activations (~2.5 GiB): see `blocks_for_utilization`.
# - Batch: max_num_seqs 256 and max_num_batched_tokens 2,048 are vLLM V1's online defaults.
A100_LLAMA_3_1_8B = CostModel(
    name="a100-40gb-llama-3.1-8b",
    block_size=16,
    num_blocks=9472,  # at gpu_memory_utilization 0.9: (36 - 17.5) GiB / 2 MiB
    max_num_seqs=256,
    max_num_batched_tokens=2048,
    step_base_s=0.013,
    prefill_token_s=0.093e-3,
    decode_seq_s=0.25e-3,
    decode_context_token_s=0.1e-6,
    source=(
        "johnmusgrave.com/p/vllm-throughput-latency-sweep-on (vLLM 0.23, A100 40GB, "
        "Llama-3.1-8B-Instruct); NVIDIA A100 datasheet; the model's config.json"
    ),
)

COST_MODELS = {A100_LLAMA_3_1_8B.name: A100_LLAMA_3_1_8B}

_GPU_GIB = 40.0
_WEIGHTS_AND_ACTIVATIONS_GIB = 17.5
_BLOCK_MIB = 2.0


def blocks_for_utilization(utilization: float) -> int:
    """KV blocks vLLM would get on the A100 40GB for `gpu_memory_utilization` (at least 64)."""
    free_gib = utilization * _GPU_GIB - _WEIGHTS_AND_ACTIVATIONS_GIB
    return max(64, int(free_gib * 1024 / _BLOCK_MIB))


def compute_block_hashes(tokens: list[str], block_size: int) -> list[int]:
    """One hash per full block, each chained over the block before it (vLLM's scheme)."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, *tokens[start : start + block_size]))
        hashes.append(parent)
    return hashes


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    prompt_len: int
    output_len: int
    block_hashes: list[int]
    computed: int = 0  # prompt tokens in the KV cache (cached or computed)
    generated: int = 0
    blocks: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prefix-cache hit of the last admission
    admitted: bool = False
    finished: bool = False
    new_tokens: int = 0  # produced by the last step, for the driver
    preemptions: int = 0

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len

    @property
    def context(self) -> int:
        return self.computed + self.generated


class BlockCache:
    """Fixed-size paged KV cache with prefix caching and LRU eviction of unused blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        # Blocks nobody uses, oldest first: never-used ones, then freed ones (maybe cached).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.used = 0

    def lookup(self, hashes: list[int]) -> list[int]:
        """Cached blocks for the longest run of `hashes` from the start."""
        found = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def take(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
            self.used += 1
        self.refs[block] += 1

    def allocate(self) -> int | None:
        """A fresh block (evicting the least recently used cached one), or None when full."""
        if not self.free:
            return None
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            self.block_hash[block] = None
            if self.by_hash.get(old) == block:
                del self.by_hash[old]
        self.refs[block] = 1
        self.used += 1
        return block

    def register(self, block: int, block_hash: int) -> None:
        if block_hash not in self.by_hash:
            self.by_hash[block_hash] = block
            self.block_hash[block] = block_hash

    def release(self, blocks: list[int]) -> None:
        """Give blocks back; the last block of a sequence becomes the first to be evicted."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                self.used -= 1

    @property
    def usage(self) -> float:
        return self.used / self.num_blocks if self.num_blocks else 0.0


@dataclass
class StepPlan:
    """One step: who takes part, how many prompt tokens each computes, and how long it takes."""

    duration_s: float
    prefill: list[tuple[Sequence, int]]
    decode: list[Sequence]


@dataclass
class EngineCounters:
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, found cached
    preemptions: int = 0
    prompt_tokens_computed: int = 0


class Engine:
    """The scheduler: a waiting queue, a running batch and the KV cache."""

    def __init__(self, model: CostModel) -> None:
        self.model = model
        self.cache = BlockCache(model.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.counters = EngineCounters()

    def blocks_needed(self, tokens: int) -> int:
        return math.ceil(tokens / self.model.block_size)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """The client went away: free whatever the request holds."""
        if seq.finished:
            return
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release(seq.blocks)
            seq.blocks = []
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def _admit(self, seq: Sequence) -> bool:
        """Take cached prefix blocks and fresh blocks for the rest of the prompt; False (and
        nothing taken) when the cache cannot hold the prompt now."""
        cache = self.cache
        bs = self.model.block_size
        # Always compute the last prompt token (its logits give the first output token).
        hits = cache.lookup(seq.block_hashes[: (seq.prompt_len - 1) // bs])
        total = self.blocks_needed(seq.prompt_len + 1)
        fresh = total - len(hits)
        reclaim = sum(1 for b in hits if cache.refs[b] == 0)  # cached but free: counted free
        if fresh > len(cache.free) - reclaim:
            return False
        for block in hits:
            cache.take(block)
        seq.blocks = list(hits)
        for _ in range(fresh):
            new = cache.allocate()
            assert new is not None
            seq.blocks.append(new)
        seq.computed = seq.cached_tokens = len(hits) * bs
        seq.admitted = True
        self.counters.prefix_queries += seq.prompt_len
        self.counters.prefix_hits += seq.cached_tokens
        return True

    def _preempt_newest(self) -> Sequence:
        """Free the most recently admitted running request and queue it again at the front."""
        victim = self.running.pop()
        self.cache.release(victim.blocks)
        victim.blocks = []
        victim.computed = victim.generated = 0
        victim.admitted = False
        victim.preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def plan_step(self) -> StepPlan | None:
        """The next batch, or None when there is nothing to do."""
        m = self.model
        budget = m.max_num_batched_tokens
        decode: list[Sequence] = []
        prefill: list[tuple[Sequence, int]] = []
        preempted = False
        # Running requests first: a decode token each, or the next chunk of their prompt.
        for seq in list(self.running):
            if seq not in self.running:  # preempted below for an earlier one
                continue
            if seq.prefilling:
                if budget <= 0:
                    continue
                chunk = min(seq.prompt_len - seq.computed, budget)
                prefill.append((seq, chunk))
                budget -= chunk
                continue
            if budget <= 0:
                continue
            # A decoding request needs room for one more token: preempt the newest request
            # (perhaps this one) until there is.
            while self.blocks_needed(seq.context + 1) > len(seq.blocks):
                block = self.cache.allocate()
                if block is not None:
                    seq.blocks.append(block)
                    continue
                preempted = True
                if self._preempt_newest() is seq:
                    break
            if seq not in self.running:
                continue
            decode.append(seq)
            budget -= 1
        prefill = [(s, c) for s, c in prefill if s in self.running]
        decode = [s for s in decode if s in self.running]
        # Then new requests, first come first served, while the batch and cache have room
        # (none in a step that had to preempt, as in vLLM).
        while not preempted and self.waiting and budget > 0 and len(self.running) < m.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            chunk = min(seq.prompt_len - seq.computed, budget)
            prefill.append((seq, chunk))
            budget -= chunk
        if not prefill and not decode:
            return None
        prompt_tokens = sum(c for _, c in prefill)
        context = sum(s.context for s in decode)
        duration = (
            m.step_base_s
            + m.prefill_token_s * prompt_tokens
            + m.decode_seq_s * len(decode)
            + m.decode_context_token_s * context
        )
        return StepPlan(duration, prefill, decode)

    def finish_step(self, plan: StepPlan) -> list[Sequence]:
        """Apply a step's work; return the requests that got a token (finished ones included)."""
        produced: list[Sequence] = []
        bs = self.model.block_size
        for seq, chunk in plan.prefill:
            if seq.finished or seq not in self.running:
                continue
            before = seq.computed
            seq.computed += chunk
            self.counters.prompt_tokens_computed += chunk
            for index in range(before // bs, seq.computed // bs):
                if index < len(seq.block_hashes):
                    self.cache.register(seq.blocks[index], seq.block_hashes[index])
            if not seq.prefilling:  # the step that ends the prompt samples the first token
                seq.generated += 1
                seq.new_tokens = 1
                produced.append(seq)
        for seq in plan.decode:
            if seq.finished or seq not in self.running:
                continue
            seq.generated += 1
            seq.new_tokens = 1
            produced.append(seq)
        for seq in produced:
            if seq.generated >= seq.output_len:
                seq.finished = True
                self.running.remove(seq)
                self.cache.release(seq.blocks)
                seq.blocks = []
        return produced
