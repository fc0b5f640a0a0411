"""Helpers of the integration tier: the cluster handle, kubectl, and waiting with a deadline."""

from __future__ import annotations

import asyncio
import inspect
import json
import shlex
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from modelfleet.kube.client import ApiError, KubeClient

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "hack" / "cluster.sh"
BUILD_SH = ROOT / "hack" / "build-control-plane.sh"
KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
FAKE_MODELFLEET = Path(__file__).resolve().parent / "fake_modelfleet.py"

T = TypeVar("T")
# The project image as hack/images.py builds it and hack/realnodes.py imports it into each real
# node's containerd.
LOCAL_IMAGE = {
    "repository": "docker.io/modelfleet/modelfleet",
    "tag": "local",
    "pullPolicy": "Never",
}


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    bin_dir: Path

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"


# `timeout` is a polling deadline, not a cancellation scope: the name reads best at call sites.
async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,  # noqa: ASYNC109
    *,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll `predicate` (sync or async) until it returns something truthy; return that value.

    Fails with `what` and the last value seen when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


async def kubectl(
    cluster: Cluster, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the cluster's kubectl (same version as the server) without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(
        str(cluster.kubectl),
        "--kubeconfig",
        str(cluster.kubeconfig),
        *args,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(input.encode() if input else None), 60)
    done = subprocess.CompletedProcess(
        ["kubectl", *args], proc.returncode or 0, out.decode(), err.decode()
    )
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {shlex.join(args)} failed:\n{done.stderr}")
    return done


@dataclass
class PodRunner:
    process: subprocess.Popen[bytes]
    log_dir: Path
    pid_dir: Path


async def helm(
    cluster: Cluster, *args: str, values: dict[str, Any] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the control plane's helm against the cluster without blocking the loop.

    The chart's pods get the locally built image unless `values` names another: real nodes have
    no registry, and test traffic never leaves the machine (hack/images.py, LOCAL_IMAGE).
    """
    argv = [str(cluster.bin_dir / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    if values is not None and "image" not in values:
        values = {**values, "image": LOCAL_IMAGE}
    if values is not None:
        argv += ["--values", "-"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    data = json.dumps(values).encode() if values is not None else b""
    out, err = await asyncio.wait_for(proc.communicate(data), 240)
    done = subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(), err.decode())
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stderr}")
    return done


async def exists(kube: KubeClient, path: str) -> bool:
    """Whether the API object at `path` exists (404: no; any other error raises)."""
    try:
        await kube.get(path)
    except ApiError as exc:
        if exc.not_found:
            return False
        raise
    return True
