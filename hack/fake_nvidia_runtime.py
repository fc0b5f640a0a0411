"""The fake NVIDIA container runtime of the test cluster's real nodes: a hook in front of runc.

On a GPU node the NVIDIA container runtime reads NVIDIA_VISIBLE_DEVICES from a container's OCI
spec and, before runc creates the container, injects the driver (libraries, device nodes) for
those GPUs; an ID the node does not have makes the create fail. This hook does the same with the
node's fake driver (`modelfleet sim-gpu-driver`): for `runc create`, when the container's
environment names GPUs (UUIDs, indexes or `all`), it checks each against the node's inventory,
bind-mounts the driver directory at /run/modelfleet/fake-gpu and sets MODELFLEET_FAKE_GPU_DIR
(and MODELFLEET_AGENT_FAKE_GPU_DIR, so the agent's NVML reads it),
then runs runc with the same arguments. Containers without the variable (or with `void`/`none`)
pass through untouched, as they do with the NVIDIA runtime.

    fake_nvidia_runtime.py --driver-dir DIR --runc /usr/sbin/runc -- <runc arguments>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

CONTAINER_DRIVER_DIR = "/run/modelfleet/fake-gpu"
NO_GPU = {"", "void", "none"}


class DeviceError(RuntimeError):
    """The container names a GPU this node does not have."""


def bundle_of(runc_args: list[str]) -> Path:
    for i, arg in enumerate(runc_args):
        if arg in ("--bundle", "-b") and i + 1 < len(runc_args):
            return Path(runc_args[i + 1])
        if arg.startswith("--bundle="):
            return Path(arg.split("=", 1)[1])
    return Path.cwd()


def inventory(driver_dir: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load((driver_dir / "gpus.yaml").read_text())
    gpus = doc["gpus"] if isinstance(doc, dict) else doc
    return list(gpus)


def resolve_devices(value: str, gpus: list[dict[str, Any]]) -> list[str]:
    """UUIDs of the GPUs NVIDIA_VISIBLE_DEVICES names, as the NVIDIA runtime reads it."""
    if value.strip() == "all":
        return [str(g["uuid"]) for g in gpus]
    by_uuid = {str(g["uuid"]): g for g in gpus}
    by_index = {str(g["index"]): g for g in gpus}
    uuids = []
    for item in (p.strip() for p in value.split(",")):
        gpu = by_uuid.get(item) or by_index.get(item)
        if gpu is None:
            raise DeviceError(f"nvidia-container-cli: device error: {item}: unknown device")
        uuids.append(str(gpu["uuid"]))
    return uuids


def inject(spec: dict[str, Any], driver_dir: Path) -> bool:
    """Add the fake driver to the OCI spec when it asks for GPUs; whether it did."""
    env = spec.setdefault("process", {}).setdefault("env", [])
    values = [e.split("=", 1)[1] for e in env if e.startswith("NVIDIA_VISIBLE_DEVICES=")]
    if not values or values[-1].strip() in NO_GPU:
        return False
    resolve_devices(values[-1], inventory(driver_dir))
    spec.setdefault("mounts", []).append(
        {
            "destination": CONTAINER_DRIVER_DIR,
            "type": "bind",
            "source": str(driver_dir),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        }
    )
    # For the vLLM stand-in (memory records) and the agent's NVML (`--fake-gpu-dir`).
    env.append(f"MODELFLEET_FAKE_GPU_DIR={CONTAINER_DRIVER_DIR}")
    env.append(f"MODELFLEET_AGENT_FAKE_GPU_DIR={CONTAINER_DRIVER_DIR}")
    return True


def report_error(runc_args: list[str], message: str) -> None:
    """Say why the create failed where containerd reads runc's errors: its --log file (JSON)."""
    print(message, file=sys.stderr)
    for i, arg in enumerate(runc_args[:-1]):
        if arg == "--log":
            with open(runc_args[i + 1], "a") as out:
                out.write(json.dumps({"level": "error", "msg": message}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver-dir", type=Path, required=True)
    parser.add_argument("--runc", required=True)
    parser.add_argument("runc_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    runc_args = args.runc_args[1:] if args.runc_args[:1] == ["--"] else args.runc_args
    if "create" in runc_args:
        config = bundle_of(runc_args) / "config.json"
        spec = json.loads(config.read_text())
        try:
            changed = inject(spec, args.driver_dir)
        except DeviceError as exc:
            report_error(runc_args, str(exc))
            return 1
        if changed:
            tmp = config.with_suffix(".tmp")
            tmp.write_text(json.dumps(spec))
            tmp.replace(config)
    os.execv(args.runc, [args.runc, *runc_args])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
