"""Global GPU IDs: `<node-name>:<gpu-index>`, e.g. `gpu-node-a:3`.

Node names are DNS subdomains (RFC 1123) and never contain ':', so the last ':' splits the ID
without ambiguity. The GPU UUID travels beside the ID in `GpuRef`, never inside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_NODE_NAME = 253
MAX_GPU_INDEX = 1023


class GpuIdError(ValueError):
    """A global GPU ID or one of its parts is malformed."""


def validate_node_name(node: str) -> str:
    """Return `node` if it is a valid Kubernetes node name (a DNS subdomain), else raise."""
    if not node or len(node) > MAX_NODE_NAME or not _DNS_SUBDOMAIN.match(node):
        raise GpuIdError(
            f"node name {node!r} is not a DNS subdomain: expected lowercase letters, digits, '-' "
            f"and '.', at most {MAX_NODE_NAME} characters, starting and ending alphanumeric"
        )
    return node


def format_gpu_id(node: str, index: int) -> str:
    """Build the global ID of GPU `index` on `node`."""
    validate_node_name(node)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_GPU_INDEX:
        raise GpuIdError(f"GPU index {index!r} must be an integer from 0 to {MAX_GPU_INDEX}")
    return f"{node}:{index}"


def parse_gpu_id(gpu_id: str) -> tuple[str, int]:
    """Split a global ID into (node, index); raise GpuIdError saying what was expected."""
    node, sep, index_text = gpu_id.rpartition(":")
    if not sep or not node:
        raise GpuIdError(
            f"global GPU ID {gpu_id!r} must look like <node-name>:<gpu-index>, e.g. gpu-node-a:3"
        )
    if not index_text.isdigit() or (len(index_text) > 1 and index_text[0] == "0"):
        raise GpuIdError(
            f"global GPU ID {gpu_id!r}: the part after ':' must be a GPU index (0, 1, 2, ...), "
            f"got {index_text!r}"
        )
    index = int(index_text)
    if index > MAX_GPU_INDEX:
        raise GpuIdError(f"global GPU ID {gpu_id!r}: GPU index above {MAX_GPU_INDEX}")
    try:
        validate_node_name(node)
    except GpuIdError as exc:
        raise GpuIdError(f"global GPU ID {gpu_id!r}: {exc}") from None
    return node, index


@dataclass(frozen=True, slots=True)
class GpuRef:
    """Where one GPU lives: its global ID, the agent endpoint that reports it, its UUID."""

    node: str
    index: int
    uuid: str
    endpoint: str

    @property
    def gpu_id(self) -> str:
        return f"{self.node}:{self.index}"


class GpuDirectory:
    """Two-way mapping between global IDs, (endpoint, local index) and UUIDs."""

    def __init__(self, refs: list[GpuRef] | tuple[GpuRef, ...] = ()) -> None:
        self._by_id: dict[str, GpuRef] = {}
        self._by_uuid: dict[str, GpuRef] = {}
        self._by_local: dict[tuple[str, int], GpuRef] = {}
        for ref in refs:
            self.add(ref)

    def add(self, ref: GpuRef) -> None:
        """Register a GPU; the same global ID or UUID twice is an error."""
        format_gpu_id(ref.node, ref.index)
        if ref.gpu_id in self._by_id:
            raise GpuIdError(f"duplicate global GPU ID {ref.gpu_id!r}")
        if ref.uuid and ref.uuid in self._by_uuid:
            other = self._by_uuid[ref.uuid].gpu_id
            raise GpuIdError(f"GPU UUID {ref.uuid!r} reported as both {other} and {ref.gpu_id}")
        self._by_id[ref.gpu_id] = ref
        if ref.uuid:
            self._by_uuid[ref.uuid] = ref
        self._by_local[(ref.endpoint, ref.index)] = ref

    def by_id(self, gpu_id: str) -> GpuRef:
        parse_gpu_id(gpu_id)
        try:
            return self._by_id[gpu_id]
        except KeyError:
            raise KeyError(f"no GPU with global ID {gpu_id!r}") from None

    def by_uuid(self, uuid: str) -> GpuRef:
        return self._by_uuid[uuid]

    def by_local(self, endpoint: str, index: int) -> GpuRef:
        return self._by_local[(endpoint, index)]

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, gpu_id: object) -> bool:
        return gpu_id in self._by_id
