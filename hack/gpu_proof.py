"""The agent's NVML backend against `nvidia-smi` on a machine with NVIDIA GPUs.

Run by hack/gpu-proof.sh. Starts `modelfleet agent --backend nvml` on 127.0.0.1, then compares
its `/v1/gpus` and `/metrics` with `nvidia-smi --query-gpu` while the GPUs are idle and again
while a load process (PyTorch, when installed) holds memory and computes on every GPU: count,
UUIDs, names, memory total and used, utilization, temperature, power. It also lists which NVML
queries the driver supports on each GPU. Writes a JSON report and ends with one line of
key=value figures; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Doc = dict[Any, Any]  # a decoded JSON document or a table of readings
SMI_FIELDS = "index,uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw"
# nvidia-smi and the agent read at different instants: how far apart a figure may be.
MEMORY_TOLERANCE_MIB = 256
TEMPERATURE_TOLERANCE_C = 5
POWER_TOLERANCE = 0.25  # share of the larger reading, or 30 W
UTIL_BUSY = 50  # under load, both must read at least this (%)
LOAD_GIB = 8  # memory the load process holds per GPU

# `modelfleet agent` alone: the full CLI also loads the operator's modules (kopf), which an agent
# host need not have.
AGENT_MAIN = (
    "import argparse, sys; from modelfleet.agent import cli; p = argparse.ArgumentParser(); "
    "cli.add_arguments(p); sys.exit(cli.run(p.parse_args()))"
)
LOAD_SCRIPT = """
import sys, time, torch
gib, seconds = int(sys.argv[1]), float(sys.argv[2])
held = []
for i in range(torch.cuda.device_count()):
    with torch.cuda.device(i):
        held.append(torch.empty(gib * 2**30, dtype=torch.uint8, device=f"cuda:{i}"))
        a = torch.randn(8192, 8192, device=f"cuda:{i}", dtype=torch.bfloat16)
        held.append((a, a.clone()))
print("loaded", flush=True)
end = time.time() + seconds
while time.time() < end:
    for i in range(torch.cuda.device_count()):
        x, y = held[2 * i + 1]
        for _ in range(20):
            torch.matmul(x, y)
    torch.cuda.synchronize()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def smi() -> dict[int, dict[str, Any]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = {}
    for line in out.strip().splitlines():
        index, uuid, name, total, used, util, temp, power = (p.strip() for p in line.split(","))
        rows[int(index)] = {
            "uuid": uuid,
            "name": name,
            "memory_total": int(total),
            "memory_used": int(used),
            "util": _number(util),
            "temp": _number(temp),
            "power": _number(power),
        }
    return rows


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # [N/A], [Not Supported]


def agent_gpus(base: str) -> dict[str, Any]:
    return dict(json.loads(get(f"{base}/v1/gpus")))


def metric_values(base: str, name: str) -> dict[str, float]:
    """gpu label -> value of `name` in the agent's /metrics."""
    out = {}
    for line in get(f"{base}/metrics").splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            parts = dict(p.split("=", 1) for p in labels.split(",") if "=" in p)
            out[parts.get("gpu", "").strip('"')] = float(value)
    return out


def nvml_support() -> dict[str, dict[str, str]]:
    """Per GPU, each NVML query the agent may use and what the driver answered."""
    import pynvml

    pynvml.nvmlInit()
    try:
        calls: dict[str, Callable[[Any], Any]] = {
            "memory_info": lambda h: pynvml.nvmlDeviceGetMemoryInfo(h),
            "memory_info_v2": lambda h: pynvml.nvmlDeviceGetMemoryInfo(h, pynvml.nvmlMemory_v2),
            "utilization": lambda h: pynvml.nvmlDeviceGetUtilizationRates(h),
            "temperature": lambda h: pynvml.nvmlDeviceGetTemperature(h, 0),
            "power": lambda h: pynvml.nvmlDeviceGetPowerUsage(h),
            "ecc_uncorrected": lambda h: pynvml.nvmlDeviceGetTotalEccErrors(h, 1, 1),
            "compute_processes": lambda h: pynvml.nvmlDeviceGetComputeRunningProcesses(h),
            "mig_mode": lambda h: pynvml.nvmlDeviceGetMigMode(h),
            "xid_events": lambda h: pynvml.nvmlDeviceGetSupportedEventTypes(h),
        }
        report: dict[str, dict[str, str]] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            row = {}
            for name, call in calls.items():
                try:
                    call(handle)
                    row[name] = "ok"
                except pynvml.NVMLError as exc:
                    row[name] = str(exc)
            report[str(i)] = row
        return report
    finally:
        pynvml.nvmlShutdown()


def compare(phase: str, report: Doc, before: Doc, after: Doc) -> list[str]:
    """Failures of one phase: the agent's sample against nvidia-smi read before and after."""
    failures = []
    gpus = {g["index"]: g for g in report["gpus"]}
    if set(gpus) != set(before):
        return [f"{phase}: agent GPUs {sorted(gpus)} != nvidia-smi {sorted(before)}"]
    for index, g in gpus.items():
        lo, hi = before[index], after[index]
        where = f"{phase}: GPU {index}"
        if g["uuid"] != lo["uuid"]:
            failures.append(f"{where}: uuid {g['uuid']} != {lo['uuid']}")
        if g["product"] != lo["name"]:
            failures.append(f"{where}: product {g['product']!r} != {lo['name']!r}")
        if abs(g["memoryTotalMib"] - lo["memory_total"]) > MEMORY_TOLERANCE_MIB:
            failures.append(f"{where}: total {g['memoryTotalMib']} != {lo['memory_total']}")
        used_lo = min(lo["memory_used"], hi["memory_used"]) - MEMORY_TOLERANCE_MIB
        used_hi = max(lo["memory_used"], hi["memory_used"]) + MEMORY_TOLERANCE_MIB
        if not used_lo <= g["memoryUsedMib"] <= used_hi:
            failures.append(
                f"{where}: used {g['memoryUsedMib']} MiB outside nvidia-smi's "
                f"{lo['memory_used']}..{hi['memory_used']}"
            )
        temps = [t for t in (lo["temp"], hi["temp"]) if t is not None]
        if (
            g["temperatureC"] is not None
            and temps
            and not (
                min(temps) - TEMPERATURE_TOLERANCE_C
                <= g["temperatureC"]
                <= max(temps) + TEMPERATURE_TOLERANCE_C
            )
        ):
            failures.append(f"{where}: temperature {g['temperatureC']} vs {temps}")
        powers = [p for p in (lo["power"], hi["power"]) if p is not None]
        if g["powerW"] is not None and powers:
            slack = max(30.0, POWER_TOLERANCE * max([*powers, g["powerW"]]))
            if not min(powers) - slack <= g["powerW"] <= max(powers) + slack:
                failures.append(f"{where}: power {g['powerW']} W vs {powers}")
        if (g["temperatureC"] is None) != (not temps):
            failures.append(f"{where}: temperature readable by one side only")
        if g["stale"] or not g["health"]["healthy"]:
            failures.append(f"{where}: stale={g['stale']} health={g['health']}")
    return failures


def sample(base: str, after_s: float) -> tuple[Doc, Doc, Doc]:
    """nvidia-smi, then a fresh agent sample, then nvidia-smi again."""
    before = smi()
    time.sleep(after_s)
    report = agent_gpus(base)
    return before, report, smi()


def judge_load(busy: tuple[Doc, Doc, Doc], idle: Doc, figures: dict[str, Any]) -> list[str]:
    """Failures of the load phase: memory grew by what the load holds, both sides see it busy."""
    failures = []
    for g in busy[1]["gpus"]:
        idle_used = next(x for x in idle["gpus"] if x["index"] == g["index"])
        delta = g["memoryUsedMib"] - idle_used["memoryUsedMib"]
        figures[f"gpu{g['index']}_load_delta_mib"] = delta
        if delta < LOAD_GIB * 1024:
            failures.append(f"load: GPU {g['index']} used grew {delta} MiB only")
        util = g["utilizationPercent"]
        smi_util = busy[2][g["index"]]["util"]
        figures[f"gpu{g['index']}_load_util"] = util
        if util is not None and (util < UTIL_BUSY or (smi_util or 0) < UTIL_BUSY):
            failures.append(f"load: utilization agent {util}, nvidia-smi {smi_util}")
        figures[f"gpu{g['index']}_load_power_w"] = g["powerW"]
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-proof.json", help="JSON report path")
    parser.add_argument("--load-seconds", type=float, default=25.0)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'operator'}:{os.environ.get('PYTHONPATH', '')}")
    log = open(Path(args.out).with_suffix(".agent.log"), "w")  # noqa: SIM115
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT_MAIN, "--backend", "nvml", "--node",
         "gpu-proof", "--host", "127.0.0.1", "--port", str(port), "--auth", "none",
         "--poll-interval", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    failures: list[str] = []
    figures: dict[str, Any] = {}
    load = None
    try:
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(OSError):
                if agent_gpus(base)["gpus"]:
                    break
            if agent.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the agent did not answer; see {log.name}")
            time.sleep(0.5)
        idle = sample(base, 1.5)
        report = idle[1]
        figures["gpus"] = len(report["gpus"])
        figures["driver"] = report.get("driverVersion")
        figures["backend"] = report.get("backend")
        failures += compare("idle", *_order(idle))
        for g in report["gpus"]:
            figures[f"gpu{g['index']}_idle_used_mib"] = g["memoryUsedMib"]
            figures[f"gpu{g['index']}_idle_used_smi_mib"] = idle[2][g["index"]]["memory_used"]
        used = metric_values(base, "DCGM_FI_DEV_FB_USED")
        for g in agent_gpus(base)["gpus"]:
            if str(g["index"]) not in used:
                failures.append(f"metrics: no DCGM_FI_DEV_FB_USED for GPU {g['index']}")
        figures["metrics_series"] = len(used)

        try:
            have_torch = importlib.util.find_spec("torch") is not None
        except ValueError:
            have_torch = False
        if have_torch:
            load = subprocess.Popen(
                [sys.executable, "-c", LOAD_SCRIPT, str(LOAD_GIB), str(args.load_seconds)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert load.stdout is not None
            load.stdout.readline()  # "loaded"
            time.sleep(4)  # a few agent samples with the load on
            busy = sample(base, 1.5)
            failures += compare("load", *_order(busy))
            failures += judge_load(busy, report, figures)
        figures["load"] = have_torch
        figures["nvml"] = nvml_support()
    finally:
        if load is not None:
            load.kill()
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
    Path(args.out).write_text(json.dumps({"failures": failures, **figures}, indent=2))
    for line in failures:
        print("FAIL", line)
    unsupported = sorted(
        {f"{q}" for row in figures.get("nvml", {}).values() for q, v in row.items() if v != "ok"}
    )
    flat = {k: v for k, v in figures.items() if k != "nvml"}
    flat["nvml_unsupported"] = ",".join(unsupported) or "none"
    flat["failures"] = len(failures)
    flat["result"] = "pass" if not failures else "fail"
    print(" ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in flat.items()))
    return 0 if not failures else 1


def _order(s: tuple[Doc, Doc, Doc]) -> tuple[Doc, Doc, Doc]:
    before, report, after = s
    return report, before, after


if __name__ == "__main__":
    sys.exit(main())
