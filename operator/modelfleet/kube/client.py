"""A small async Kubernetes API client on aiohttp (which kopf already brings).

modelfleet needs a dozen verbs on a handful of resources (pods, services, events, nodes, leases,
ModelDeployments) from the operator, the gateway, the pool and the simulated agent, all inside
event loops. The official `kubernetes` client blocks and builds a large object model per call;
this client speaks JSON dicts over one shared aiohttp session. docs/architecture.md has the
figures behind the choice.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_TOKEN_REREAD_S = 60.0  # bound service-account tokens rotate; kubelet refreshes the file


class KubeConfigError(RuntimeError):
    """No usable cluster configuration was found."""


class ApiError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str, body: Mapping[str, Any]) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = dict(body)

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


@dataclass
class ClusterConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    ssl_context: ssl.SSLContext | bool = True
    token: str | None = None
    token_file: str | None = None
    namespace: str = "default"
    _token_read_at: float = field(default=0.0, repr=False)

    def auth_header(self) -> str | None:
        if self.token_file and time.monotonic() - self._token_read_at > _TOKEN_REREAD_S:
            self.token = Path(self.token_file).read_text(encoding="utf-8").strip()
            self._token_read_at = time.monotonic()
        return f"Bearer {self.token}" if self.token else None


def _materialize(data_b64: str | None, path: str | None, base: Path) -> str | None:
    """kubeconfig gives either a file path or base64 data; ssl wants a path."""
    if path:
        return str((base / path).resolve()) if not os.path.isabs(path) else path
    if data_b64:
        with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".pem") as handle:
            handle.write(base64.b64decode(data_b64))
        return handle.name
    return None


def load_kubeconfig(
    path: str | os.PathLike[str] | None = None, context: str | None = None
) -> ClusterConfig:
    """Read a kubeconfig file: `path`, else $KUBECONFIG (first entry), else ~/.kube/config."""
    if path is None:
        env = os.environ.get("KUBECONFIG", "")
        path = env.split(os.pathsep)[0] if env else Path.home() / ".kube" / "config"
    file = Path(path)
    if not file.is_file():
        raise KubeConfigError(
            f"kubeconfig {file} does not exist; set KUBECONFIG or pass --kubeconfig"
        )
    doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    ctx_name = context or doc.get("current-context")
    contexts = {c["name"]: c["context"] for c in doc.get("contexts", [])}
    if ctx_name not in contexts:
        raise KubeConfigError(f"kubeconfig {file}: context {ctx_name!r} not found")
    ctx = contexts[ctx_name]
    cluster = {c["name"]: c["cluster"] for c in doc.get("clusters", [])}[ctx["cluster"]]
    user = {u["name"]: u.get("user") or {} for u in doc.get("users", [])}.get(ctx.get("user"), {})
    base = file.parent
    if cluster.get("insecure-skip-tls-verify"):
        sslctx: ssl.SSLContext | bool = False
    else:
        cafile = _materialize(
            cluster.get("certificate-authority-data"), cluster.get("certificate-authority"), base
        )
        sslctx = ssl.create_default_context(cafile=cafile)
    cert = _materialize(user.get("client-certificate-data"), user.get("client-certificate"), base)
    key = _materialize(user.get("client-key-data"), user.get("client-key"), base)
    if cert and key:
        if sslctx is False:
            sslctx = ssl.create_default_context()
            sslctx.check_hostname = False
            sslctx.verify_mode = ssl.CERT_NONE
        assert isinstance(sslctx, ssl.SSLContext)
        sslctx.load_cert_chain(cert, key)
    return ClusterConfig(
        server=cluster["server"].rstrip("/"),
        ssl_context=sslctx,
        token=user.get("token"),
        token_file=user.get("tokenFile"),
        namespace=ctx.get("namespace") or "default",
    )


def load_incluster() -> ClusterConfig:
    """The service account's token and CA, as mounted into every pod."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (SA_DIR / "token").is_file():
        raise KubeConfigError("not running in a cluster (no KUBERNETES_SERVICE_HOST or token)")
    if ":" in host:
        host = f"[{host}]"
    return ClusterConfig(
        server=f"https://{host}:{port}",
        ssl_context=ssl.create_default_context(cafile=str(SA_DIR / "ca.crt")),
        token_file=str(SA_DIR / "token"),
        namespace=(SA_DIR / "namespace").read_text(encoding="utf-8").strip(),
    )


def load_config(kubeconfig: str | None = None) -> ClusterConfig:
    """An explicit kubeconfig, else in-cluster, else $KUBECONFIG or ~/.kube/config."""
    if kubeconfig:
        return load_kubeconfig(kubeconfig)
    try:
        return load_incluster()
    except KubeConfigError:
        return load_kubeconfig()


def _params(params: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (params or {}).items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


class KubeClient:
    """JSON over one aiohttp session. Paths are API paths such as /api/v1/namespaces/x/pods."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        timeout_s: float = 30.0,
        session: aiohttp.ClientSession | None = None,
        user_agent: str = "modelfleet",
    ) -> None:
        self.config = config
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
        self._own_session = session is None
        self._session = session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=config.ssl_context, limit=64),
            headers={"User-Agent": user_agent},
        )

    async def close(self) -> None:
        if self._own_session:
            await self._session.close()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        auth = self.config.auth_header()
        if auth:
            headers["Authorization"] = auth
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call; returns the decoded JSON body or raises ApiError."""
        data = None if body is None else json.dumps(body).encode()
        async with self._session.request(
            method,
            self.config.server + path,
            params=_params(params),
            data=data,
            headers=self._headers(content_type if data is not None else None),
            timeout=self._timeout,
        ) as resp:
            raw = await resp.read()
            payload: dict[str, Any] = json.loads(raw) if raw else {}
            if resp.status >= 400:
                raise ApiError(
                    resp.status,
                    str(payload.get("reason") or resp.reason),
                    str(payload.get("message") or raw[:300].decode(errors="replace")),
                    payload,
                )
            return payload

    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def list(self, path: str, **params: Any) -> dict[str, Any]:
        """A LIST; the reply has `items` and `metadata.resourceVersion`."""
        return await self.request("GET", path, params=params)

    async def create(self, path: str, obj: Mapping[str, Any], **params: Any) -> dict[str, Any]:
        return await self.request("POST", path, params=params, body=obj)

    async def replace(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, body=obj)

    async def patch(
        self, path: str, patch: Any, *, kind: str = "merge", **params: Any
    ) -> dict[str, Any]:
        """kind: merge, json, strategic or apply (server-side apply; pass fieldManager)."""
        content_type = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "apply": "application/apply-patch+yaml",
        }[kind]
        return await self.request(
            "PATCH", path, params=params, body=patch, content_type=content_type
        )

    async def delete(
        self, path: str, body: Mapping[str, Any] | None = None, **params: Any
    ) -> dict[str, Any]:
        return await self.request("DELETE", path, params=params, body=body)

    async def watch(
        self, path: str, *, resource_version: str | None = None, timeout_s: int = 300, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield watch events ({"type": ..., "object": ...}) until the server ends the stream.

        An ERROR event with code 410 (resource version too old) is raised as ApiError(410) so
        the caller re-lists; see `list_and_watch` for the loop that does that.
        """
        query = dict(params, watch=True, timeoutSeconds=timeout_s, allowWatchBookmarks=True)
        if resource_version:
            query["resourceVersion"] = resource_version
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s + 30)
        async with self._session.get(
            self.config.server + path,
            params=_params(query),
            headers=self._headers(),
            timeout=timeout,
        ) as resp:
            if resp.status >= 400:
                raw = await resp.read()
                payload = json.loads(raw) if raw else {}
                raise ApiError(
                    resp.status,
                    str(payload.get("reason", resp.reason)),
                    str(payload.get("message", "")),
                    payload,
                )
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    raise ApiError(
                        int(status.get("code", 500)),
                        str(status.get("reason", "")),
                        str(status.get("message", "")),
                        status,
                    )
                yield event


async def list_and_watch(
    client: KubeClient,
    path: str,
    *,
    retry_delay_s: float = 1.0,
    watch_timeout_s: int = 300,
    on_error: Callable[[Exception], float | None] | None = None,
    **params: Any,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Level-triggered view of a collection: yields ("SYNC", list) then ("ADDED"|..., obj) forever.

    After every reconnect, whether the watch failed or the server simply closed it at its
    timeout, the whole list is read again and yielded as a SYNC event, so a consumer that rebuilds
    its cache on SYNC never keeps an object that vanished while it was away. The cost is one LIST
    per watch timeout (`watch_timeout_s`), which is small next to the safety it buys.

    `on_error` sees every failure first; a number it returns is the delay before the next try
    (a denied watch need not be retried every second).
    """
    while True:
        try:
            listing = await client.list(path, **params)
            version = listing.get("metadata", {}).get("resourceVersion")
            yield "SYNC", listing
            async for event in client.watch(
                path, resource_version=version, timeout_s=watch_timeout_s, **params
            ):
                if event["type"] != "BOOKMARK":
                    yield event["type"], event.get("object", {})
        except ApiError as exc:
            delay = on_error(exc) if on_error is not None else None
            if delay is not None:
                await asyncio.sleep(delay)
            elif exc.status != 410:
                await asyncio.sleep(retry_delay_s)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            delay = on_error(exc) if on_error is not None else None
            await asyncio.sleep(retry_delay_s if delay is None else delay)
