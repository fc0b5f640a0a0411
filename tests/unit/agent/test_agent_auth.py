"""Auth: off, a token file, and TokenReview against a small real HTTP server playing the API."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from modelfleet.agent.app import build_authenticator
from modelfleet.agent.auth import Decision, TokenFileAuth, TokenReviewAuth, parse_bearer
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.server import build_app, build_runner
from modelfleet.agent.simulated import SimulatedBackend, build_sim_gpus
from modelfleet.agent.state import AgentState, poll_once
from modelfleet.kube import ClusterConfig, KubeClient
from modelfleet.settings import AgentSettings

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
        ("Bearer \udcff\udcfe", None),  # bytes that are not UTF-8, as the server hands them on
        ("Bearer caf\u00e9", None),
        ("Bearer a\tb", None),
        ("Bearer a\x1b[2Jb", None),
        ("Bearer a b", None),
        ("Token abc", None),
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


OPERATOR = "system:serviceaccount:modelfleet-system:modelfleet-operator"
STRANGER = "system:serviceaccount:default:curious"


class FakeTokenReviewApi:
    """Answers POST tokenreviews like an audience-aware API server.

    `tokens` maps a token to (username, the audiences it was issued for); others are refused.
    With `audience_aware` off it ignores spec.audiences, as an old authenticator does.
    """

    def __init__(self) -> None:
        self.reviews: list[dict[str, Any]] = []
        self.fail = False
        self.audience_aware = True
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {
            "good": (OPERATOR, ("https://kubernetes.default.svc",)),
            "stranger": (STRANGER, ("https://kubernetes.default.svc",)),
            "agent-aud": (OPERATOR, ("modelfleet-agent",)),
        }

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
        known = self.tokens.get(body["spec"]["token"])
        wanted = body["spec"].get("audiences") or ["https://kubernetes.default.svc"]
        status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
        if known:
            username, issued_for = known
            common = [a for a in wanted if a in issued_for]
            if not self.audience_aware:
                status = {"authenticated": True, "user": {"username": username}}
            elif common:
                status = {
                    "authenticated": True,
                    "user": {"username": username, "groups": ["system:serviceaccounts"]},
                    "audiences": common,
                }
            else:
                status["error"] = "token audiences is invalid for the target audiences"
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


async def tokenreview_agent(serve, api: FakeTokenReviewApi, **kwargs: Any):  # type: ignore[no-untyped-def]
    api_url = await serve(api.app())
    client = KubeClient(
        ClusterConfig(server=api_url, ssl_context=False, token="agent-sa-token"), timeout_s=5
    )
    base = await serve(await ready_app(TokenReviewAuth(client, **kwargs)))
    return base, client


async def test_tokenreview_allowed_subjects(serve) -> None:  # type: ignore[no-untyped-def]
    api = FakeTokenReviewApi()
    base, client = await tokenreview_agent(serve, api, allowed_subjects=frozenset({OPERATOR}))
    try:
        async with aiohttp.ClientSession() as http:
            for path in DATA_PATHS:
                async with http.get(base + path, headers={"Authorization": "Bearer good"}) as r:
                    assert r.status == 200, path
                # Authenticated, but not the operator: 403, no data, and who was refused.
                async with http.get(base + path, headers={"Authorization": "Bearer stranger"}) as r:
                    assert r.status == 403, path
                    body = await r.json()
                    assert "WWW-Authenticate" not in r.headers
                assert STRANGER in body["error"]
                assert "MODELFLEET_AGENT_ALLOWED_SUBJECTS" in body["error"]
                assert set(body) == {"error", "status"}
                async with http.get(base + path, headers={"Authorization": "Bearer nope"}) as r:
                    assert r.status == 401, path
            async with http.get(base + "/healthz") as r:
                assert r.status == 200
    finally:
        await client.close()
    # Cached per token: one review each, whatever the number of requests.
    assert sorted(r["spec"]["token"] for r in api.reviews) == ["good", "nope", "stranger"]
    assert all("audiences" not in r["spec"] for r in api.reviews)


async def test_tokenreview_without_allowed_subjects_takes_any_identity(serve) -> None:  # type: ignore[no-untyped-def]
    base, client = await tokenreview_agent(serve, FakeTokenReviewApi())
    try:
        async with aiohttp.ClientSession() as http:
            for token in ("good", "stranger"):
                async with http.get(
                    base + "/v1/gpus", headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    assert r.status == 200, token
    finally:
        await client.close()


async def test_tokenreview_audiences(serve) -> None:  # type: ignore[no-untyped-def]
    api = FakeTokenReviewApi()
    base, client = await tokenreview_agent(
        serve, api, audiences=("modelfleet-agent",), allowed_subjects=frozenset({OPERATOR})
    )
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(
                base + "/v1/gpus", headers={"Authorization": "Bearer agent-aud"}
            ) as r:
                assert r.status == 200
            # A token of the right identity, issued for the API server, not for the agent.
            async with http.get(base + "/v1/gpus", headers={"Authorization": "Bearer good"}) as r:
                assert r.status == 401
        assert {tuple(r["spec"]["audiences"]) for r in api.reviews} == {("modelfleet-agent",)}
        # An API server that ignores audiences answers none: the agent cannot trust the token.
        api.audience_aware = False
        auth = TokenReviewAuth(client, audiences=("modelfleet-agent",))
        verdict = await auth.check("agent-aud")
        assert verdict.decision is Decision.UNAUTHENTICATED
        assert "audiences" in verdict.reason
    finally:
        await client.close()


async def test_build_authenticator_from_settings(  # type: ignore[no-untyped-def]
    serve, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "MODELFLEET_AGENT_ALLOWED_SUBJECTS", f" {OPERATOR}, ,{OPERATOR},system:admin "
    )
    monkeypatch.setenv("MODELFLEET_AGENT_AUDIENCES", "modelfleet-agent")
    settings = AgentSettings(auth="tokenreview")
    assert settings.allowed_subjects == [OPERATOR, "system:admin"]
    client = KubeClient(ClusterConfig(server="http://127.0.0.1:1", ssl_context=False), timeout_s=1)
    try:
        with caplog.at_level(logging.WARNING, logger="modelfleet.agent.app"):
            auth = build_authenticator(settings, None, client)
            assert isinstance(auth, TokenReviewAuth)
            assert auth.allowed_subjects == frozenset({OPERATOR, "system:admin"})
            assert auth.audiences == ("modelfleet-agent",)
            assert not caplog.records
            # No allowed subjects: it works, and says at start that anyone authenticated may read.
            open_auth = build_authenticator(
                AgentSettings(auth="tokenreview", allowed_subjects=""), None, client
            )
        assert isinstance(open_auth, TokenReviewAuth)
        assert open_auth.allowed_subjects == frozenset()
        assert len(caplog.records) == 1
        assert "any identity" in caplog.records[0].getMessage()
        assert "MODELFLEET_AGENT_ALLOWED_SUBJECTS" in caplog.records[0].getMessage()
    finally:
        await client.close()


def test_decide() -> None:
    auth = TokenReviewAuth(client=None, allowed_subjects=frozenset({OPERATOR}))  # type: ignore[arg-type]
    assert auth.decide(OPERATOR).decision is Decision.ALLOW
    assert auth.decide(STRANGER).decision is Decision.FORBIDDEN
    assert auth.decide("").decision is Decision.UNAUTHENTICATED


async def raw_request(base: str, authorization: bytes) -> tuple[int, bytes]:
    """One GET /v1/gpus with the header bytes as given (no client library would send them)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /v1/gpus HTTP/1.1\r\nHost: agent\r\nAuthorization: "
        + authorization
        + b"\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    reply = await reader.read()
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.mark.parametrize("mode", ["token", "tokenreview"])
@pytest.mark.parametrize(
    ("name", "authorization", "status"),
    [
        ("bytes that are not UTF-8", b"Bearer \xff\xfe\xfd", 401),
        ("Latin-1", b"Bearer s3cret-tok\xe9n", 401),
        ("UTF-8 beyond ASCII", "Bearer s3cret-tokén".encode(), 401),
        ("a tab inside", b"Bearer s3cret\t-token", 401),
        ("wrong scheme", b"Basic czNjcmV0LXRva2Vu", 401),
        ("no token", b"Bearer", 401),
        # The HTTP parser itself refuses these before any handler runs.
        ("an escape", b"Bearer s3cret\x1b[2J-token", 400),
        ("a NUL", b"Bearer s3cret\x00-token", 400),
    ],
)
async def test_malformed_tokens_are_refused_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    mode: str,
    name: str,
    authorization: bytes,
    status: int,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    api = FakeTokenReviewApi()
    closers: list[Any] = []
    if mode == "token":
        auth: Any = TokenFileAuth(str(token_file))
    else:
        api_runner = build_runner(api.app())
        await api_runner.setup()
        await web.TCPSite(api_runner, "127.0.0.1", 0).start()
        closers.append(api_runner.cleanup)
        api_url = f"http://127.0.0.1:{api_runner.addresses[0][1]}"
        client = KubeClient(
            ClusterConfig(server=api_url, ssl_context=False, token="agent-sa-token"), timeout_s=5
        )
        closers.append(client.close)
        auth = TokenReviewAuth(client)
    # The agent's own runner, with its logger: what `modelfleet agent` serves with.
    runner = build_runner(await ready_app(auth), shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    closers.append(runner.cleanup)
    try:
        with caplog.at_level(logging.DEBUG):
            code, body = await raw_request(
                f"http://127.0.0.1:{runner.addresses[0][1]}", authorization
            )
    finally:
        for close in reversed(closers):
            await close()
    assert code == status, body
    assert b"Traceback" not in body
    assert b"gpuId" not in body
    if status == 401:
        assert json.loads(body)["error"].startswith(("malformed bearer token", "missing bearer"))
    assert api.reviews == []  # nothing malformed is sent on to the API server
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
