"""The operator's session for the agents has as many connections as agents are polled at once."""

from __future__ import annotations

from pathlib import Path

import kopf
import pytest
from prometheus_client import CollectorRegistry

from modelfleet.controller import handlers
from modelfleet.controller.metrics import OperatorMetrics
from modelfleet.controller.server import ServerState
from modelfleet.settings import OperatorSettings

KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


@pytest.mark.parametrize("concurrency", [8, 500])
async def test_poll_concurrency_sets_the_connection_limit(tmp_path: Path, concurrency: int) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    memo = kopf.Memo(
        config=OperatorSettings(
            node_stats_endpoints=["http://127.0.0.1:9"],
            poll_concurrency=concurrency,
            watch_node_pods=False,
        ),
        kubeconfig=str(kubeconfig),
        metrics=OperatorMetrics(CollectorRegistry()),
        server=ServerState(),
    )
    await handlers.configure(kopf.OperatorSettings(), memo)
    try:
        pool = memo.server.pool
        assert pool is not None
        connector = pool._session.connector
        assert connector is not None
        assert connector.limit == concurrency
        assert connector.limit_per_host == 0
    finally:
        await handlers.cleanup(memo)
