"""The local test cluster: `hack/cluster.sh up` time and memory, with and without real nodes.

Each round stops the checkout's cluster, starts it with simulated nodes only (REAL_NODES=0),
measures, stops it, starts it with the real nodes of hack/real-nodes.yaml, measures, and stops
it again. The two kinds alternate in every round, so a noisy machine weighs on both alike.

Memory is the resident set (RSS) of every process the cluster runs: the control plane and kwok
(processes whose command line names the cluster's directory), the real nodes' holders, kubelets,
containerds, device plugins and the API forwarder, containerd's shims and the containers (every
process in a real node's mount namespace or cgroup). Shared pages are counted in each process,
so the sum is an upper bound. The images are built before the first round (their build is not
part of `up` once cached).

    .venv/bin/python benchmarks/bench_cluster.py [--rounds 3]

It stops the cluster of this checkout: do not run tests against it meanwhile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SH = ROOT / "hack" / "cluster.sh"
CLUSTER_DIR = ROOT / ".cluster"


def cluster(action: str, *, real: bool) -> float:
    """Run `hack/cluster.sh <action>`; seconds it took."""
    env = {**os.environ, "REAL_NODES": "1" if real else "0"}
    started = time.monotonic()
    done = subprocess.run([str(CLUSTER_SH), action], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"hack/cluster.sh {action} failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cluster_processes() -> set[int]:
    """Every process of this checkout's cluster (see the module docstring)."""
    marker = str(CLUSTER_DIR) + "/"
    holders: set[str] = set()
    for pid_file in (CLUSTER_DIR / "real").glob("*/pids/holder.pid"):
        try:
            holders.add(os.readlink(f"/proc/{pid_file.read_text().strip()}/ns/mnt"))
        except (OSError, ValueError):
            continue
    found: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mnt = os.readlink(proc / "ns" / "mnt")
            cgroups = (proc / "cgroup").read_text()
        except OSError:
            continue
        if marker in cmdline or mnt in holders or "/modelfleet-mf-" in cgroups:
            found.add(int(proc.name))
    return found


def measure(real: bool) -> tuple[float, float, int]:
    """(up seconds, RSS MiB, processes) of one start."""
    up_s = cluster("up", real=real)
    time.sleep(5)  # let the components settle after their start
    pids = cluster_processes()
    rss = sum(rss_kib(p) for p in pids) / 1024
    return up_s, rss, len(pids)


def real_node_count() -> int:
    doc = yaml.safe_load((ROOT / "hack" / "real-nodes.yaml").read_text())
    return len(doc["nodes"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # Build the images now (cached afterwards), so that no round pays for a build.
    subprocess.run([sys.executable, str(ROOT / "hack" / "images.py"), "build"], check=True)
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for n in range(args.rounds):
        for real in (False, True):
            cluster("down", real=real)
            results[real].append(measure(real))
            up_s, rss, procs = results[real][-1]
            kind = "with real nodes" if real else "simulated only"
            print(f"round {n + 1} {kind}: up {up_s:.1f} s, {rss:.0f} MiB RSS, {procs} processes")
    cluster("down", real=False)
    sim = [statistics.median(x) for x in zip(*results[False], strict=True)]
    real = [statistics.median(x) for x in zip(*results[True], strict=True)]
    print(
        f"up_s_sim={sim[0]:.1f} up_s_real={real[0]:.1f} "
        f"rss_mib_sim={sim[1]:.0f} rss_mib_real={real[1]:.0f} "
        f"rss_mib_per_real_node={(real[1] - sim[1]) / real_node_count():.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
