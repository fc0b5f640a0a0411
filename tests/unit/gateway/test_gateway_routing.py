"""LLM-aware routing, pure: the ring, bounded load, routing keys, load scores, engine metrics."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections import Counter

import pytest
from gwharness import md_obj, pod_obj

from modelfleet.api.v1alpha1 import Balancing
from modelfleet.enginemetrics import EngineMetricsError, parse_engine_load
from modelfleet.gateway.balancer import Replica, Route, build_route, pick_replica
from modelfleet.gateway.engineload import scrape_replica
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.proxy import compute_routing_key
from modelfleet.gateway.registry import Registry
from modelfleet.gateway.routing import (
    KEY_FACTOR,
    REUSE_THRESHOLD,
    KeyMemory,
    KeyView,
    Ring,
    RoutingConfig,
    choose_bounded,
    choose_least,
    compute_load,
    extract_prefix,
    extract_session,
    hash_key,
)
from modelfleet.gateway.upstream import UpstreamClient
from modelfleet.sim.vllm.config import SimConfig
from modelfleet.sim.vllm.engine import A100_LLAMA_3_1_8B
from modelfleet.sim.vllm.server import start_sim


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


KEYS = [hash_key(f"conversation-{i}".encode()) for i in range(20_000)]


def owners(ring: Ring) -> list[str]:
    return [ring.names[ring.owner(k)] for k in KEYS]  # type: ignore[index]


# ---- the ring ----------------------------------------------------------------------------------


def test_a_joining_replica_takes_only_its_share() -> None:
    names = [f"llama-instance-{i}" for i in range(1, 5)]
    before = owners(Ring(names))
    after = owners(Ring([*names, "llama-instance-5"]))
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert all(b == "llama-instance-5" for _, b in moved)  # nothing moves between old ones
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # about 1/5


def test_a_leaving_replica_gives_away_only_its_own_keys() -> None:
    names = [f"llama-instance-{i}" for i in range(1, 6)]
    before = owners(Ring(names))
    after = owners(Ring([n for n in names if n != "llama-instance-3"]))
    for a, b in zip(before, after, strict=True):
        if a != "llama-instance-3":
            assert a == b
    assert "llama-instance-3" not in after


def test_the_ring_spreads_keys_evenly_and_does_not_depend_on_order() -> None:
    names = [f"m-instance-{i}" for i in range(1, 5)]
    counts = Counter(owners(Ring(names)))
    assert max(counts.values()) / min(counts.values()) < 1.35
    # Another gateway that lists the Pods in another order makes the same choices.
    assert owners(Ring(list(reversed(names)))) == owners(Ring(names))


def test_walk_visits_every_replica_once_starting_at_the_owner() -> None:
    ring = Ring(["a", "b", "c"])
    for key in KEYS[:200]:
        order = list(ring.walk(key))
        assert sorted(order) == [0, 1, 2]
        assert order[0] == ring.owner(key)


# ---- bounded load ------------------------------------------------------------------------------


def test_bounded_load_keeps_every_replica_within_the_factor() -> None:
    ring = Ring([f"r{i}" for i in range(4)])
    loads = [0.0] * 4
    hot = KEYS[0]  # every request shares one prefix: the worst case
    for _ in range(200):
        index = choose_bounded(ring, hot, loads, [True] * 4, 1.25)
        assert index is not None
        loads[index] += 1
        total = sum(loads)
        assert max(loads) <= max(1, -(-1.25 * total // 4)) + 1
    assert min(loads) > 0  # the hot key spilled over to all of them


def test_a_hot_key_spills_to_the_next_replica_on_the_ring() -> None:
    ring = Ring([f"r{i}" for i in range(4)])
    key = KEYS[1]
    first, second = list(ring.walk(key))[:2]
    loads = [0.0] * 4
    loads[first] = 10.0
    assert choose_bounded(ring, key, loads, [True] * 4, 1.25) == second
    loads[first] = 0.0
    assert choose_bounded(ring, key, loads, [True] * 4, 1.25) == first
    assert choose_bounded(ring, key, loads, [i != first for i in range(4)], 1.25) == second
    assert choose_bounded(ring, key, loads, [False] * 4, 1.25) is None


def test_a_new_key_takes_the_least_loaded_and_its_owner_among_equals() -> None:
    ring = Ring([f"r{i}" for i in range(4)])
    key = KEYS[3]
    owner, second, third, _ = ring.walk(key)
    loads = [2.0] * 4
    assert choose_least(ring, key, loads, [True] * 4) == owner  # ties: the owner first
    loads[owner] = 3.0
    assert choose_least(ring, key, loads, [True] * 4) == second  # then ring order
    loads[third] = 0.0
    assert choose_least(ring, key, loads, [True] * 4) == third  # one strictly least
    assert choose_least(ring, key, loads, [i != third for i in range(4)]) == second
    assert choose_least(ring, key, loads, [False] * 4) is None


def test_a_new_key_spreads_prompts_nobody_shares_as_evenly_as_least_outstanding() -> None:
    ring = Ring([f"r{i}" for i in range(4)])
    loads = [0.0] * 4
    rng = random.Random(3)
    for key in KEYS[:2000]:
        loads[choose_least(ring, key, loads, [True] * 4)] += 1  # type: ignore[index]
        if rng.random() < 0.5:  # requests end at random
            busy = [i for i in range(4) if loads[i] > 0]
            loads[rng.choice(busy)] -= 1
        assert max(loads) - min(loads) <= 2  # hashing within a 1.5 bound allows far more


def test_the_key_bound_spreads_reused_keys_across_replicas() -> None:
    ring = Ring([f"r{i}" for i in range(4)])
    held = [0] * 4
    for key in KEYS[:128]:  # 128 conversations: hashing alone gives some replica ~40
        index = choose_bounded(ring, key, [0.0] * 4, [True] * 4, 1.5, held, None)
        assert index is not None
        held[index] += 1
    assert max(held) <= -(-KEY_FACTOR * 128 // 4) + 1
    plain = Counter(ring.owner(k) for k in KEYS[:128])
    assert max(plain.values()) > max(held)  # the ring alone was less even for these keys


def test_a_key_stays_where_it_went_within_both_bounds() -> None:
    ring = Ring([f"r{i}" for i in range(4)])
    key = KEYS[4]
    owner, second, third, _ = ring.walk(key)
    held = [10] * 4
    every = [True] * 4
    # Counted on the second replica (its owner was full once): it stays there, no cold start.
    assert choose_bounded(ring, key, [0.0] * 4, every, 1.5, held, second, True) == second
    # Seen once there (not counted yet): it stays too, as one more key for that replica.
    assert choose_bounded(ring, key, [0.0] * 4, every, 1.5, held, second, False) == second
    loads = [0.0] * 4
    loads[second] = 20.0  # beyond the load bound: back to the ring, the owner first
    assert choose_bounded(ring, key, loads, every, 1.5, held, second, True) == owner
    held[owner] = 30  # and the owner beyond the key bound: the next one on the ring
    assert choose_bounded(ring, key, loads, every, 1.5, held, None) == third
    # Every replica beyond the key bound: the load bound alone decides.
    assert choose_bounded(ring, key, loads, every, 1.5, [30] * 4, None) == owner


def hashed_route(policy: Balancing, n: int = 4, **config: object) -> Route:
    triples = [(f"m-instance-{i}", f"127.0.0.1:{9000 + i}", "default") for i in range(n)]
    return build_route("m", triples, RoutingConfig(policy, **config), None, 1.5)  # type: ignore[arg-type]


def test_prefix_hash_sticks_until_the_bound_and_skips_ejected_replicas() -> None:
    route = hashed_route(Balancing.PREFIX_HASH)
    key = KEYS[2]
    home = pick_replica(route, 0.0, (), key)
    assert home is not None
    assert all(pick_replica(route, 0.0, (), key) is home for _ in range(10))
    home.outstanding = 5  # far above the others
    other = pick_replica(route, 0.0, (), key)
    assert other is not None
    assert other is not home
    home.outstanding = 0
    home.ejected_until = 10.0
    assert pick_replica(route, 1.0, (), key) is other  # the next on the ring, not any
    assert pick_replica(route, 11.0, (), key) is home
    assert pick_replica(route, 11.0, (home,), key) is other  # a retry goes elsewhere


def test_prefix_hash_sends_new_keys_of_a_model_without_reuse_to_the_least_loaded() -> None:
    route = hashed_route(Balancing.PREFIX_HASH)
    key = KEYS[5]
    home = pick_replica(route, 0.0, (), key, KeyView())
    assert home is not None
    for replica in route.replicas:
        replica.outstanding = 1
    home.outstanding = 2  # within the bound, but busier than the others
    assert pick_replica(route, 0.0, (), key, KeyView()) is home  # a known key stays
    least = pick_replica(route, 0.0, (), key, KeyView(least_loaded=True))
    assert least is not None
    assert least is not home
    home.outstanding = 1
    assert pick_replica(route, 0.0, (), key, KeyView(least_loaded=True)) is home


def test_new_keys_go_by_in_flight_counts_even_with_engine_load() -> None:
    route = hashed_route(Balancing.PREFIX_HASH, engine_load=True)
    key = KEYS[6]
    home = pick_replica(route, 10.0, (), key)
    assert home is not None
    for replica in route.replicas:
        replica.outstanding = 1
    home.outstanding = 0
    home.engine_waiting, home.engine_at = 5.0, 10.0  # a scrape says its engine is queueing
    # A new prompt: this gateway's own in-flight count decides, as least-outstanding would.
    assert pick_replica(route, 10.5, (), key, KeyView(least_loaded=True)) is home
    # A known key: the engine's queue counts, and puts the owner beyond the bound.
    assert pick_replica(route, 10.5, (), key, KeyView()) is not home


def test_the_ring_survives_a_rebuild_and_replicas_keep_their_state() -> None:
    route = hashed_route(Balancing.SESSION_AFFINITY)
    route.replicas[0].outstanding = 3
    triples = [(r.name, r.address, r.namespace) for r in route.replicas]
    again = build_route("m", triples, route.config, route, 1.5)
    assert again.ring is route.ring
    assert again.replicas[0].outstanding == 3
    fewer = build_route("m", triples[1:], route.config, again, 1.5)
    assert fewer.ring is not None
    assert fewer.ring.names == tuple(t[0] for t in triples[1:])


# ---- keys --------------------------------------------------------------------------------------


def test_chat_and_completions_prefixes_are_normalized_alike() -> None:
    chat = {"messages": [{"role": "user", "content": "Hello,\n  world   again"}]}
    completion = {"prompt": " Hello, world\tagain "}
    assert extract_prefix(chat, 256) == extract_prefix(completion, 256) == "Hello, world again"


def test_the_prefix_is_the_conversation_start_cut_at_its_length() -> None:
    system = "You answer questions about ACME orders. " * 20
    turn1 = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
    turn2 = {
        "messages": [
            *turn1["messages"],
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"},
        ]
    }
    assert extract_prefix(turn1, 100) == extract_prefix(turn2, 100)
    assert len(extract_prefix(turn1, 100) or "") == 100
    short = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}]
    }
    assert extract_prefix(short, 100) == "Be brief. a"


def test_prefix_of_content_parts_token_ids_and_bodies_without_prompt() -> None:
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                    {"type": "text", "text": "this"},
                ],
            }
        ]
    }
    assert extract_prefix(parts, 64) == "describe this"
    assert extract_prefix({"prompt": [[1, 2, 3]]}, 64) == "1 2 3"
    assert extract_prefix({"prompt": ["first", "second"]}, 64) == "first"
    assert extract_prefix({"input": "embed me"}, 64) is None
    assert extract_prefix({"prompt": "   "}, 64) is None


def test_session_from_the_header_else_the_user_field() -> None:
    assert extract_session("abc", {"user": "u1"}) == "abc"
    assert extract_session(None, {"user": "u1"}) == "u1"
    assert extract_session(None, {"user": 7}) is None
    assert extract_session(None, None) is None


def test_routing_keys_from_request_bodies() -> None:
    prefix = RoutingConfig(Balancing.PREFIX_HASH, prefix_chars=32)
    body = b'{"model":"m","messages":[{"role":"user","content":"same start, then A"}]}'
    other = b'{"model":"m","messages":[{"role":"user","content":"same start, then B"}]}'
    assert compute_routing_key(prefix, body, None) is not None
    assert compute_routing_key(prefix, body, None) != compute_routing_key(prefix, other, None)
    short = RoutingConfig(Balancing.PREFIX_HASH, prefix_chars=16)
    assert compute_routing_key(short, body, None) == compute_routing_key(short, other, None)
    session = RoutingConfig(Balancing.SESSION_AFFINITY)
    with_user = b'{"model":"m","prompt":"x","user":"alice"}'
    assert compute_routing_key(session, with_user, None) == compute_routing_key(
        session, b"not json at all", "alice"
    )
    assert compute_routing_key(session, b'{"model":"m","prompt":"x"}', None) is None
    assert compute_routing_key(RoutingConfig(Balancing.ROUND_ROBIN), body, None) is None


def test_key_memory_tells_hits_moves_and_new_keys_per_model() -> None:
    memory = KeyMemory(limit=2)
    assert memory.record("m", 1, "a") == "new"
    assert memory.record("m", 1, "a") == "hit"
    assert memory.record("m", 1, "b") == "moved"
    assert memory.record("other", 1, "b") == "new"  # the same prompt to another model
    memory.record("m", 3, "a")  # forgets key 1, the least recently seen
    assert memory.record("m", 1, "b") == "new"


def test_key_memory_counts_reused_keys_per_replica_and_forgets_them() -> None:
    memory = KeyMemory(limit=3)
    memory.record("m", 1, "a")  # seen once: cached somewhere, counted nowhere yet
    assert memory.held == {}
    memory.record("m", 1, "a")
    memory.record("m", 2, "b")
    memory.record("m", 2, "b")
    assert memory.held["m"] == {"a": 1, "b": 1}
    memory.record("m", 2, "a")  # moved: counted where it went
    assert memory.held["m"] == {"a": 2}
    assert memory.view("m", 2, ("a", "b")) == KeyView(held=[2, 0], last=0, counted=True)
    assert memory.view("m", 2, ("b", "c")) == KeyView(held=[0, 0], counted=True)  # a left
    memory.record("m", 5, "b")
    assert memory.view("m", 5, ("a", "b")) == KeyView(held=[2, 0], last=1)  # seen once
    memory.record("m", 3, "c")  # key 1 forgotten, and its count with it
    assert memory.held["m"] == {"a": 1}


def test_new_keys_go_by_the_ring_until_a_models_keys_stop_coming_back() -> None:
    memory = KeyMemory()
    names = ("a", "b")
    assert not memory.view("m", 0, names).least_loaded  # nothing known: assume reuse
    for key in range(1, 200):  # every prompt fresh, as on the control workload
        memory.record("m", key, "a")
    assert memory.reuse["m"] < REUSE_THRESHOLD
    assert memory.view("m", 1000, names) == KeyView(least_loaded=True)
    assert not memory.view("m", 199, names).least_loaded  # a key seen before: the ring
    for _ in range(200):  # the same few conversations again and again
        memory.record("m", 7, "a")
    assert memory.reuse["m"] > REUSE_THRESHOLD
    assert not memory.view("m", 1001, names).least_loaded
    assert not memory.view("other", 1000, names).least_loaded  # per model


# ---- load scores -------------------------------------------------------------------------------


def test_load_combines_in_flight_with_the_engine_queue() -> None:
    assert compute_load(3, None) == 3
    assert compute_load(3, (2.0, 0.0)) == 3  # the engine sees no more than we sent
    assert compute_load(1, (6.0, 2.0)) == 10  # others' requests, and a queue: saturated


def test_stale_engine_figures_are_ignored() -> None:
    replica = Replica("r", "127.0.0.1:1")
    replica.outstanding = 1
    replica.engine_running, replica.engine_waiting, replica.engine_at = 8.0, 4.0, 100.0
    assert replica.load(now=101.0, fresh_s=1.5) == 16
    assert replica.load(now=102.0, fresh_s=1.5) == 1


def test_load_aware_picks_the_shortest_engine_queue() -> None:
    route = hashed_route(Balancing.LOAD_AWARE, n=3)
    for replica, waiting in zip(route.replicas, (5.0, 0.0, 2.0), strict=True):
        replica.engine_running, replica.engine_waiting, replica.engine_at = 4.0, waiting, 10.0
    assert pick_replica(route, 10.5).name == "m-instance-1"  # type: ignore[union-attr]
    # Figures gone stale: in-flight alone decides, ties round-robin.
    picked = {pick_replica(route, 20.0).name for _ in range(3)}  # type: ignore[union-attr]
    assert picked == {"m-instance-0", "m-instance-1", "m-instance-2"}


def test_hashed_policy_without_a_key_takes_the_least_loaded() -> None:
    route = hashed_route(Balancing.PREFIX_HASH, n=3)
    route.replicas[0].outstanding = 2
    route.replicas[1].outstanding = 1
    assert pick_replica(route, 0.0).name == "m-instance-2"  # type: ignore[union-attr]


# ---- spec.routing ------------------------------------------------------------------------------


def test_spec_routing_overrides_the_gateway_defaults_field_by_field() -> None:
    registry = Registry(
        Balancing.ROUND_ROBIN, RoutingConfig(Balancing.ROUND_ROBIN, 256, 1.25, False)
    )
    tuned = md_obj("llama")
    tuned["spec"]["routing"] = {"policy": "PrefixHash", "prefixChars": 2000, "engineLoad": True}
    annotated = md_obj("gemma", balancing="LeastOutstanding")
    annotated["spec"]["routing"] = {"loadFactor": 2.0}
    registry.replace_deployments([tuned, annotated, md_obj("plain")])
    registry.replace_pods([pod_obj("llama-instance-1", "llama", 9001)])
    assert registry.routing("llama") == RoutingConfig(Balancing.PREFIX_HASH, 2000, 1.25, True)
    assert registry.routing("gemma") == RoutingConfig(Balancing.LEAST_OUTSTANDING, 256, 2.0, False)
    assert registry.routing("plain") == RoutingConfig(Balancing.ROUND_ROBIN, 256, 1.25, False)
    route = registry.routes["llama"]
    assert route.ring is not None
    assert route.config.uses_engine_load


# ---- engine metrics ----------------------------------------------------------------------------

VLLM_TEXT = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 5.0
vllm:num_requests_running{engine="1",model_name="llama"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 750.0
"""


def test_engine_load_from_vllm_metrics_sums_engines_and_skips_lookalikes() -> None:
    load = parse_engine_load(VLLM_TEXT)
    assert load.running == 8
    assert load.waiting == 2  # not the _by_reason series
    assert load.kv_cache_usage == 0.25
    assert (load.prefix_queries, load.prefix_hits) == (1000, 750)


def test_engine_load_from_an_older_vllm_and_from_no_vllm() -> None:
    older = (
        b"vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.5\n"
    )
    load = parse_engine_load(older)
    assert (load.running, load.waiting, load.kv_cache_usage) == (1, 0, 0.5)
    assert load.prefix_hits is None
    with pytest.raises(EngineMetricsError, match="vllm:num_requests_running"):
        parse_engine_load(b"# nothing here\nup 1\n")


def test_engine_load_parser_never_raises_anything_else_on_noise() -> None:
    rng = random.Random(7)
    alphabet = b'vlm:_num{}"= .\n0123456789#eE+-naNinf'
    for _ in range(500):
        noise = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        with contextlib.suppress(EngineMetricsError):
            parse_engine_load(VLLM_TEXT[: rng.randint(0, len(VLLM_TEXT))] + noise)


def test_per_replica_figures_and_affinity_results_are_metrics() -> None:
    route = hashed_route(Balancing.PREFIX_HASH, n=2, engine_load=True)
    first, second = route.replicas
    first.requests, first.outstanding, first.completion_tokens = 7, 2, 40
    second.engine_waiting, second.engine_kv_cache, second.engine_at = 3.0, 0.5, time.monotonic()
    metrics = GatewayMetrics()
    metrics.watch_replicas(lambda: {"m": route}, 1.5)
    metrics.observe_affinity("m", "hit", "owner")
    metrics.observe_affinity("m", "hit", "owner")
    metrics.observe_affinity("m", "new", "least")

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    names = {"model": "m", "replica": "m-instance-0"}
    assert value("modelfleet_gateway_replica_requests_total", **names) == 7
    assert value("modelfleet_gateway_replica_in_flight", **names) == 2
    assert value("modelfleet_gateway_replica_tokens_total", **names, kind="completion") == 40
    assert value("modelfleet_gateway_replica_engine_waiting", **names) is None  # never scraped
    other = {"model": "m", "replica": "m-instance-1"}
    assert value("modelfleet_gateway_replica_engine_waiting", **other) == 3
    assert value("modelfleet_gateway_replica_engine_kv_cache_usage", **other) == 0.5
    hits = {"model": "m", "result": "hit", "choice": "owner"}
    assert value("modelfleet_gateway_affinity_requests_total", **hits) == 2
    least = {"model": "m", "result": "new", "choice": "least"}
    assert value("modelfleet_gateway_affinity_requests_total", **least) == 1
    route.replicas = [second]  # the replica left: its series go with it
    assert value("modelfleet_gateway_replica_requests_total", **names) is None


async def test_the_scraper_reads_a_stand_ins_engine_queue_and_ignores_other_servers() -> None:
    config = SimConfig(
        model="m", served_names=("m",), instance="sim", port=0, cost_model=A100_LLAMA_3_1_8B.name
    )
    sim = await start_sim(config)
    client = UpstreamClient(connect_timeout_s=1, read_timeout_s=1)
    assert sim.state.engine is not None
    jobs = [sim.state.engine.submit([f"w{i}" for i in range(500)], 50) for _ in range(3)]
    try:
        replica = Replica("sim", f"127.0.0.1:{config.port}")
        assert await scrape_replica(client, replica, 1.0)
        assert replica.engine_running + replica.engine_waiting == 3
        assert 0 < replica.engine_kv_cache < 1
        assert time.monotonic() - replica.engine_at < 1
        # Something that is not a vLLM server: the figures stay as they were, and age.
        other = Replica("other", f"127.0.0.1:{config.port}")
        other.address = f"127.0.0.1:{free_port()}"
        assert not await scrape_replica(client, other, 0.5)
        assert other.engine_at < 0
    finally:
        for job in jobs:
            sim.state.engine.release(job)
        await client.close()
        await sim.stop()
