"""`modelfleet operator`: wait for the leader Lease, then run the kopf operator until stopped.

Exits 0 on SIGTERM/SIGINT (after releasing the Lease), 1 when leadership is lost (the standby
takes over; the Pod restarts and stands by), 2 on bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
import uuid

import aiohttp
import kopf

from modelfleet.controller.handlers import build_registry
from modelfleet.controller.leader import LeaderElector
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.server import ServerState, start_http_server
from modelfleet.kube.client import KubeClient, load_config
from modelfleet.settings import OperatorSettings, SettingsError, load

log = logging.getLogger("modelfleet.operator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then $KUBECONFIG)"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def run(args: argparse.Namespace) -> int:
    level = args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        # kopf logs every handler run at INFO; the reconcile logs what it did instead.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        settings = load(OperatorSettings)
    except SettingsError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    if settings.lease_renew_interval_s >= settings.lease_duration_s:
        sys.stderr.write(
            f"MODELFLEET_LEASE_RENEW_INTERVAL_S ({settings.lease_renew_interval_s}) must be "
            f"shorter than MODELFLEET_LEASE_DURATION_S ({settings.lease_duration_s})\n"
        )
        return 2
    if args.kubeconfig:
        # kopf's login reads $KUBECONFIG; keep one source of truth for both clients.
        os.environ["KUBECONFIG"] = args.kubeconfig
    tune_gc()
    return asyncio.run(run_operator(settings, args.kubeconfig))


def tune_gc() -> None:
    """Collect the young generation less often and never scan what was loaded at start.

    A poll round over 1,000 agents creates about 100,000 short-lived objects; with the default
    threshold (700) such a round cost 0.61 s of CPU, with 50,000 it cost 0.31 s, the same as with
    the collector off (benchmarks/RESULTS.md, GPU pool). Frozen start-up objects (modules, kopf's
    registry) are never traversed again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


async def run_operator(settings: OperatorSettings, kubeconfig: str | None = None) -> int:
    """Serve /healthz and /metrics, take the Lease, run kopf; see the module docstring."""
    metrics = OperatorMetrics()
    state = ServerState()
    http = await start_http_server(settings, state)
    identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    config = load_config(kubeconfig)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=config.ssl_context, limit=4),
        headers={"User-Agent": "modelfleet-operator-lease"},
        trace_configs=[metrics.api_trace()],
    )
    try:
        async with session, KubeClient(config, timeout_s=10, session=session) as client:
            elector = None
            if settings.leader_election:
                elector = LeaderElector(
                    client,
                    namespace=settings.lease_namespace or client.config.namespace,
                    name=settings.lease_name,
                    identity=identity,
                    lease_duration_s=settings.lease_duration_s,
                    renew_interval_s=settings.lease_renew_interval_s,
                )
                await elector.acquire()
            metrics.leader.set(1)
            state.role = "leader"
            code = await _run_kopf(settings, kubeconfig, metrics, state, elector)
            metrics.leader.set(0)
            return code
    finally:
        await http.cleanup()


async def _run_kopf(
    settings: OperatorSettings,
    kubeconfig: str | None,
    metrics: OperatorMetrics,
    state: ServerState,
    elector: LeaderElector | None,
) -> int:
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    memo = kopf.Memo(config=settings, metrics=metrics, server=state, kubeconfig=kubeconfig)
    namespace = settings.watch_namespace
    operator = asyncio.create_task(
        kopf.operator(
            registry=build_registry(),
            memo=memo,
            stop_flag=stop,
            standalone=True,
            clusterwide=not namespace,
            namespaces=[namespace] if namespace else (),
        ),
        name="kopf",
    )
    if elector is None:
        await operator
        return 0
    holding = asyncio.create_task(elector.hold(), name="lease")
    done, _ = await asyncio.wait({operator, holding}, return_when=asyncio.FIRST_COMPLETED)
    if holding in done:
        log.error("leadership lost: stopping so that the new leader acts alone")
        if not stop.done():
            stop.set_result(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(operator, timeout=10)
        return 1
    holding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await holding
    await elector.release()
    operator.result()
    return 0
