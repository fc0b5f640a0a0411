"""The integration tier: tests against the real local control plane (hack/cluster.sh).

The session fixture uses the cluster that .cluster/kubeconfig points at when it is healthy, and
otherwise starts one (and stops it again at the end of the session, so no process is left). If the
control plane cannot start, every integration test fails with the reason: this tier is never
skipped silently.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterkit import (
    BUILD_SH,
    CLUSTER_SH,
    FAKE_MODELFLEET,
    KUBECONFIG,
    ROOT,
    Cluster,
    PodRunner,
    exists,
    wait_for,
)
from operator_kit import (
    Operators,
    RunnerProcess,
    agent_daemonset,
    create_test_nodes,
    delete_test_nodes,
    pod_ready,
    start_pod_runner,
)

from modelfleet.kube.client import ApiError, KubeClient, load_kubeconfig
from modelfleet.kube.paths import pods_path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kwok: needs the kwok control plane of hack/cluster.sh (loopback pod IPs)"
    )
    config.addinivalue_line(
        "markers", "realnodes: needs the real kubelet nodes of hack/cluster.sh (hack/realnodes.py)"
    )


# Fixtures that only the kwok cluster can serve: the pod runner starts programs on loopback pod
# IPs of kwok-managed nodes (test nodes included).
KWOK_FIXTURES = frozenset({"pod_runner", "sim_runner", "gpus"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if KWOK_FIXTURES & set(getattr(item, "fixturenames", ())):
                item.add_marker(pytest.mark.kwok)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The running local control plane; started here (and stopped after) when it is down.

    With MODELFLEET_TEST_KUBECONFIG set, that cluster (e.g. kind) is used as it is instead.
    """
    built = subprocess.run([BUILD_SH, "--cached-only"], capture_output=True, text=True)
    external = os.environ.get("MODELFLEET_TEST_KUBECONFIG")
    if external:
        bin_dir = Path(built.stdout.split()[-1]) if built.returncode == 0 else _kubectl_on_path()
        yield Cluster(kubeconfig=Path(external), bin_dir=bin_dir)
        return
    if built.returncode != 0:
        pytest.fail(
            "the control plane binaries are not built: run `make control-plane` (or `make test`, "
            "which builds them first)\n" + _tail(built.stderr),
            pytrace=False,
        )
    bin_dir = Path(built.stdout.strip().splitlines()[-1])
    status = subprocess.run([CLUSTER_SH, "status"], capture_output=True, text=True)
    started = status.returncode != 0
    if started:
        up = subprocess.run([CLUSTER_SH, "up"], capture_output=True, text=True, timeout=1500)
        if up.returncode != 0:
            pytest.fail(
                f"the local control plane did not start (hack/cluster.sh up):\n{_tail(up.stderr)}",
                pytrace=False,
            )
    try:
        yield Cluster(kubeconfig=KUBECONFIG, bin_dir=bin_dir)
    finally:
        if started:
            down = subprocess.run([CLUSTER_SH, "down"], capture_output=True, text=True)
            assert down.returncode == 0, _tail(down.stderr)


def _kubectl_on_path() -> Path:
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("MODELFLEET_TEST_KUBECONFIG is set but no kubectl is on PATH", pytrace=False)
    return Path(found).parent


@pytest.fixture
async def kube(cluster: Cluster) -> AsyncIterator[KubeClient]:
    """An async API client (modelfleet.kube) for the local cluster."""
    async with KubeClient(load_kubeconfig(cluster.kubeconfig), timeout_s=30) as client:
        yield client


@pytest.fixture
async def namespace(kube: KubeClient, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    # 12 hex digits: parametrized tests share the 40-character base, and a 6-digit suffix was
    # seen to repeat a name whose namespace was still being deleted.
    name = f"t-{base}-{uuid.uuid4().hex[:12]}"
    await kube.create("/api/v1/namespaces", {"metadata": {"name": name}})
    # The service account controller creates `default` shortly after; pods need it.
    await wait_for(
        lambda: exists(kube, f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        timeout=30,
        what=f"service account default in {name}",
    )
    yield name
    try:
        await kube.delete(f"/api/v1/namespaces/{name}", propagationPolicy="Background")
    except ApiError as exc:
        if not exc.not_found:
            raise


def _processes_running(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (this session's fake programs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture
def pod_runner(cluster: Cluster, tmp_path: Path) -> Iterator[PodRunner]:
    """hack/pod_runner.py running against the cluster, with the trivial fake_modelfleet program.

    After the test the runner is stopped and no program it started may be left running.
    """
    log_dir = tmp_path / "pod-logs"
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    command = shlex.join([sys.executable, str(FAKE_MODELFLEET)])
    runner_log = tmp_path / "runner.log"
    with runner_log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "hack" / "pod_runner.py"),
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--modelfleet",
                command,
                "--log-dir",
                str(log_dir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FAKE_PID_DIR": str(pid_dir)},
        )
    deadline = time.monotonic() + 30
    while b"watching pods" not in runner_log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"the pod runner did not start:\n{runner_log.read_text()}", pytrace=False)
        time.sleep(0.05)
    try:
        yield PodRunner(process=process, log_dir=log_dir, pid_dir=pid_dir)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        deadline = time.monotonic() + 10
        while _processes_running(str(FAKE_MODELFLEET)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _processes_running(str(FAKE_MODELFLEET))
        output = runner_log.read_text(errors="replace")
        assert not left, f"programs left running after the pod runner stopped: {left}"
        assert process.returncode == 0, f"pod runner exited {process.returncode}:\n{output}"


# --- the operator tier: private GPU nodes with agents, operator processes ----------------------


@pytest.fixture
def sim_runner(cluster: Cluster, tmp_path: Path) -> Iterator[RunnerProcess]:
    yield from start_pod_runner(cluster, tmp_path)


@pytest.fixture
async def gpus(kube: KubeClient, namespace: str, sim_runner: RunnerProcess) -> AsyncIterator[Any]:
    """A factory: `await gpus(nodes, gpus_per_node)` makes private GPU nodes with agents."""

    async def make(count: int, per_node: int) -> list[str]:
        names = await create_test_nodes(kube, namespace, count, per_node)
        await kube.create(
            f"/apis/apps/v1/namespaces/{namespace}/daemonsets", agent_daemonset(namespace)
        )

        async def agents_ready() -> bool:
            pods = await kube.list(
                pods_path(namespace), labelSelector="app.kubernetes.io/component=agent"
            )
            ready = [p for p in pods["items"] if pod_ready(p)]
            return len(ready) == count

        await wait_for(agents_ready, timeout=60, what=f"{count} agents ready")
        return names

    yield make
    await delete_test_nodes(kube, namespace)


@pytest.fixture
def operators(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Operators]:
    ops = Operators(cluster, namespace, tmp_path)
    yield ops
    ops.stop_all()
