"""The requests a gateway replica holds, published per replica for the autoscaler: written at
once for the first request of a burst, rate-limited while the count changes, refreshed while it
stays, removed when nothing is held; several replicas never overwrite each other."""

from __future__ import annotations

from datetime import UTC, datetime

from gwharness import RecordingWriter, md_obj

from modelfleet.api import labels
from modelfleet.api.held import HELD_PREFIX, format_held, held_key, parse_held, sum_held
from modelfleet.gateway.metrics import GatewayMetrics
from modelfleet.gateway.registry import Registry
from modelfleet.gateway.usage import HELD_INTERVAL_S, HELD_REFRESH_S, UsageRecorder


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _recorder(
    registry: Registry, writer: RecordingWriter, clock: FakeClock, who: str
) -> UsageRecorder:
    return UsageRecorder(
        registry, writer, GatewayMetrics(), interval_s=30, clock=clock, identity=who
    )


async def test_the_held_count_follows_the_queue_within_bounded_writes() -> None:
    registry = Registry()
    registry.replace_deployments([md_obj("chat")])
    writer, clock = RecordingWriter(), FakeClock()
    usage = _recorder(registry, writer, clock, "mf-gateway-7d9f-abcde")
    key = usage.held_key
    assert key == HELD_PREFIX + "mf-gateway-7d9f-abcde"

    # The first request of a burst: demand-time and the count in one patch, at once.
    usage.demand("chat")
    assert registry.hold("chat", 100)
    await usage.flush()
    [(namespace, name, values)] = writer.writes
    assert (namespace, name) == ("default", "chat")
    assert values[labels.ANN_DEMAND]
    assert values[key] == format_held(1, clock.now)

    # More requests within HELD_INTERVAL_S: not yet; after it: the new count.
    for _ in range(4):
        assert registry.hold("chat", 100)
    clock.now += HELD_INTERVAL_S / 2
    await usage.flush()
    assert len(writer.writes) == 1
    clock.now += HELD_INTERVAL_S
    await usage.flush()
    assert writer.writes[-1][2] == {key: format_held(5, clock.now)}

    # A count that stays is refreshed, not rewritten every tick.
    clock.now += 1
    await usage.flush()
    assert len(writer.writes) == 2
    clock.now += HELD_REFRESH_S
    await usage.flush()
    assert writer.writes[-1][2] == {key: format_held(5, clock.now)}

    # Nothing held any more: the annotation goes, once.
    for _ in range(5):
        registry.release("chat")
    clock.now += HELD_INTERVAL_S
    await usage.flush()
    assert writer.writes[-1][2] == {key: None}
    count = len(writer.writes)
    clock.now += HELD_REFRESH_S * 3
    await usage.flush()
    assert len(writer.writes) == count


async def test_two_gateway_replicas_publish_side_by_side() -> None:
    writer, clock = RecordingWriter(), FakeClock()
    annotations: dict[str, str] = {}
    for who, held in (("gw-a", 3), ("gw-b", 4)):
        registry = Registry()
        registry.replace_deployments([md_obj("chat")])
        for _ in range(held):
            assert registry.hold("chat", 100)
        await _recorder(registry, writer, clock, who).flush()
    for _, _, values in writer.writes:
        annotations.update({k: v for k, v in values.items() if v is not None})
    assert {held_key("gw-a"), held_key("gw-b")} <= annotations.keys()
    now = datetime.fromtimestamp(clock.now, UTC)
    assert sum_held(annotations, now, 30.0) == 7


def test_held_keys_are_valid_annotation_names() -> None:
    assert held_key("Gateway_Pod.1") == "held.modelfleet.io/gateway_pod.1"
    long = held_key("g" * 100)
    name = long.removeprefix(HELD_PREFIX)
    assert len(name) <= 63
    assert name[0].isalnum()
    assert name[-1].isalnum()
    assert held_key("g" * 100) == long != held_key("g" * 101)
    assert parse_held("3 2026-01-02T03:04:05.000Z") == (
        3,
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    for bad in (
        "",
        "3",
        "x 2026-01-02T03:04:05Z",
        "3 yesterday",
        "-1 2026-01-02T03:04:05Z",
        "\u00b2 2026-01-02T03:04:05Z",  # a digit to str.isdigit, not to int()
    ):
        assert parse_held(bad) is None


async def test_a_stopping_gateway_removes_its_count_at_once() -> None:
    registry = Registry()
    registry.replace_deployments([md_obj("chat")])
    writer, clock = RecordingWriter(), FakeClock()
    usage = _recorder(registry, writer, clock, "gw-a")
    assert registry.hold("chat", 100)
    await usage.flush()
    assert writer.writes[-1][2] == {usage.held_key: format_held(1, clock.now)}
    # Its held request ends as it stops, well within HELD_INTERVAL_S of the last write.
    registry.release("chat")
    clock.now += HELD_INTERVAL_S / 4
    await usage.flush(final=True)
    assert writer.writes[-1][2] == {usage.held_key: None}
