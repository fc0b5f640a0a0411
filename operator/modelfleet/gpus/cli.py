"""`modelfleet status`: the GPU pool as a table or JSON, from a running operator or the agents.

    modelfleet status --endpoints http://10.0.0.5:9400,http://10.0.0.6:9400
    modelfleet status --operator http://modelfleet-operator.modelfleet:8080 --json

Exit status: 0 when at least one endpoint is usable, 1 when none is, 2 on a usage error or
when the operator cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelfleet.gpus.status import PoolStatus
    from modelfleet.settings import OperatorSettings

EXIT_OK, EXIT_NOT_READY, EXIT_ERROR = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--operator",
        metavar="URL",
        help="read GET <URL>/status of a running operator (its metrics port, e.g. :8080)",
    )
    source.add_argument(
        "--endpoints",
        metavar="URL[,URL...]",
        help="poll these agents once, no cluster needed (default: MODELFLEET_NODE_STATS_ENDPOINTS)",
    )
    parser.add_argument("--json", action="store_true", help="print the status document as JSON")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="timeout of one request (default: MODELFLEET_ENDPOINT_TIMEOUT_S)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="bearer token for the agents (default: MODELFLEET_AGENT_TOKEN_FILE)",
    )


def _fail(message: str) -> int:
    from modelfleet.gpus.status import printable

    # Errors quote what the operator or an agent answered: no terminal escapes from there.
    sys.stderr.write(f"modelfleet status: {printable(message)}\n")
    return EXIT_ERROR


def run(args: argparse.Namespace) -> int:
    from modelfleet.gpus.status import render_table
    from modelfleet.settings import OperatorSettings, SettingsError, load, parse_endpoint_list

    overrides: dict[str, object] = {}
    if args.timeout is not None:
        overrides["endpoint_timeout_s"] = args.timeout
    if args.token_file is not None:
        overrides["agent_token_file"] = args.token_file
    try:
        settings = load(OperatorSettings, **overrides)
    except SettingsError as exc:
        return _fail(str(exc))

    status: PoolStatus
    if args.operator:
        try:
            status = _read_operator(args.operator, settings.endpoint_timeout_s, with_gpus=args.json)
        except RuntimeError as exc:
            return _fail(str(exc))
    else:
        if args.endpoints is not None:
            try:
                endpoints = parse_endpoint_list(args.endpoints)
            except ValueError as exc:
                return _fail(f"--endpoints: {exc}")
        else:
            endpoints = settings.node_stats_endpoints
        if not endpoints:
            return _fail(
                "no endpoints: pass --endpoints URL[,URL...] or --operator URL "
                "(or set MODELFLEET_NODE_STATS_ENDPOINTS)"
            )
        # One round and no history: an endpoint that fails it (after its retries) is down.
        settings = settings.model_copy(
            update={"node_stats_endpoints": endpoints, "breaker_failure_threshold": 1}
        )
        status = asyncio.run(_poll_once(settings))
    if args.json:
        # JSON escapes C0 controls; ASCII-only output escapes C1 controls too (U+009B is a
        # CSI on some terminals), and any JSON reader gets the same text back.
        doc = status.model_dump(mode="json", by_alias=True)
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=True) + "\n")
    else:
        sys.stdout.write(render_table(status))
    return EXIT_OK if status.ready else EXIT_NOT_READY


def _read_operator(url: str, timeout_s: float, *, with_gpus: bool) -> PoolStatus:
    import httpx
    from pydantic import ValidationError

    from modelfleet.gpus.status import PoolStatus

    target = url.rstrip("/") + "/status"
    try:
        resp = httpx.get(
            target, params={"gpus": "true" if with_gpus else "false"}, timeout=timeout_s
        )
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot read {target}: {exc}") from None
    if resp.status_code != 200:
        raise RuntimeError(f"{target} answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        return PoolStatus.model_validate_json(resp.content)
    except ValidationError as exc:
        raise RuntimeError(f"{target} did not return a pool status document: {exc}") from None


async def _poll_once(settings: OperatorSettings) -> PoolStatus:
    from prometheus_client import CollectorRegistry

    from modelfleet.gpus.client import create_session
    from modelfleet.gpus.metrics import PoolMetrics
    from modelfleet.gpus.pool import GpuPool
    from modelfleet.gpus.status import build_status

    async with create_session(settings.poll_concurrency) as session:
        pool = GpuPool(settings, session, metrics=PoolMetrics(CollectorRegistry()))
        snapshot = await pool.poll_once()
    return build_status(snapshot, "endpoints")
