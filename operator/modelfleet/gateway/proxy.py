"""The request path: route by model, hold while a model starts, retry before the first byte,
relay the answer (SSE chunk by chunk).

Kept lean on purpose (benchmarks/RESULTS.md, Gateway): the body is read once and forwarded as
the same bytes, only the `model` field is parsed, routing is one dict lookup, a handful of
headers is copied as raw bytes, and one lean HTTP/1.1 client (upstream.py) with kept-alive
connections pooled per replica carries all upstream traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from modelfleet.api.headers import INSTANCE_HEADER, SHOULD_RETRY_HEADER
from modelfleet.api.v1alpha1 import Balancing
from modelfleet.gateway.balancer import (
    EjectionPolicy,
    Replica,
    Route,
    pick_replica,
    record_failure,
    record_success,
)
from modelfleet.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from modelfleet.gateway.model import (
    BodyError,
    build_error_body,
    build_switched_off_message,
    extract_model,
)
from modelfleet.gateway.registry import Registry
from modelfleet.gateway.routing import (
    SESSION_HEADER,
    KeyMemory,
    KeyView,
    RoutingConfig,
    extract_prefix,
    extract_session,
    hash_key,
)
from modelfleet.gateway.upstream import (
    UpstreamBodyError,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
)
from modelfleet.gateway.usage import UsageRecorder

log = logging.getLogger(__name__)

# Request headers a replica may need; everything else (hop-by-hop, Host, cookies) stays here.
_FORWARD_HEADERS = frozenset(
    (b"content-type", b"accept", b"authorization", b"x-request-id", b"traceparent")
)
_JSON = "application/json"
_SSE = "text/event-stream"
# An answer bigger than this, or without a length, is streamed through rather than buffered.
_BUFFER_LIMIT = 1 << 20
# How many known models a 404 lists; the error stays small with thousands of models.
_LIST_LIMIT = 20
# Bodies up to this size are counted in the body budget but never refused by it, so a few slow
# clients with large bodies cannot turn ordinary requests away; at most max_client_connections
# of them are in flight (4096 x 64 KiB = 256 MiB with the defaults).
_SMALL_BODY_BYTES = 64 * 1024
# The usage figures of an answer (the whole JSON body, or a stream's usage chunk).
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def _json_doc(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def compute_routing_key(
    config: RoutingConfig, body: bytes, session_header: str | None
) -> int | None:
    """The request's position on the ring for the hashed policies; None for the others, or
    when the request has no prompt (no session) to hash."""
    if not config.hashed:
        return None
    if config.policy == Balancing.SESSION_AFFINITY:
        session = extract_session(session_header, None if session_header else _json_doc(body))
        return hash_key(session.encode()) if session else None
    doc = _json_doc(body)
    prefix = extract_prefix(doc, config.prefix_chars) if doc is not None else None
    return hash_key(prefix.encode()) if prefix else None


def _count_usage(replica: Replica, data: bytes) -> None:
    prompt = _PROMPT_TOKENS.search(data)
    completion = _COMPLETION_TOKENS.search(data)
    if prompt:
        replica.prompt_tokens += int(prompt.group(1))
    if completion:
        replica.completion_tokens += int(completion.group(1))


@dataclass(frozen=True)
class ProxyConfig:
    """The request path's settings, resolved once."""

    max_body_bytes: int
    max_buffered_body_bytes: int
    body_timeout_s: float
    retries: int
    retry_backoff_s: float
    queue_size: int
    cold_start_timeout_s: float
    retry_after_s: int
    ejection: EjectionPolicy
    connect_timeout_s: float
    read_timeout_s: float
    head_timeout_s: float


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str,
    *,
    param: str | None = None,
    retry_after_s: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    if retry_after_s is not None:
        headers = {**(headers or {}), "Retry-After": str(retry_after_s)}
    return web.Response(
        status=status,
        body=build_error_body(status, message, kind, code, param),
        content_type=_JSON,
        headers=headers,
    )


class _Retry(Exception):
    """A try failed before the first byte and may be repeated on another replica."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Failed(Exception):
    """A try failed after the request may have reached the replica: not repeated anywhere."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class Proxy:
    """The inference endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings."""

    def __init__(
        self,
        config: ProxyConfig,
        registry: Registry,
        metrics: GatewayMetrics,
        usage: UsageRecorder,
        upstream: UpstreamClient,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.usage = usage
        self.upstream = upstream
        self.buffered_body_bytes = 0  # reserved by the requests in flight (see _handle)
        self.keys = KeyMemory()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        model = UNKNOWN_MODEL
        status = 500
        try:
            response, model = await self._handle(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away; nginx's code for it
            raise
        finally:
            self.metrics.observe(model, status, time.perf_counter() - started)

    async def _handle(self, request: web.Request) -> tuple[web.StreamResponse, str]:
        cfg = self.config
        length = request.content_length
        if length is not None and length > cfg.max_body_bytes:
            return self._too_large(), UNKNOWN_MODEL
        # Every body in flight together stays under a budget, counted at the size its client
        # declared (the cap when it declares none) from before the first read to the end of
        # the request, as long as the body lives (a retry sends it again).
        reserved = cfg.max_body_bytes if length is None else length
        if (
            reserved > _SMALL_BODY_BYTES
            and self.buffered_body_bytes + reserved > cfg.max_buffered_body_bytes
        ):
            self.metrics.client_refusals.labels("bodies").inc()
            return self._bodies_full(), UNKNOWN_MODEL
        self.buffered_body_bytes += reserved
        try:
            return await self._handle_body(request)
        finally:
            self.buffered_body_bytes -= reserved

    async def _handle_body(self, request: web.Request) -> tuple[web.StreamResponse, str]:
        cfg = self.config
        try:
            # The whole body within the deadline, not each read: a client that drips it gives
            # back its connection and the part buffered so far when the time is up.
            async with asyncio.timeout(cfg.body_timeout_s):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(), UNKNOWN_MODEL
        except TimeoutError:
            self.metrics.client_timeouts.labels("body").inc()
            return await self._body_timeout(request), UNKNOWN_MODEL
        try:
            model = extract_model(body)
        except BodyError as exc:
            return error_response(400, str(exc), "invalid_request_error", "invalid_body"), (
                UNKNOWN_MODEL
            )
        route = self.registry.routes.get(model)
        if route is None and not self.registry.is_synced:
            await self.registry.wait_synced(cfg.cold_start_timeout_s)
            route = self.registry.routes.get(model)
        if route is None:
            return self._unknown_model(), UNKNOWN_MODEL
        if not route.replicas and self.registry.is_switched_off(model):
            return self._switched_off(model), model
        self.usage.touch(model)
        if not route.replicas:
            held = await self._hold(model)
            if isinstance(held, web.Response):
                return held, model
            route = held
        return await self._forward(request, route, model, body), model

    def _too_large(self) -> web.Response:
        limit = self.config.max_body_bytes
        return error_response(
            413,
            f"the request body is larger than this gateway accepts ({limit} bytes)",
            "invalid_request_error",
            "request_too_large",
        )

    def _bodies_full(self) -> web.Response:
        return error_response(
            503,
            "the gateway holds as many request bodies as it may at once; retry later",
            "server_error",
            "gateway_busy",
            retry_after_s=self.config.retry_after_s,
        )

    async def _body_timeout(self, request: web.Request) -> web.Response:
        """408, then the connection is closed at once.

        Without the explicit close aiohttp would go on reading and dropping the rest of the
        body for up to its lingering time (10 s) before closing.
        """
        response = error_response(
            408,
            f"the request body did not arrive within {self.config.body_timeout_s:g} s",
            "invalid_request_error",
            "request_timeout",
        )
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
        return response

    def _unknown_model(self) -> web.Response:
        known = sorted(self.registry.models)
        shown = ", ".join(known[:_LIST_LIMIT])
        more = f" and {len(known) - _LIST_LIMIT} more" if len(known) > _LIST_LIMIT else ""
        message = (
            f"the requested model is not served here; known models: {shown}{more}"
            if known
            else "the requested model is not served here; no models are deployed"
        )
        return error_response(
            404, message, "invalid_request_error", "model_not_found", param="model"
        )

    def _switched_off(self, model: str) -> web.Response:
        """At once, without holding: nothing will start a model whose spec says 0 replicas.

        503 like every other "no replica for this model" answer (proxies and routers in front
        fail over on it), but without Retry-After, since no wait helps, and with
        `x-should-retry: false` so the OpenAI SDKs do not retry it by themselves.
        """
        return error_response(
            503,
            build_switched_off_message(model, self.registry.models[model]),
            "server_error",
            "model_scaled_to_zero",
            param="model",
            headers={SHOULD_RETRY_HEADER: "false"},
        )

    async def _hold(self, model: str) -> Route | web.Response:
        """Wait in the model's bounded queue until it has a ready replica."""
        cfg = self.config
        registry = self.registry
        if registry.queued(model) == 0:
            self.usage.demand(model)  # the first request of a burst asks for a scale-up
        if not registry.hold(model, cfg.queue_size):
            self.metrics.queue_rejections.labels(model, "full").inc()
            return error_response(
                503,
                f"model {model} has no ready replica and its queue is full; retry later",
                "server_error",
                "model_queue_full",
                retry_after_s=cfg.retry_after_s,
            )
        gauge = self.metrics.queue_depth.labels(model)
        gauge.inc()
        try:
            hold_s = registry.hold_timeout_s(model, cfg.cold_start_timeout_s)
            route = await registry.wait_for_replica(model, hold_s)
        finally:
            registry.release(model)
            gauge.dec()
        if route is not None:
            return route
        if registry.is_switched_off(model):  # switched off while this request waited
            return self._switched_off(model)
        if model not in registry.models:  # its ModelDeployments were deleted meanwhile
            return self._unknown_model()
        self.metrics.queue_rejections.labels(model, "timeout").inc()
        return error_response(
            503,
            f"model {model} has no ready replica yet (it is starting; held {hold_s:g} s, "
            "its spec.routing.holdTimeout or the gateway's default); retry later",
            "server_error",
            "model_not_ready",
            retry_after_s=cfg.retry_after_s,
        )

    def _observe_affinity(
        self, route: Route, model: str, key: int, replica: Replica, view: KeyView | None
    ) -> None:
        """Remember where the key went; count the request by result (hit, moved, new) and by
        choice: the key's owner on the ring, the least loaded (a new key of a model whose keys
        rarely come back) or another replica on the ring (a bound, an ejection, a retry)."""
        owner = route.ring.owner(key) if route.ring is not None else None
        if owner is not None and route.replicas[owner] is replica:
            choice = "owner"
        else:
            choice = "least" if view is not None and view.least_loaded else "spill"
        result = self.keys.record(model, key, replica.name)
        self.metrics.observe_affinity(model, result, choice)

    def _upstream_headers(self, request: web.Request) -> bytes:
        """The forwarded request headers as wire bytes, built once per request (not per try).

        Copied from the raw header pairs as the client sent them; the server's parser has
        already refused CR/LF in names and values, so they cannot split the upstream request.
        """
        seen: set[bytes] = set()
        out = []
        for name, value in request.raw_headers:
            key = name.lower()
            if key in _FORWARD_HEADERS and key not in seen:  # the first of duplicates, as before
                seen.add(key)
                out.append(b"%s: %s\r\n" % (name, value))
        if b"content-type" not in seen:
            out.append(b"Content-Type: application/json\r\n")  # the body is JSON, or it is 400
        return b"".join(out)

    async def _forward(
        self, request: web.Request, route: Route, model: str, body: bytes
    ) -> web.StreamResponse:
        cfg = self.config
        tail = b"Content-Length: %d\r\n%s\r\n" % (len(body), self._upstream_headers(request))
        path = request.path
        tried: tuple[Replica, ...] = ()
        last_reason = ""
        key = (
            compute_routing_key(route.config, body, request.headers.get(SESSION_HEADER))
            if route.config.hashed
            else None
        )
        view = None
        if key is not None and route.ring is not None:
            view = self.keys.view(model, key, route.ring.names)
        for attempt in range(cfg.retries + 1):
            replica = pick_replica(route, time.monotonic(), tried, key, view)
            if replica is None:
                break
            if key is not None and attempt == 0:
                self._observe_affinity(route, model, key, replica, view)
            tried += (replica,)
            replica.outstanding += 1
            replica.requests += 1
            try:
                upstream = await self._send(replica, path, tail, body, model)
            except _Failed as exc:
                replica.outstanding -= 1
                return exc.response
            except _Retry as exc:
                replica.outstanding -= 1
                last_reason = exc.reason
                if attempt < cfg.retries:
                    self.metrics.retries.labels(model).inc()
                    # Jittered, growing pause so a burst of retries does not arrive at once.
                    await asyncio.sleep(random.uniform(0, cfg.retry_backoff_s * 2**attempt))
                continue
            except BaseException:
                replica.outstanding -= 1
                raise
            try:
                return await self._relay(request, upstream, replica, model)
            finally:
                replica.outstanding -= 1
        # Every replica refused: 503 when they said they were busy, 502 when unreachable.
        return error_response(
            503 if last_reason in ("status", "") else 502,
            f"no replica of model {model} could take the request; retry later",
            "server_error",
            "upstream_unavailable",
            retry_after_s=cfg.retry_after_s,
        )

    async def _send(
        self, replica: Replica, path: str, tail: bytes, body: bytes, model: str
    ) -> UpstreamResponse:
        """One try; raises _Retry for a failure that may be retried, _Failed for one that may not.

        A request is tried again only when it cannot have reached the replica (no connection,
        see upstream.py) or the replica declined it with a bodiless 502/503. Once it may have
        reached the replica (closed without an answer, no answer in time, a malformed head) it
        may be running there, or may have crashed the replica: sending it on to the next one
        could run it twice or crash that one too, so the client gets a 502 or 504 instead.
        """
        head = replica.heads.get(path)
        if head is None:  # request line and Host, built once per replica and path
            head = replica.heads[path] = (
                f"POST {path} HTTP/1.1\r\nHost: {replica.address}\r\n".encode()
            )
        try:
            upstream = await self.upstream.post(replica.address, head + tail, body)
        except UpstreamError as exc:
            reason = exc.reason
            log.debug("try on replica %s failed: %s", replica.name, exc)
            if exc.sent:
                self._failed(replica, model, reason)
                raise _Failed(self._no_answer(model, exc)) from None
        else:
            if upstream.status in (502, 503) and upstream.content_length == 0:
                upstream.release()
                reason = "status"
            else:
                if upstream.status < 500:
                    record_success(replica)
                else:
                    self._failed(replica, model, "status")
                return upstream
        self._failed(replica, model, reason)
        raise _Retry(reason)

    def _no_answer(self, model: str, exc: UpstreamError) -> web.Response:
        """502 or 504 for a request a replica may have received but did not answer properly."""
        # The replica's address stays in the log; the client learns what went wrong.
        log.warning("a replica of model %s failed a request it may have received: %s", model, exc)
        not_resent = "the request was not sent to another replica, since it may be running there"
        if exc.reason == "timeout":
            return error_response(
                504,
                f"a replica of model {model} did not answer in time; {not_resent}",
                "server_error",
                "upstream_timeout",
            )
        if exc.reason == "protocol":
            what = f"sent a malformed answer ({exc.problem})"
        else:
            what = "closed the connection without an answer"
        return error_response(
            502,
            f"a replica of model {model} {what}; {not_resent}",
            "server_error",
            "upstream_bad_answer",
        )

    def _failed(self, replica: Replica, model: str, reason: str) -> None:
        self.metrics.upstream_errors.labels(model, reason).inc()
        if record_failure(replica, time.monotonic(), self.config.ejection):
            self.metrics.ejections.labels(model).inc()
            log.warning(
                "replica %s (%s) of model %s failed %d times in a row; skipping it until %.0fs "
                "from now",
                replica.name,
                replica.address,
                model,
                self.config.ejection.failures,
                replica.ejected_until - time.monotonic(),
            )

    async def _relay(
        self, request: web.Request, upstream: UpstreamResponse, replica: Replica, model: str
    ) -> web.StreamResponse:
        """Send the replica's answer on: small JSON whole, anything else chunk by chunk."""
        up_headers = upstream.headers
        content_type = up_headers.get("content-type", _JSON)
        headers = {
            "Content-Type": content_type,
            # The replica this gateway chose, by Pod name: authoritative, whatever the replica
            # itself says (a real vLLM sends no such header).
            INSTANCE_HEADER: replica.name,
        }
        length = upstream.content_length
        sse = _SSE in content_type
        response: web.StreamResponse | None = None
        try:
            if length is not None and length <= _BUFFER_LIMIT and not sse:
                data = await upstream.read()
                if upstream.status == 200:
                    _count_usage(replica, data)
                return web.Response(status=upstream.status, body=data, headers=headers)
            if sse:
                headers["Cache-Control"] = "no-cache"
                headers["X-Accel-Buffering"] = "no"  # no buffering in an nginx in front
            upstream.check()  # an error in what came with the head: 502, not a 200 cut short
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
            async for chunk in upstream.iter_chunks():
                if b'"completion_tokens"' in chunk:  # a stream's usage chunk
                    _count_usage(replica, chunk)
                await response.write(chunk)
            await response.write_eof()
            return response
        except UpstreamBodyError as exc:
            # The replica broke off mid-answer. Before anything went out the client gets a 502;
            # after that all we can do is end the connection so it sees the answer is cut.
            upstream.close()
            self._failed(replica, model, "body")
            log.debug("replica %s broke off its answer: %s", replica.name, exc)
            if response is None:
                what = (
                    f"sent a malformed answer ({exc.problem})"
                    if exc.malformed
                    else "broke off its answer"
                )
                return error_response(
                    502,
                    f"a replica of model {model} {what}; retry later",
                    "server_error",
                    "upstream_broke_off",
                )
            raise
        except BaseException:
            # The client left: close the upstream connection so the replica stops generating,
            # rather than returning it to the pool half read.
            upstream.close()
            raise
        finally:
            upstream.release()
