"""Pure parts of the gateway: API objects to routing facts, the model field, error bodies.

Nothing here does I/O; the watch loops and the proxy call these functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet.api import labels
from modelfleet.api.ownership import NEVER, ClaimKey, claim_key, controller_uid, served_name
from modelfleet.api.v1alpha1 import Balancing

_BALANCING = frozenset(b.value for b in Balancing)

DEFAULT_ENGINE_PORT = 8000


@dataclass(frozen=True)
class RoutingOverrides:
    """spec.routing as written: None for each field left to the gateway's default."""

    policy: Balancing | None = None
    prefix_chars: int | None = None
    load_factor: float | None = None
    engine_load: bool | None = None


@dataclass(frozen=True)
class DeploymentInfo:
    """What the gateway needs from one ModelDeployment."""

    namespace: str
    name: str
    served_name: str
    replicas: int
    balancing: Balancing | None  # the annotation's value when valid, else None (the global default)
    port: int
    uid: str = ""  # a Pod is its replica only when the Pod's controller has this UID
    claim: ClaimKey = (NEVER, "", "")  # its claim on the served name: the oldest holds it
    routing: RoutingOverrides | None = None  # spec.routing, when it sets anything

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class PodEndpoint:
    """One ready replica Pod: where it listens and which model it serves."""

    namespace: str
    name: str
    deployment: str
    served_name: str | None  # from the Pod's annotation; None: take the deployment's
    host: str
    port: int
    owner_uid: str = ""  # the UID of the ModelDeployment that controls it; "" for none

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_deployment(obj: dict[str, Any]) -> DeploymentInfo | None:
    """DeploymentInfo of a ModelDeployment object; None when it has no name."""
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        return None
    spec = obj.get("spec") or {}
    balancing = (meta.get("annotations") or {}).get(labels.ANN_BALANCING)
    routing = parse_routing(spec.get("routing"))
    if routing is not None and routing.policy is not None:
        balancing = routing.policy  # spec.routing.policy wins over the older annotation
    replicas = spec.get("replicas", 1)
    port = (spec.get("engine") or {}).get("port") or DEFAULT_ENGINE_PORT
    return DeploymentInfo(
        namespace=meta.get("namespace") or "",
        name=name,
        served_name=served_name(obj),
        replicas=replicas if isinstance(replicas, int) else 1,
        balancing=Balancing(balancing) if balancing in _BALANCING else None,
        port=port if isinstance(port, int) else DEFAULT_ENGINE_PORT,
        uid=str(meta.get("uid") or ""),
        claim=claim_key(obj),
        routing=routing,
    )


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if low <= value <= high else None


def parse_routing(raw: Any) -> RoutingOverrides | None:
    """spec.routing of a ModelDeployment object; fields out of range are left to the defaults
    (the API server's schema refuses them first; this only guards against older objects)."""
    if not isinstance(raw, dict) or not raw:
        return None
    policy = raw.get("policy")
    chars = _number(raw.get("prefixChars"), 16, 65536)
    factor = _number(raw.get("loadFactor"), 1.0, 10.0)
    engine = raw.get("engineLoad")
    return RoutingOverrides(
        policy=Balancing(policy) if policy in _BALANCING else None,
        prefix_chars=int(chars) if chars is not None else None,
        load_factor=factor,
        engine_load=engine if isinstance(engine, bool) else None,
    )


def _pod_ready(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    if status.get("phase") not in (None, "Running"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def _container_port(obj: dict[str, Any]) -> int | None:
    """The port vLLM listens on: a container port named http, else the first one declared."""
    first: int | None = None
    for container in (obj.get("spec") or {}).get("containers") or ():
        for port in container.get("ports") or ():
            number = port.get("containerPort")
            if not isinstance(number, int):
                continue
            if port.get("name") == "http":
                return number
            if first is None:
                first = number
    return first


def parse_replica_pod(obj: dict[str, Any], default_port: int | None = None) -> PodEndpoint | None:
    """PodEndpoint of a Pod with the replica labels that may take traffic; None for any other.

    The labels only say what it claims to be: the registry routes to it only when its
    controller is the labelled ModelDeployment (`owner_uid`, api/ownership.py).

    Only Pods that are Ready, not terminating and have an IP qualify: the gateway never routes to
    a Pod that is not ready, and routes from Pods rather than EndpointSlices because Kubernetes
    refuses loopback addresses (the local control plane's simulated Pods) in EndpointSlices.
    """
    meta = obj.get("metadata") or {}
    pod_labels = meta.get("labels") or {}
    if pod_labels.get(labels.LABEL_COMPONENT) != labels.COMPONENT_REPLICA:
        return None
    deployment = pod_labels.get(labels.LABEL_DEPLOYMENT)
    if not deployment or meta.get("deletionTimestamp") or not _pod_ready(obj):
        return None
    host = (obj.get("status") or {}).get("podIP")
    port = _container_port(obj) or default_port or DEFAULT_ENGINE_PORT
    if not host:
        return None
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return PodEndpoint(
        namespace=meta.get("namespace") or "",
        name=meta.get("name") or "",
        deployment=deployment,
        served_name=(meta.get("annotations") or {}).get(labels.ANN_SERVED_MODEL) or None,
        host=host,
        port=port,
        owner_uid=controller_uid(meta),
    )


# A key named "model" whose opening quote is not escaped: inside a JSON string every quote is
# preceded by a backslash, so this only matches real object keys.
_MODEL_KEY = re.compile(rb'(?<!\\)"model"\s*:\s*"([^"\\]{0,512})"')
_MODEL_KEY_ANY = re.compile(rb'(?<!\\)"model"\s*:')


class BodyError(ValueError):
    """The request body cannot be routed; the message is safe to return (no input echoed)."""


def _at_top_level(body: bytes, at: int) -> bool:
    """True when position `at` lies directly inside the body's outermost object: the body opens
    with `{` and no other `{` or `[` comes before `at` (one inside a string only costs the fast
    path, never a wrong answer)."""
    start = len(body) - len(body.lstrip())
    if body[start : start + 1] != b"{":
        return False
    return body.find(b"{", start + 1, at) < 0 and body.find(b"[", start + 1, at) < 0


def extract_model(body: bytes) -> str:
    """The request's top-level `model`, without decoding the whole body when that is safe.

    The fast path takes one unescaped `"model":` key with a plain string value, and only when
    no `{` or `[` stands between the body's opening brace and the key: then the key is the
    object's own, not one nested inside another value (`{"x": {"model": "a"}}` names no model).
    Anything else (several keys named model, escapes in the value, a key after a nested value)
    falls back to a full JSON parse.
    """
    keys = _MODEL_KEY_ANY.findall(body)
    if len(keys) == 1:
        match = _MODEL_KEY.search(body)
        if match and _at_top_level(body, match.start()):
            try:
                return match.group(1).decode()
            except UnicodeDecodeError:
                raise BodyError("the model field is not valid UTF-8") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise BodyError("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BodyError("the request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise BodyError("the request body has no model field; set model to a served model name")
    return model


def build_error_body(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> bytes:
    """The OpenAI error shape. Messages are written by the gateway, never copied from input."""
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code or str(status)}},
        separators=(",", ":"),
    ).encode()


def build_switched_off_message(model: str, deployments: Sequence[DeploymentInfo]) -> str:
    """Why a model switched off by its spec gets no replica, and the command that starts it.

    `deployments` are the registry's for the name: only the one that holds it.
    """
    first = deployments[0]
    if not first.namespace:  # static upstreams: no ModelDeployment behind the name
        return (
            f"model {model} has no upstream: --static-upstreams lists none for it; "
            f"add one as {model}=http://HOST:PORT"
        )
    return (
        f"model {model} is scaled to zero by its spec (spec.replicas: 0), so nothing will start "
        f"it for this request; start it with `kubectl scale modeldeployment/{first.name} "
        f"--replicas=1 -n {first.namespace}`, or set spec.replicas above 0"
    )
