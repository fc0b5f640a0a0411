"""`modelfleet agent`: serve this node's GPU stats. Flags override MODELFLEET_AGENT_* variables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from pydantic import ValidationError

from modelfleet.agent.app import AgentConfigError, build_agent, resolve_node_name, serve
from modelfleet.agent.nvml import NvmlStartError
from modelfleet.gpuid import GpuIdError
from modelfleet.settings import AgentSettings

# flag -> AgentSettings field
FLAGS: dict[str, str] = {
    "--backend": "backend",
    "--node": "node",
    "--host": "host",
    "--port": "port",
    "--poll-interval": "poll_interval_s",
    "--gpus": "gpus",
    "--gpu-memory-mib": "gpu_memory_mib",
    "--product": "product",
    "--gpu-file": "gpu_file",
    "--fake-gpu-dir": "fake_gpu_dir",
    "--kubeconfig": "kubeconfig",
    "--auth": "auth",
    "--token-file": "token_file",
    "--allowed-subjects": "allowed_subjects",
    "--audiences": "audiences",
    "--pod-resources-socket": "pod_resources_socket",
    "--pod-resources-timeout": "pod_resources_timeout_s",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def flag(name: str, **kwargs: Any) -> None:
        field = FLAGS[name]
        info = AgentSettings.model_fields[field]
        env = AgentSettings.env_name(field)
        parser.add_argument(
            name, dest=field, default=None, help=f"{info.description} [{env}]", **kwargs
        )

    flag("--backend", choices=["nvml", "simulated"])
    flag("--node", metavar="NAME")
    flag("--host", metavar="ADDR")
    flag("--port", type=int, metavar="PORT")
    flag("--poll-interval", type=float, metavar="SECONDS")
    flag("--gpus", type=int, metavar="N")
    flag("--gpu-memory-mib", type=int, metavar="MIB")
    flag("--product", metavar="NAME")
    flag("--gpu-file", metavar="FILE")
    flag("--fake-gpu-dir", metavar="DIR")
    flag("--kubeconfig", metavar="PATH")
    flag("--auth", choices=["none", "token", "tokenreview"])
    flag("--token-file", metavar="FILE")
    flag("--allowed-subjects", metavar="USER[,USER...]")
    flag("--audiences", metavar="AUD[,AUD...]")
    flag("--pod-resources-socket", metavar="PATH")
    flag("--pod-resources-timeout", type=float, metavar="SECONDS")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def load_agent_settings(args: argparse.Namespace) -> AgentSettings:
    """Environment plus flags; an error names the flag when a flag set the value."""
    overrides = {f: getattr(args, f) for f in FLAGS.values() if getattr(args, f, None) is not None}
    flag_of = {field: name for name, field in FLAGS.items()}
    try:
        return AgentSettings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            where = (
                flag_of.get(field, field) if field in overrides else AgentSettings.env_name(field)
            )
            info = AgentSettings.model_fields.get(field)
            accepted = f" ({info.description})" if info and info.description else ""
            lines.append(f"{where}={err.get('input')!r}: {err['msg']}{accepted}")
        raise AgentConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_agent_settings(args)
        try:
            node = resolve_node_name(settings.node)
        except GpuIdError as exc:
            raise AgentConfigError(f"--node / MODELFLEET_AGENT_NODE / NODE_NAME: {exc}") from None
        return asyncio.run(_main(settings, node))
    except AgentConfigError as exc:
        sys.stderr.write(f"modelfleet agent: {exc}\n")
        return 2
    except NvmlStartError as exc:
        # nvidia-ml-py missing from the image: no retry mends that. NVML itself failing to
        # start is not an error here: the agent runs, not ready, and keeps trying (nvml.py).
        sys.stderr.write(f"modelfleet agent: {exc}\n")
        return 1


async def _main(settings: AgentSettings, node: str) -> int:
    agent = await build_agent(settings, node)
    await serve(agent)
    return 0
