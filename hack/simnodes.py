"""Simulated GPU nodes for the local control plane, described by a small YAML file.

`build_nodes` turns the node groups of hack/nodes.yaml into Node objects that look like GPU nodes
to the scheduler and to modelfleet: `nvidia.com/gpu` capacity and allocatable, the labels GPU
Feature Discovery sets, the kwok annotation (kwok plays their kubelet) and a loopback pod CIDR per
node, so every pod IP can be bound on this machine. `apply_nodes` makes the cluster's simulated
nodes exactly those of the file.

    python hack/simnodes.py --kubeconfig .cluster/kubeconfig --nodes hack/nodes.yaml --octet 42
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelfleet.kube.client import ApiError, KubeClient, load_kubeconfig

SIMULATED_LABEL = "modelfleet.io/simulated"  # on every node this module creates
GPU_RESOURCE = "nvidia.com/gpu"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GROUP_KEYS = {"name", "count", "gpus", "product", "memoryMiB", "cpu", "memory", "pods", "labels"}
MAX_NODES = 254  # one /24 of pod IPs per node inside 127.<octet>.0.0/16; .0 holds the node IPs


class NodesFileError(ValueError):
    """The nodes file is not valid; the message names the group and the field."""


@dataclass(frozen=True)
class NodeGroup:
    name: str
    count: int
    gpus: int
    product: str
    memory_mib: int
    cpu: str = "64"
    memory: str = "512Gi"
    pods: int = 110
    labels: tuple[tuple[str, str], ...] = ()


def _int_field(group: dict[str, Any], key: str, where: str, minimum: int) -> int:
    value = group.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NodesFileError(f"{where}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_node_groups(text: str, source: str = "nodes file") -> list[NodeGroup]:
    """Validate the YAML text of a nodes file; errors name the group and field to fix."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise NodesFileError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or not doc["groups"]:
        raise NodesFileError(f"{source} must be a mapping with a non-empty list under 'groups'")
    unknown_top = set(doc) - {"groups"}
    if unknown_top:
        raise NodesFileError(f"{source}: unknown top-level key(s) {sorted(unknown_top)}")
    groups: list[NodeGroup] = []
    for i, raw in enumerate(doc["groups"]):
        where = f"{source}: groups[{i}]"
        if not isinstance(raw, dict):
            raise NodesFileError(f"{where} must be a mapping")
        unknown = set(raw) - _GROUP_KEYS
        if unknown:
            raise NodesFileError(
                f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(_GROUP_KEYS)}"
            )
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or len(name) > 40:
            raise NodesFileError(
                f"{where}.name must be a DNS label of at most 40 characters, got {name!r}"
            )
        where = f"{source}: group {name!r}"
        product = raw.get("product")
        if not isinstance(product, str) or not product:
            raise NodesFileError(f"{where}.product must be a GPU product name, got {product!r}")
        labels = raw.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise NodesFileError(f"{where}.labels must map label keys to string values")
        groups.append(
            NodeGroup(
                name=name,
                count=_int_field(raw, "count", where, 1),
                gpus=_int_field(raw, "gpus", where, 0),
                product=product,
                memory_mib=_int_field(raw, "memoryMiB", where, 1),
                cpu=str(raw.get("cpu", "64")),
                memory=str(raw.get("memory", "512Gi")),
                pods=_int_field({"pods": raw.get("pods", 110)}, "pods", where, 1),
                labels=tuple(sorted(labels.items())),
            )
        )
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise NodesFileError(f"{source}: group names must be unique, got {names}")
    total = sum(g.count for g in groups)
    if total > MAX_NODES:
        raise NodesFileError(f"{source}: {total} nodes asked for, at most {MAX_NODES} fit")
    return groups


def build_nodes(groups: list[NodeGroup], octet: int) -> list[dict[str, Any]]:
    """Node objects for the groups; node k gets pod CIDR 127.<octet>.<k+1>.0/24."""
    if not 1 <= octet <= 254:
        raise ValueError(f"octet must be in 1..254, got {octet}")
    nodes: list[dict[str, Any]] = []
    for group in groups:
        for i in range(group.count):
            k = len(nodes) + 1
            name = f"gpu-{group.name}-{i}"
            resources = {
                "cpu": group.cpu,
                "memory": group.memory,
                "pods": str(group.pods),
                GPU_RESOURCE: str(group.gpus),
            }
            labels = {
                **dict(group.labels),
                "type": "kwok",
                SIMULATED_LABEL: "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": group.product,
                "nvidia.com/gpu.count": str(group.gpus),
                "nvidia.com/gpu.memory": str(group.memory_mib),
            }
            cidr = f"127.{octet}.{k}.0/24"
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        "annotations": {
                            "kwok.x-k8s.io/node": "fake",
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                    },
                    "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                    "status": {
                        "capacity": dict(resources),
                        "allocatable": dict(resources),
                        # Node IPs sit in .0 of the range so they never equal a pod IP.
                        "addresses": [
                            {"type": "InternalIP", "address": f"127.{octet}.0.{k}"},
                            {"type": "Hostname", "address": name},
                        ],
                        "nodeInfo": {
                            "architecture": "amd64",
                            "operatingSystem": "linux",
                            "kubeletVersion": "fake",
                        },
                    },
                }
            )
    return nodes


async def apply_nodes(client: KubeClient, nodes: list[dict[str, Any]]) -> None:
    """Create or update the nodes, set their status, delete simulated nodes not in the list."""
    wanted = {n["metadata"]["name"] for n in nodes}
    existing = await client.list("/api/v1/nodes", labelSelector=f"{SIMULATED_LABEL}=true")
    for item in existing.get("items", []):
        name = item["metadata"]["name"]
        if name not in wanted:
            await client.delete(f"/api/v1/nodes/{name}")
    for node in nodes:
        name = node["metadata"]["name"]
        meta = {k: node["metadata"][k] for k in ("labels", "annotations")}
        try:
            await client.create("/api/v1/nodes", node)
        except ApiError as exc:
            if not exc.conflict:
                raise
            await client.patch(f"/api/v1/nodes/{name}", {"metadata": meta, "spec": node["spec"]})
        # Status is reset on create by the Node strategy; the status subresource is the way to
        # advertise capacity and allocatable (there is no kubelet to do it).
        await client.patch(
            f"/api/v1/nodes/{name}/status",
            {"status": {k: node["status"][k] for k in ("capacity", "allocatable", "addresses")}},
        )


def _is_ready(node: dict[str, Any]) -> bool:
    for cond in node.get("status", {}).get("conditions", []):
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


async def wait_nodes_ready(client: KubeClient, names: set[str], timeout_s: float) -> None:
    """Poll until every named node is Ready (kwok's node stages) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        listing = await client.list("/api/v1/nodes", labelSelector=f"{SIMULATED_LABEL}=true")
        ready = {i["metadata"]["name"] for i in listing.get("items", []) if _is_ready(i)}
        if names <= ready:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes not Ready after {timeout_s:.0f}s: {sorted(names - ready)}")
        await asyncio.sleep(0.2)


async def _main(args: argparse.Namespace, groups: list[NodeGroup]) -> int:
    nodes = build_nodes(groups, args.octet)
    async with KubeClient(load_kubeconfig(args.kubeconfig), timeout_s=30) as client:
        await apply_nodes(client, nodes)
        await wait_nodes_ready(client, {n["metadata"]["name"] for n in nodes}, args.timeout)
    summary = ", ".join(f"{g.count}x{g.gpus} {g.product}" for g in groups)
    print(f"{len(nodes)} simulated GPU nodes Ready ({summary})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", help="kubeconfig of the cluster (not needed with --check)")
    parser.add_argument("--nodes", required=True, help="nodes file (see hack/nodes.yaml)")
    parser.add_argument("--octet", type=int, default=1, help="N in the 127.N.0.0/16 pod range")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for Ready")
    parser.add_argument("--check", action="store_true", help="only validate the nodes file")
    args = parser.parse_args(argv)
    try:
        groups = parse_node_groups(Path(args.nodes).read_text(encoding="utf-8"), source=args.nodes)
    except (OSError, NodesFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    if not args.kubeconfig:
        parser.error("--kubeconfig is required (unless --check)")
    return asyncio.run(_main(args, groups))


if __name__ == "__main__":
    sys.exit(main())
