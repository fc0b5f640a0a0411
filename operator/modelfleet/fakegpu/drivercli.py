"""`modelfleet sim-gpu-driver`: write a node's fake GPU inventory, mark its GPUs (un)healthy,
make the fake NVML fail (one reading of one GPU, or everything)."""

from __future__ import annotations

import argparse
import sys

from modelfleet.fakegpu.driverdir import (
    FAULT_ERRORS,
    FAULT_FIELDS,
    DriverDir,
    DriverDirError,
    NvmlFaults,
)
from modelfleet.gpufile import build_sim_gpus
from modelfleet.gpuid import GpuIdError, validate_node_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        help="write the inventory (gpus.yaml) and the directories; idempotent",
        description="Write the node's GPU inventory (UUIDs stable per node and index) and the "
        "health/ and memory/ directories. Running it again with the same values changes nothing.",
    )
    init.add_argument("--dir", required=True, help="the node's fake GPU driver directory")
    init.add_argument("--node", required=True, metavar="NAME", help="the node's name")
    init.add_argument("--count", required=True, type=int, metavar="N", help="number of GPUs")
    init.add_argument(
        "--memory-mib", required=True, type=int, metavar="MIB", help="memory per GPU, in MiB"
    )
    init.add_argument(
        "--product", required=True, metavar="NAME", help="product, e.g. NVIDIA-H100-80GB-HBM3"
    )
    health = actions.add_parser(
        "set-health",
        help="mark one GPU unhealthy (with a reason) or healthy again",
        description="Mark one GPU unhealthy with a reason, or healthy again. The device plugin "
        "re-advertises it and the agent's fake NVML reports it at their next poll.",
    )
    health.add_argument("--dir", required=True, help="the node's fake GPU driver directory")
    health.add_argument("--gpu", required=True, metavar="INDEX_OR_UUID", help="which GPU")
    state = health.add_mutually_exclusive_group(required=True)
    state.add_argument("--unhealthy", metavar="REASON", help="mark it unhealthy, with this reason")
    state.add_argument("--healthy", action="store_true", help="mark it healthy again")
    fault = actions.add_parser(
        "set-fault",
        help="make the fake NVML answer an error: one reading of one GPU, or every call",
        description="Make the agent's fake NVML fail: one reading of one GPU (--gpu, --field, "
        "--error), or every NVML call, nvmlInit included (--all ERROR), as after a "
        "`systemctl daemon-reload` on a GPU host. --clear with --gpu (and --field) removes that "
        "GPU's faults (that one); --clear alone removes every fault. The agent sees the change "
        "at its next poll.",
    )
    fault.add_argument("--dir", required=True, help="the node's fake GPU driver directory")
    fault.add_argument("--gpu", metavar="INDEX_OR_UUID", help="which GPU")
    fault.add_argument("--field", choices=FAULT_FIELDS, help="which reading fails")
    fault.add_argument("--error", choices=FAULT_ERRORS, help="the NVML error it answers")
    fault.add_argument(
        "--all", choices=FAULT_ERRORS, metavar="ERROR", help="every NVML call answers ERROR"
    )
    fault.add_argument("--clear", action="store_true", help="remove faults (see above)")


def run(args: argparse.Namespace) -> int:
    driver = DriverDir(args.dir)
    try:
        if args.action == "init":
            return _init(driver, args)
        if args.action == "set-fault":
            return _set_fault(driver, args)
        return _set_health(driver, args)
    except (DriverDirError, GpuIdError, OSError, ValueError) as exc:
        sys.stderr.write(f"modelfleet sim-gpu-driver {args.action}: {exc}\n")
        return 2


def _init(driver: DriverDir, args: argparse.Namespace) -> int:
    validate_node_name(args.node)
    if not 1 <= args.count <= 64:
        raise ValueError(f"--count {args.count}: expected 1 to 64 GPUs")
    gpus = build_sim_gpus(args.node, args.count, args.memory_mib, args.product)
    changed = driver.init_inventory(args.node, gpus)
    verb = "wrote" if changed else "unchanged:"
    sys.stdout.write(
        f"{verb} {driver.inventory_path}: {len(gpus)} x {args.product}, {args.memory_mib} MiB\n"
    )
    return 0


def _set_health(driver: DriverDir, args: argparse.Namespace) -> int:
    _node, gpus = driver.read_inventory()
    gpu = driver.find_gpu(gpus, args.gpu)
    reason = None if args.healthy else str(args.unhealthy)
    driver.set_health(gpu.uuid, reason)
    state = "healthy" if reason is None else f"unhealthy: {reason}"
    sys.stdout.write(f"GPU {gpu.index} ({gpu.uuid}) {state}\n")
    return 0


def _set_fault(driver: DriverDir, args: argparse.Namespace) -> int:
    if args.all is not None:
        if args.gpu or args.field or args.error or args.clear:
            raise ValueError("--all stands alone: use --clear to stop it")
        faults = driver.set_nvml_fault_all(args.all)
    elif args.gpu is None:
        if not args.clear or args.field or args.error:
            raise ValueError("name a GPU (--gpu) and a reading (--field), or --all, or --clear")
        faults = driver.clear_nvml_faults()
    else:
        _node, gpus = driver.read_inventory()
        gpu = driver.find_gpu(gpus, args.gpu)
        if args.clear:
            if args.error:
                raise ValueError("--clear takes no --error")
            if args.field:
                faults = driver.set_nvml_fault(gpu.uuid, args.field, None)
            else:
                faults = driver.clear_nvml_faults(gpu.uuid)
        elif args.field and args.error:
            faults = driver.set_nvml_fault(gpu.uuid, args.field, args.error)
        else:
            raise ValueError("--gpu needs --field and --error, or --clear")
    sys.stdout.write(describe_faults(faults))
    return 0


def describe_faults(faults: NvmlFaults) -> str:
    """One line per fault, for people."""
    lines = []
    if faults.all is not None:
        lines.append(f"every NVML call: NVML_ERROR_{faults.all}")
    for uuid, readings in sorted(faults.gpus.items()):
        lines.extend(f"{uuid} {r}: NVML_ERROR_{e}" for r, e in sorted(readings.items()))
    return "\n".join(lines or ["no NVML faults"]) + "\n"
