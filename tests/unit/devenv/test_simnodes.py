"""Nodes files become Node objects that look like GPU nodes; bad files are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from simnodes import NodesFileError, build_nodes, parse_node_groups

ROOT = Path(__file__).resolve().parents[3]


def test_default_nodes_file_is_the_heterogeneous_mix() -> None:
    groups = parse_node_groups((ROOT / "hack" / "nodes.yaml").read_text())
    nodes = build_nodes(groups, octet=42)
    products = [n["metadata"]["labels"]["nvidia.com/gpu.product"] for n in nodes]
    assert products == ["NVIDIA-H100-80GB-HBM3"] * 3 + ["NVIDIA-L4"] * 2
    assert [n["status"]["allocatable"]["nvidia.com/gpu"] for n in nodes] == ["8"] * 3 + ["4"] * 2


def test_node_carries_gfd_labels_capacity_and_kwok_annotation() -> None:
    groups = parse_node_groups(
        "groups: [{name: l4, count: 1, gpus: 4, product: NVIDIA-L4, memoryMiB: 23034}]"
    )
    (node,) = build_nodes(groups, octet=7)
    labels = node["metadata"]["labels"]
    assert node["metadata"]["name"] == "gpu-l4-0"
    assert labels["nvidia.com/gpu.present"] == "true"
    assert labels["nvidia.com/gpu.count"] == "4"
    assert labels["nvidia.com/gpu.memory"] == "23034"
    assert labels["kubernetes.io/hostname"] == "gpu-l4-0"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "4"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert node["spec"]["podCIDRs"] == ["127.7.1.0/24"]
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "127.7.0.1"}


def test_every_node_gets_its_own_loopback_pod_range() -> None:
    groups = parse_node_groups((ROOT / "hack" / "nodes.yaml").read_text())
    cidrs = [n["spec"]["podCIDR"] for n in build_nodes(groups, octet=42)]
    assert len(set(cidrs)) == len(cidrs) == 5
    assert all(c.startswith("127.42.") and c.endswith(".0/24") for c in cidrs)
    node_ips = {n["status"]["addresses"][0]["address"] for n in build_nodes(groups, octet=42)}
    assert all(ip.startswith("127.42.0.") for ip in node_ips)


def test_extra_labels_are_kept() -> None:
    text = "groups: [{name: a, count: 1, gpus: 1, product: P, memoryMiB: 1, labels: {zone: z1}}]"
    (node,) = build_nodes(parse_node_groups(text), octet=1)
    assert node["metadata"]["labels"]["zone"] == "z1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("groups: []", "non-empty list under 'groups'", id="no-groups"),
        pytest.param("nodes: 1\ngroups: [{}]", "unknown top-level", id="unknown-top-level"),
        pytest.param(
            "groups: [{name: a, count: 1, gpus: 8, product: P, memoryMiB: 1, gpu: 2}]",
            "unknown key(s) ['gpu']",
            id="unknown-key",
        ),
        pytest.param(
            "groups: [{name: A_B, count: 1, gpus: 8, product: P, memoryMiB: 1}]",
            "groups[0].name must be a DNS label",
            id="bad-name",
        ),
        pytest.param(
            "groups: [{name: a, count: 0, gpus: 8, product: P, memoryMiB: 1}]",
            "group 'a'.count must be an integer >= 1",
            id="zero-count",
        ),
        pytest.param(
            "groups: [{name: a, count: 1, gpus: '8', product: P, memoryMiB: 1}]",
            "group 'a'.gpus must be an integer",
            id="string-gpus",
        ),
        pytest.param(
            "groups: [{name: a, count: 1, gpus: 8, memoryMiB: 1}]",
            "group 'a'.product",
            id="no-product",
        ),
        pytest.param(
            "groups: [{name: a, count: 1, gpus: 8, product: P}]",
            "group 'a'.memoryMiB",
            id="no-memory",
        ),
        pytest.param(
            "groups: [{name: a, count: 1, gpus: 8, product: P, memoryMiB: 1},"
            " {name: a, count: 1, gpus: 8, product: P, memoryMiB: 1}]",
            "unique",
            id="duplicate-group",
        ),
        pytest.param(
            "groups: [{name: a, count: 300, gpus: 8, product: P, memoryMiB: 1}]",
            "at most 254",
            id="too-many-nodes",
        ),
        pytest.param("groups: [", "not valid YAML", id="bad-yaml"),
    ],
)
def test_bad_nodes_files_are_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(NodesFileError) as err:
        parse_node_groups(text, source="nodes.yaml")
    assert message in str(err.value)
    assert "nodes.yaml" in str(err.value)
