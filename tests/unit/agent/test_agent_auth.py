"""Auth: off, a token file, and TokenReview against a small real HTTP server playing the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from modelfleet.agent.auth import TokenFileAuth, TokenReviewAuth, parse_bearer
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.server import build_app
from modelfleet.agent.simulated import SimulatedBackend, build_sim_gpus
from modelfleet.agent.state import AgentState, poll_once
from modelfleet.kube import ClusterConfig, KubeClient

NODE = "auth-node"
DATA_PATHS = ("/v1/gpus", "/metrics", "/sim/faults")


async def ready_app(auth: Any) -> web.Application:
    backend = SimulatedBackend(NODE, build_sim_gpus(NODE, 2, 1000, "X"))
    metrics = AgentMetrics()
    state = AgentState(node=NODE, backend="simulated", poll_interval_s=5, metrics=metrics)
    metrics.attach(lambda: state.latest)
    assert await poll_once(backend, state)
    return build_app(state, auth=auth, sim=backend)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic abc", None),
        ("Bearer abc", "abc"),
        ("bearer abc ", "abc"),
    ],
)
def test_parse_bearer(header: str | None, token: str | None) -> None:
    assert parse_bearer(header) == token


async def test_auth_off_serves_everyone(serve) -> None:  # type: ignore[no-untyped-def]
    base = await serve(await ready_app(None))
    async with aiohttp.ClientSession() as http:
        for path in DATA_PATHS:
            async with http.get(base + path) as resp:
                assert resp.status == 200, path


async def test_token_file(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    base = await serve(await ready_app(TokenFileAuth(str(token_file))))
    async with aiohttp.ClientSession() as http:
        for path in DATA_PATHS:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                async with http.get(base + path, headers=headers) as resp:
                    assert resp.status == 401, (path, headers)
                    body = await resp.read()
                    assert b"gpu" not in body.lower()
                    assert b"DCGM" not in body
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(
                base + path, headers={"Authorization": "Bearer s3cret-token"}
            ) as resp:
                assert resp.status == 200, path
        # Probes stay open.
        for path in ("/healthz", "/readyz"):
            async with http.get(base + path) as resp:
                assert resp.status == 200, path
        # A rotated token file is picked up; the old token stops working.
        token_file.write_text("rotated")
        import os

        os.utime(token_file, (1, 1))
        async with http.get(
            base + "/v1/gpus", headers={"Authorization": "Bearer s3cret-token"}
        ) as resp:
            assert resp.status == 401
        async with http.get(base + "/v1/gpus", headers={"Authorization": "Bearer rotated"}) as r:
            assert r.status == 200


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        TokenFileAuth(str(tmp_path / "t"))


class FakeTokenReviewApi:
    """Answers POST tokenreviews like the API server: only `good` is authenticated."""

    def __init__(self) -> None:
        self.reviews: list[dict[str, Any]] = []
        self.fail = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self.review)
        return app

    async def review(self, request: web.Request) -> web.Response:
        if self.fail:
            return web.json_response(
                {"kind": "Status", "reason": "InternalError", "message": "etcd down"}, status=500
            )
        body = await request.json()
        assert body["kind"] == "TokenReview"
        assert request.headers["Authorization"] == "Bearer agent-sa-token"
        self.reviews.append(body)
        ok = body["spec"]["token"] == "good"
        status: dict[str, Any] = {"authenticated": ok}
        if ok:
            status["user"] = {"username": "system:serviceaccount:modelfleet:operator"}
        else:
            status["error"] = "invalid bearer token"
        return web.json_response({**body, "status": status}, status=201)


async def test_tokenreview(serve) -> None:  # type: ignore[no-untyped-def]
    api = FakeTokenReviewApi()
    api_url = await serve(api.app())
    client = KubeClient(
        ClusterConfig(server=api_url, ssl_context=False, token="agent-sa-token"), timeout_s=5
    )
    auth = TokenReviewAuth(client)
    base = await serve(await ready_app(auth))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(
                    base + "/v1/gpus", headers={"Authorization": "Bearer good"}
                ) as resp:
                    assert resp.status == 200
            async with http.get(base + "/metrics", headers={"Authorization": "Bearer bad"}) as r:
                assert r.status == 401
            async with http.get(base + "/metrics") as resp:
                assert resp.status == 401
            # Answers are cached: three good requests made one review.
            assert [r["spec"]["token"] for r in api.reviews] == ["good", "bad"]
            # The API failing is not the caller's fault: 503, and nothing cached.
            api.fail = True
            async with http.get(base + "/v1/gpus", headers={"Authorization": "Bearer new"}) as r:
                assert r.status == 503
            api.fail = False
            async with http.get(base + "/v1/gpus", headers={"Authorization": "Bearer new"}) as r:
                assert r.status == 401
    finally:
        await client.close()
    assert all("new" not in key for key in auth._cache)  # digests, never tokens
