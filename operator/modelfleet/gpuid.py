"""Global GPU IDs: `<node-name>:<gpu-index>`, e.g. `gpu-node-a:3`.

Node names are DNS subdomains (RFC 1123) and never contain ':', so the last ':' splits the ID
without ambiguity. The GPU UUID travels beside the ID (the agent reports both, in
`modelfleet.api.gpustats`), never inside it.
"""

from __future__ import annotations

import re

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_NODE_NAME = 253
MAX_GPU_INDEX = 1023


class GpuIdError(ValueError):
    """A global GPU ID or one of its parts is malformed."""


def validate_node_name(node: str) -> str:
    """Return `node` if it is a valid Kubernetes node name (a DNS subdomain), else raise."""
    if not node or len(node) > MAX_NODE_NAME or not _DNS_SUBDOMAIN.match(node):
        # repr() escapes control characters; the cut keeps a hostile name out of every reason.
        shown = repr(node[:64]) + (f" (cut, {len(node)} characters)" if len(node) > 64 else "")
        raise GpuIdError(
            f"node name {shown} is not a DNS subdomain: expected lowercase letters, digits, '-' "
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
