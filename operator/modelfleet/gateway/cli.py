"""`modelfleet gateway`: the OpenAI-compatible front door over the operator's replicas."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from functools import partial

from modelfleet.aio import install_uvloop
from modelfleet.api.v1alpha1 import Balancing
from modelfleet.gateway.app import build_app, build_registry, start_gateway
from modelfleet.gateway.sources import (
    StaticUpstreamsError,
    parse_static_upstreams,
    run_kube_source,
)
from modelfleet.gateway.usage import KubeAnnotationWriter
from modelfleet.kube.client import KubeClient, KubeConfigError, load_config
from modelfleet.settings import GatewaySettings, SettingsError, load

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to listen on (default: settings)")
    parser.add_argument("--port", type=int, default=None, help="port (default: settings, 8080)")
    parser.add_argument(
        "--static-upstreams",
        default=None,
        metavar="MODEL=URL[,URL];...",
        help="route to these upstreams instead of watching the cluster",
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file")
    parser.add_argument(
        "--balancing",
        choices=[b.value for b in Balancing],
        default=None,
        help="default routing policy (default: settings, RoundRobin)",
    )


async def serve(settings: GatewaySettings) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    registry = build_registry(settings)
    kube: KubeClient | None = None
    if settings.static_upstreams:
        registry.set_static(parse_static_upstreams(settings.static_upstreams))
        app = build_app(settings, registry=registry)
    else:
        kube = KubeClient(load_config(settings.kubeconfig or None), user_agent="modelfleet-gateway")
        app = build_app(
            settings,
            registry=registry,
            source=partial(run_kube_source, kube=kube, namespace=settings.namespace),
            writer=KubeAnnotationWriter(kube),
        )
    running = await start_gateway(app, settings, settings.host, settings.port)
    log.info(
        "gateway listening on %s (%s, balancing %s)",
        running.url,
        "static upstreams" if settings.static_upstreams else "watching the cluster",
        settings.balancing,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.stop()
        if kube is not None:
            await kube.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "static_upstreams": args.static_upstreams,
            "kubeconfig": args.kubeconfig,
            "balancing": args.balancing,
        }.items()
        if value is not None
    }
    try:
        settings = load(GatewaySettings, **overrides)
        if settings.static_upstreams:
            parse_static_upstreams(settings.static_upstreams)
    except (SettingsError, StaticUpstreamsError) as exc:
        log.error("%s", exc)
        return 2
    install_uvloop()
    try:
        asyncio.run(serve(settings))
    except KubeConfigError as exc:
        log.error("%s", exc)
        return 2
    return 0
