"""GpuReport's own checks: every GPU ID is `<node>:<index>`, indexes are unique and in range."""

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
    assert GpuReport.model_validate(report("Not_A_Node")).gpus == []  # no GPU, no GPU ID


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
