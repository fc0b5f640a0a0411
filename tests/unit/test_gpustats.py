"""GpuReport's own checks: every GPU ID is `<node>:<index>`, indexes are unique and in range,
the node is a Kubernetes node name, and every number is finite and adds up."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from modelfleet.api.gpustats import GpuReport


def gpu(index: int, gpu_id: str) -> dict[str, Any]:
    return {
        "index": index,
        "gpuId": gpu_id,
        "uuid": f"GPU-{index}",
        "product": "NVIDIA-H100-80GB-HBM3",
        "memoryTotalMib": 81559,
        "memoryUsedMib": 0,
        "memoryFreeMib": 81559,
    }


def report(node: str, *gpus: dict[str, Any]) -> dict[str, Any]:
    return {
        "node": node,
        "backend": "simulated",
        "sampledAt": "2025-01-01T00:00:00Z",
        "pollIntervalS": 5,
        "gpus": list(gpus),
    }


def test_consistent_report_parses() -> None:
    parsed = GpuReport.model_validate(report("node-a", gpu(0, "node-a:0"), gpu(1, "node-a:1")))
    assert [g.gpu_id for g in parsed.gpus] == ["node-a:0", "node-a:1"]
    assert GpuReport.model_validate(report("node-a")).gpus == []


def with_memory(total: int, used: int, free: int, **extra: Any) -> dict[str, Any]:
    return {
        **gpu(0, "node-a:0"),
        "memoryTotalMib": total,
        "memoryUsedMib": used,
        "memoryFreeMib": free,
        **extra,
    }


def test_what_the_agent_reports_for_a_lost_or_unread_gpu_parses() -> None:
    """All memory used on a lost GPU; 0 MiB on a GPU never read (stale or unhealthy)."""
    full = with_memory(81559, 81559, 0, health={"healthy": False, "reason": "XID 79"})
    never_read = with_memory(0, 0, 0, stale=True, staleReason="NVML could not read the GPU")
    lost_unread = with_memory(0, 0, 0, health={"healthy": False, "reason": "gone"})
    for doc in (full, never_read, lost_unread):
        assert GpuReport.model_validate(report("node-a", doc)).gpus[0].memory_free_mib == 0


@pytest.mark.parametrize(
    ("name", "doc", "message"),
    [
        (
            "ID of another node",
            report("node-a", gpu(0, "node-b:0")),
            "GPU 0 has gpuId 'node-b:0'; on node 'node-a' it must be 'node-a:0'",
        ),
        (
            "ID of another index",
            report("node-a", gpu(0, "node-a:0"), gpu(1, "node-a:7")),
            "GPU 1 has gpuId 'node-a:7'; on node 'node-a' it must be 'node-a:1'",
        ),
        (
            "node name not a DNS subdomain",
            report("Node_A", gpu(0, "Node_A:0")),
            "node name 'Node_A' is not a DNS subdomain",
        ),
        (
            "index out of range",
            report("node-a", gpu(2000, "node-a:2000")),
            "GPU index 2000 must be an integer from 0 to 1023",
        ),
        (
            "node name with a terminal escape, no GPUs",
            report("node-a\x1b[2J"),
            "is not a DNS subdomain",
        ),
        ("node name too long", report("a" * 254), "is not a DNS subdomain"),
        ("node name upper case, no GPUs", report("Not_A_Node"), "is not a DNS subdomain"),
        (
            "used above total",
            report("node-a", with_memory(100, 200, 0)),
            "GPU 0: memoryUsedMib 200 > memoryTotalMib 100",
        ),
        (
            "used and free above total",
            report("node-a", with_memory(100, 60, 60)),
            "GPU 0: memoryUsedMib 60 \\+ memoryFreeMib 60 > memoryTotalMib 100",
        ),
        (
            "no memory on a healthy readable GPU",
            report("node-a", with_memory(0, 0, 0)),
            "memoryTotalMib is 0 on a healthy GPU that is not stale",
        ),
        ("negative memory", report("node-a", with_memory(100, -1, 0)), "greater than or equal"),
        ("memory above float range", report("node-a", with_memory(10**400, 0, 0)), "less than"),
        (
            "memory of 17 TiB",
            report("node-a", with_memory(17 * 2**20, 0, 0)),
            "less than or equal to 16777216",
        ),
        (
            "infinite temperature",
            report("node-a", {**gpu(0, "node-a:0"), "temperatureC": float("inf")}),
            "finite number",
        ),
        (
            "NaN power",
            report("node-a", {**gpu(0, "node-a:0"), "powerW": float("nan")}),
            "finite number",
        ),
        ("poll interval 1e308", {**report("node-a"), "pollIntervalS": 1e308}, "less than or equal"),
        ("poll interval zero", {**report("node-a"), "pollIntervalS": 0}, "greater than 0"),
        (
            "index twice",
            report("node-a", gpu(0, "node-a:0"), gpu(0, "node-a:0")),
            "GPU index 0 appears twice in the report",
        ),
    ],
)
def test_inconsistent_report_is_refused(name: str, doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GpuReport.model_validate(doc)
    with pytest.raises(ValidationError, match=message):
        GpuReport.model_validate_json(json.dumps(doc))  # the pool's path: straight from bytes


@pytest.mark.parametrize(
    ("field", "literal", "message"),
    [
        ("memoryTotalMib", b"1e400", "finite number"),
        ("memoryTotalMib", b"1" + b"0" * 400, "less than or equal"),
        ("utilizationPercent", b"1e400", "finite number"),
        ("temperatureC", b"NaN", "finite number"),
        ("powerW", b"Infinity", "finite number"),
        ("pollIntervalS", b"1e400", "finite number"),
    ],
)
def test_numbers_out_of_float_range_in_json_are_refused(
    field: str, literal: bytes, message: str
) -> None:
    """What Python's JSON encoder writes for NaN and infinity, or a number past float range,
    parsed straight from bytes as the pool does."""
    doc = report("node-a", gpu(0, "node-a:0"))
    where = doc if field == "pollIntervalS" else doc["gpus"][0]
    where[field] = "PLACEHOLDER"
    body = json.dumps(doc).encode().replace(b'"PLACEHOLDER"', literal)
    with pytest.raises(ValidationError, match=message):
        GpuReport.model_validate_json(body)
