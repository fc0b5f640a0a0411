"""The one command-line entry point: `modelfleet <command>`.

Each command lives in its component; this module only wires argument parsers to them, importing
a component when its command runs so that `modelfleet crd` does not load kopf or aiohttp.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# command -> (module that defines `add_arguments(parser)` and `run(args) -> int`, help text)
COMMANDS: dict[str, tuple[str, str]] = {
    "crd": ("modelfleet.api.cli", "print (or write) the ModelDeployment CRD"),
    "docs": ("modelfleet.docs_cli", "write the generated docs (docs/configuration.md)"),
    "gateway": ("modelfleet.gateway.cli", "run the OpenAI-compatible gateway"),
    "sim-vllm": (
        "modelfleet.sim.vllm.cli",
        "run the vLLM stand-in (an OpenAI-compatible simulator)",
    ),
    "sim-gpu-driver": (
        "modelfleet.fakegpu.drivercli",
        "write a node's fake GPU driver inventory, mark its GPUs (un)healthy",
    ),
    "sim-gpu-plugin": (
        "modelfleet.fakegpu.plugincli",
        "run the fake GPU driver's kubelet device plugin (nvidia.com/gpu)",
    ),
    "agent": ("modelfleet.agent.cli", "serve this node's GPU stats (node-stats agent)"),
    "status": ("modelfleet.gpus.cli", "show the GPU pool: endpoints, health, GPUs and memory"),
    "operator": ("modelfleet.controller.cli", "run the operator (reconciles ModelDeployments)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfleet",
        description="Run LLM model replicas (vLLM) across NVIDIA GPU nodes on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        runner: Callable[[argparse.Namespace], int] = module.run
        # A command that stands in for another program (sim-vllm takes vLLM's arguments) sets
        # ACCEPTS_UNKNOWN_ARGS and gets the arguments it does not know as args._unknown.
        cmd.set_defaults(_run=runner, _lenient=getattr(module, "ACCEPTS_UNKNOWN_ARGS", False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not args._lenient:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args._unknown = unknown
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
