"""The Helm chart on the real control plane: installed, upgraded, uninstalled, and least privilege.

The local cluster's CRD is applied by hack/cluster.sh, outside Helm, so installs here use
`crds.enabled=false`; the path where the release itself creates the CRD (and the parallelModels
hook that goes with it) runs on a second, private control plane of the test's own, so that
deleting and re-creating the CRD touches no other test. ServiceMonitors are left out of the
server-side checks: the Prometheus Operator's CRD is not in the cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from clusterkit import ROOT, Cluster, helm, kubectl, wait_for

from modelfleet.kube.client import ApiError, KubeClient

CHART = ROOT / "charts" / "modelfleet"
MD_PATH = "/apis/modelfleet.io/v1alpha1/namespaces/{ns}/modeldeployments"
MD_API = "modelfleet.io/v1alpha1/ModelDeployment"
sys.path.insert(0, str(ROOT / "tests" / "unit" / "chart"))
from chart_helpers import VALUE_SETS  # noqa: E402


def release_name() -> str:
    return f"mf{uuid.uuid4().hex[:6]}"


async def make_namespace(kube: KubeClient, labels: dict[str, str] | None = None) -> str:
    name = f"t-chart-{uuid.uuid4().hex[:8]}"
    await kube.create("/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}})
    return name


async def delete_namespace(kube: KubeClient, name: str) -> None:
    try:
        await kube.delete(f"/api/v1/namespaces/{name}", propagationPolicy="Background")
    except ApiError as exc:
        if not exc.not_found:
            raise


@pytest.fixture
async def extra_namespace(kube: KubeClient) -> AsyncIterator[str]:
    name = await make_namespace(kube)
    yield name
    await delete_namespace(kube, name)


def objects_of(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


async def md_names(kube: KubeClient, namespace: str) -> dict[str, dict[str, Any]]:
    reply = await kube.get(MD_PATH.format(ns=namespace))
    return {item["metadata"]["name"]: item for item in reply["items"]}


# ---- every value set, accepted by the API server ----


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
async def test_api_server_accepts_every_rendered_object(
    cluster: Cluster, namespace: str, extra_namespace: str, name: str
) -> None:
    values = json.loads(json.dumps(VALUE_SETS[name]))
    if "watchNamespaces" in values:
        values["watchNamespaces"] = [extra_namespace]
    rendered = await helm(
        cluster,
        "template",
        release_name(),
        str(CHART),
        "--namespace",
        namespace,
        "--api-versions",
        MD_API,
        values=values,
    )
    objects = [o for o in objects_of(rendered.stdout) if o["kind"] != "ServiceMonitor"]
    assert len(objects) >= 8
    for obj in objects:
        if obj["metadata"].get("namespace") is None and obj["kind"] in ("ModelDeployment",):
            obj["metadata"]["namespace"] = namespace
    text = "\n---\n".join(yaml.safe_dump(o) for o in objects)
    done = await kubectl(cluster, "apply", "--dry-run=server", "-f", "-", input=text, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(server dry run)") == len(objects)


# ---- install, upgrade, uninstall (CRD from the cluster) ----


async def test_install_upgrade_uninstall(cluster: Cluster, kube: KubeClient) -> None:
    # Pods under the restricted Pod Security level: the workloads' pods are only created when
    # they meet it, so a rollout proves the security contexts, not only the manifests.
    ns = await make_namespace(kube, {"pod-security.kubernetes.io/enforce": "restricted"})
    release = release_name()
    values: dict[str, Any] = {
        "crds": {"enabled": False},
        # The test nodes have no RuntimeClass "nvidia" (the default platform's); the NVIDIA
        # runtime, where there is one, is their default runtime (hack/fake_nvidia_runtime.py).
        "agent": {"podResources": {"enabled": False}, "platform": "none"},
        "parallelModels": {"gemma3-4B": 2, "Llama-3.2-1B": {"model": "meta-llama/x"}},
    }
    try:
        await helm(
            cluster,
            "install",
            release,
            str(CHART),
            "-n",
            ns,
            "--wait",
            "--timeout",
            "120s",
            values=values,
        )
        manifest = (await helm(cluster, "get", "manifest", release, "-n", ns)).stdout
        objects = objects_of(manifest)
        for obj in objects:
            scope = ["-n", obj["metadata"]["namespace"]] if obj["metadata"].get("namespace") else []
            await kubectl(cluster, "get", obj["kind"], obj["metadata"]["name"], *scope)
        kinds = {o["kind"] for o in objects}
        expected = {"Deployment", "DaemonSet", "NetworkPolicy", "ModelDeployment", "ClusterRole"}
        assert expected <= kinds
        pods = await kube.get(f"/api/v1/namespaces/{ns}/pods")
        components = sorted(
            p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods["items"]
        )
        nodes = await kube.get("/api/v1/nodes", labelSelector="nvidia.com/gpu.present=true")
        assert components == ["agent"] * len(nodes["items"]) + ["gateway"] * 2 + ["operator"] * 2

        models = await md_names(kube, ns)
        assert sorted(models) == ["gemma3-4b", "llama-3-2-1b"]
        assert models["gemma3-4b"]["spec"]["replicas"] == 2
        assert models["gemma3-4b"]["spec"]["servedModelName"] == "gemma3-4B"

        values["parallelModels"] = {"gemma3-4B": 3}
        await helm(cluster, "upgrade", release, str(CHART), "-n", ns, values=values)
        models = await md_names(kube, ns)
        assert sorted(models) == ["gemma3-4b"]
        assert models["gemma3-4b"]["spec"]["replicas"] == 3

        await helm(cluster, "uninstall", release, "-n", ns, "--wait")
        assert await md_names(kube, ns) == {}
        for kind in ("clusterrole", "clusterrolebinding"):
            left = await kubectl(
                cluster, "get", kind, "-l", f"app.kubernetes.io/instance={release}"
            )
            assert "No resources found" in left.stderr + left.stdout
        await kubectl(cluster, "get", "crd", "modeldeployments.modelfleet.io")
    finally:
        await helm(cluster, "uninstall", release, "-n", ns, check=False)
        await delete_namespace(kube, ns)


async def test_pod_security_admission_refuses_the_pod_resources_agent(
    cluster: Cluster, kube: KubeClient
) -> None:
    # The negative control for the rollout above: the same namespace level refuses the default
    # agent, which mounts the kubelet socket, naming what is wrong.
    ns = await make_namespace(kube, {"pod-security.kubernetes.io/enforce": "restricted"})
    try:
        # platform none: a RuntimeClass the cluster lacks would be refused first, by the
        # RuntimeClass admission plugin, before Pod Security is asked.
        rendered = await helm(
            cluster, "template", "psa", str(CHART), "-n", ns, values={"agent": {"platform": "none"}}
        )
        (daemonset,) = [o for o in objects_of(rendered.stdout) if o["kind"] == "DaemonSet"]
        spec = dict(daemonset["spec"]["template"]["spec"])
        spec["serviceAccountName"] = "default"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent"}, "spec": spec}
        done = await kubectl(
            cluster,
            "create",
            "-n",
            ns,
            "--dry-run=server",
            "-f",
            "-",
            input=json.dumps(pod),
            check=False,
        )
        assert done.returncode != 0
        assert 'violates PodSecurity "restricted:latest"' in done.stderr
        assert "hostPath" in done.stderr
        assert "runAsUser=0" in done.stderr
    finally:
        await delete_namespace(kube, ns)


# ---- least privilege, asked of the API server ----


async def can_i(cluster: Cluster, sa: str, *args: str) -> bool:
    done = await kubectl(cluster, "auth", "can-i", "--as", sa, *args, check=False)
    assert done.stdout.strip() in ("yes", "no"), done.stderr
    return done.stdout.strip() == "yes"


async def test_service_accounts_can_do_their_work_and_nothing_else(
    cluster: Cluster, kube: KubeClient, namespace: str, extra_namespace: str
) -> None:
    release = release_name()
    await helm(
        cluster,
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        values={"crds": {"enabled": False}},
    )
    try:
        sa = f"system:serviceaccount:{namespace}:{release}-modelfleet"
        operator, gateway, agent = f"{sa}-operator", f"{sa}-gateway", f"{sa}-agent"
        other = extra_namespace
        lease = f"{release}-modelfleet-operator"
        allowed = [
            (operator, "create", "pods", "-n", other),
            (operator, "delete", "pods", "-n", other),
            (operator, "patch", "modeldeployments.modelfleet.io", "-n", other),
            (
                operator,
                "update",
                "modeldeployments.modelfleet.io",
                "--subresource=status",
                "-n",
                other,
            ),
            (operator, "create", "services", "-n", other),
            (operator, "create", "events", "-n", other),
            (operator, "create", "events.events.k8s.io", "-n", other),
            (operator, "list", "nodes"),
            (operator, "get", "events", "-n", other),
            (operator, "create", "leases.coordination.k8s.io", "-n", namespace),
            (operator, "update", f"leases.coordination.k8s.io/{lease}", "-n", namespace),
            (gateway, "watch", "pods", "-n", other),
            (gateway, "patch", "modeldeployments.modelfleet.io", "-n", other),
            (agent, "create", "tokenreviews.authentication.k8s.io"),
        ]
        denied = [
            (operator, "get", "secrets", "-n", namespace),
            (operator, "list", "secrets", "--all-namespaces"),
            (operator, "delete", "nodes"),
            (operator, "watch", "customresourcedefinitions.apiextensions.k8s.io"),
            (operator, "patch", "nodes"),
            (operator, "*", "*", "-n", namespace),
            (operator, "delete", "modeldeployments.modelfleet.io", "-n", other),
            (operator, "create", "pods", "--subresource=exec", "-n", other),
            (operator, "get", "pods", "--subresource=log", "-n", other),
            (operator, "create", "leases.coordination.k8s.io", "-n", other),
            (operator, "update", "leases.coordination.k8s.io/someone-else", "-n", namespace),
            (operator, "create", "clusterroles.rbac.authorization.k8s.io"),
            (gateway, "get", "secrets", "-n", namespace),
            (gateway, "create", "pods", "-n", other),
            (gateway, "delete", "modeldeployments.modelfleet.io", "-n", other),
            (gateway, "list", "nodes"),
            (agent, "list", "pods", "-n", namespace),
            (agent, "get", "secrets", "-n", namespace),
            (agent, "create", "subjectaccessreviews.authorization.k8s.io"),
            (agent, "create", "serviceaccounts", "--subresource=token", "-n", namespace),
        ]
        for who, *query in allowed:
            assert await can_i(cluster, who, *query), f"{who} should be allowed: {query}"
        for who, *query in denied:
            assert not await can_i(cluster, who, *query), f"{who} must be denied: {query}"
        for who in (operator, gateway, agent):
            listing = await kubectl(cluster, "auth", "can-i", "--list", "--as", who, "-n", other)
            for line in listing.stdout.splitlines()[1:]:
                resource, _urls, _names, verbs = _columns(line)
                assert "[*]" not in verbs, f"{who}: {line}"
                assert not resource.startswith("secrets"), f"{who}: {line}"
    finally:
        await helm(cluster, "uninstall", release, "-n", namespace, check=False)


def _columns(line: str) -> tuple[str, str, str, str]:
    # kubectl auth can-i --list prints: Resources  Non-Resource URLs  Resource Names  Verbs
    parts = line.split()
    verbs_at = next(i for i, p in enumerate(parts) if p.startswith("["))
    verbs = " ".join(parts[verbs_at:])
    return parts[0], "", " ".join(parts[1:verbs_at]), verbs


async def test_watch_namespace_confines_operator_and_gateway(
    cluster: Cluster, kube: KubeClient, namespace: str, extra_namespace: str
) -> None:
    third = await make_namespace(kube)
    release = release_name()
    try:
        await helm(
            cluster,
            "install",
            release,
            str(CHART),
            "-n",
            namespace,
            values={
                "crds": {"enabled": False},
                "watchNamespaces": [extra_namespace],
                "agent": {"auth": {"mode": "token"}},
            },
        )
        sa = f"system:serviceaccount:{namespace}:{release}-modelfleet"
        operator, gateway, agent = f"{sa}-operator", f"{sa}-gateway", f"{sa}-agent"
        # Token mode: the agents need the API for nothing.
        assert not await can_i(cluster, agent, "create", "tokenreviews.authentication.k8s.io")
        assert not await can_i(cluster, agent, "list", "pods", "-n", namespace)
        assert await can_i(cluster, operator, "create", "pods", "-n", extra_namespace)
        assert await can_i(cluster, operator, "list", "pods", "-n", namespace)  # agents
        assert not await can_i(cluster, operator, "create", "pods", "-n", namespace)
        assert not await can_i(cluster, operator, "create", "pods", "-n", third)
        # Reading the pods bound to nodes (what they request counts at placement): list and
        # watch everywhere, nothing more outside its namespaces.
        assert await can_i(cluster, operator, "list", "pods", "--all-namespaces")
        assert await can_i(cluster, operator, "watch", "pods", "--all-namespaces")
        assert not await can_i(cluster, operator, "get", "pods", "-n", third)
        assert not await can_i(cluster, operator, "delete", "pods", "-n", third)
        assert not await can_i(
            cluster, operator, "patch", "modeldeployments.modelfleet.io", "-n", third
        )
        assert await can_i(cluster, operator, "list", "nodes")
        assert await can_i(cluster, gateway, "list", "pods", "-n", extra_namespace)
        assert not await can_i(cluster, gateway, "list", "pods", "-n", third)
        assert not await can_i(cluster, gateway, "list", "pods", "--all-namespaces")
    finally:
        await helm(cluster, "uninstall", release, "-n", namespace, check=False)
        await delete_namespace(kube, third)


# ---- a fresh cluster: the release creates the CRD and the models ----


@pytest.fixture
def private_cluster(cluster: Cluster, tmp_path: Path) -> Iterator[Cluster]:
    """A second control plane of this test's own (hack/cluster.sh from a copy of hack/).

    cluster.sh keys a cluster by its checkout, so a copy of hack/ and crds/ under tmp_path is a
    separate cluster with its own name, files and ports; it is stopped again after the test.
    """
    root = tmp_path / "cp"
    shutil.copytree(ROOT / "hack", root / "hack")
    shutil.copytree(ROOT / "crds", root / "crds")
    # Simulated nodes only: this test is about the chart, and real nodes take a minute more.
    env = {**os.environ, "PYTHON": sys.executable, "REAL_NODES": "0"}
    script = str(root / "hack" / "cluster.sh")
    up = subprocess.run([script, "up"], capture_output=True, text=True, env=env, timeout=280)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        kubeconfig = root / ".cluster" / "kubeconfig"
        delete = subprocess.run(
            [
                str(cluster.kubectl),
                "--kubeconfig",
                str(kubeconfig),
                "delete",
                "crd",
                "modeldeployments.modelfleet.io",
                "--wait",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert delete.returncode == 0, delete.stderr
        yield Cluster(kubeconfig=kubeconfig, bin_dir=cluster.bin_dir)
    finally:
        down = subprocess.run([script, "down"], capture_output=True, text=True, env=env)
        assert down.returncode == 0, down.stderr[-3000:]


async def test_fresh_install_creates_the_crd_and_the_models(private_cluster: Cluster) -> None:
    cluster = private_cluster
    release, ns = "modelfleet", "modelfleet"
    values: dict[str, Any] = {"parallelModels": {"gemma3-4B": 2}}

    async def replicas() -> dict[str, int]:
        done = await kubectl(cluster, "get", "modeldeployments", "-n", ns, "-o", "json")
        return {
            i["metadata"]["name"]: i["spec"]["replicas"] for i in json.loads(done.stdout)["items"]
        }

    await helm(
        cluster, "install", release, str(CHART), "-n", ns, "--create-namespace", values=values
    )
    crd = json.loads(
        (
            await kubectl(cluster, "get", "crd", "modeldeployments.modelfleet.io", "-o", "json")
        ).stdout
    )
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
    assert await replicas() == {"gemma3-4b": 2}

    # The first upgrade adopts the hook-created models; the next one changes them.
    await helm(cluster, "upgrade", release, str(CHART), "-n", ns, values=values)
    manifest = (await helm(cluster, "get", "manifest", release, "-n", ns)).stdout
    assert "kind: ModelDeployment" in manifest
    values["parallelModels"] = {"gemma3-4B": 3, "qwen": 1}
    await helm(cluster, "upgrade", release, str(CHART), "-n", ns, values=values)
    assert await replicas() == {"gemma3-4b": 3, "qwen": 1}

    await helm(cluster, "uninstall", release, "-n", ns, "--wait")
    await wait_for(lambda: _no_models(cluster, ns), timeout=30, what="models deleted")
    await kubectl(cluster, "get", "crd", "modeldeployments.modelfleet.io")  # kept


async def _no_models(cluster: Cluster, ns: str) -> bool:
    done = await kubectl(cluster, "get", "modeldeployments", "-n", ns, "-o", "name")
    return done.stdout.strip() == ""


# ---- the operator under the chart's ServiceAccount, doing its whole job ----


def service_account_kubeconfig(admin: Path, token: str, namespace: str, out: Path) -> Path:
    """A kubeconfig for the same API server that authenticates with a ServiceAccount token."""
    config = yaml.safe_load(admin.read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c for c in config["clusters"] if c["name"] == context["context"]["cluster"])
    out.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "sa",
                        "context": {
                            "cluster": cluster["name"],
                            "user": "sa",
                            "namespace": namespace,
                        },
                    }
                ],
                "current-context": "sa",
            }
        )
    )
    return out


@pytest.mark.timeout(300)
async def test_operator_and_gateway_under_the_charts_service_accounts_run_the_models(
    cluster: Cluster, kube: KubeClient, namespace: str, tmp_path: Path
) -> None:
    """helm install, then the real operator and gateway with nothing but the chart's
    ServiceAccounts (tokens from the TokenRequest API) and the chart's environment.

    The operator takes its Lease, finds the chart's agents (run by the pod runner; TokenReview
    auth with the audience-bound token), places the parallelModels replicas and reports them
    ready; the gateway routes a request to them and records its time on the ModelDeployment.
    Any permission either lacks fails the test.
    """
    kit = pytest.importorskip("operator_kit", reason="the operator has not landed on main")
    from modelfleet.api import labels

    await kit.create_test_nodes(kube, namespace, 2, 2)
    runner = kit.start_pod_runner(cluster, tmp_path)
    next(runner)
    release = release_name()
    processes: list[ChartProcess] = []
    try:
        values = {
            "crds": {"enabled": False},
            "watchNamespaces": [namespace],
            "agent": {
                "backend": "simulated",
                "podResources": {"enabled": False},
                "nodeSelector": {kit.TEST_POOL_LABEL: namespace},
                "tolerations": [{"operator": "Exists"}],
            },
            "parallelModels": {"gemma3-4B": {"replicas": 2, "gpu": {"count": 1}}},
        }
        await helm(cluster, "install", release, str(CHART), "-n", namespace, values=values)
        manifest = objects_of(
            (await helm(cluster, "get", "manifest", release, "-n", namespace)).stdout
        )

        async def agents_ready() -> bool:
            pods = await kube.get(
                f"/api/v1/namespaces/{namespace}/pods",
                labelSelector=f"app.kubernetes.io/component=agent,app.kubernetes.io/instance={release}",
            )
            return len(pods["items"]) == 2 and all(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in p["status"].get("conditions", [])
                )
                for p in pods["items"]
            )

        await wait_for(agents_ready, timeout=60, what="the chart's 2 agents ready")

        operator = await start_from_chart(
            cluster,
            manifest,
            "-operator",
            namespace,
            tmp_path,
            {
                "MODELFLEET_METRICS_HOST": "127.0.0.1",
                "MODELFLEET_METRICS_PORT": str(kit.free_port()),
                "MODELFLEET_POLL_INTERVAL_S": "1",
            },
            audience=values_default("agent", "auth", "audience"),
        )
        processes.append(operator)
        log = operator.log
        env = operator.env

        async def ready() -> dict[str, Any] | None:
            if operator.process.returncode is not None:
                raise AssertionError(f"the operator exited:\n{log.read_text()[-4000:]}")
            md = (await md_names(kube, namespace)).get("gemma3-4b", {})
            status = md.get("status", {})
            return md if status.get("readyReplicas") == 2 else None

        try:
            md = await wait_for(
                ready, timeout=150, interval=0.5, what="gemma3-4b with 2 ready replicas"
            )
        except AssertionError as exc:
            seen = (await md_names(kube, namespace)).get("gemma3-4b", {}).get("status")
            replica_logs = "".join(
                f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                for p in sorted((tmp_path / "pod-logs").glob("**/*gemma3-4b*"))
                if p.is_file()
            )
            raise AssertionError(
                f"{exc}\nstatus: {seen}\noperator log:\n{log.read_text(errors='replace')[-6000:]}"
                f"\nreplica logs:{replica_logs}"
            ) from None
        pods = await kube.get(
            f"/api/v1/namespaces/{namespace}/pods",
            labelSelector=f"{labels.LABEL_DEPLOYMENT}=gemma3-4b",
        )
        assert len(pods["items"]) == 2
        assert {p["spec"]["nodeName"] for p in pods["items"]} <= set(
            await _pool_nodes(kube, kit.TEST_POOL_LABEL, namespace)
        )
        assert md["status"]["observedGeneration"] == md["metadata"]["generation"]
        lease = await kube.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{env['MODELFLEET_LEASE_NAME']}"
        )
        assert lease["spec"]["holderIdentity"]
        # The gateway under its own ServiceAccount routes to the replicas and records the use.
        gateway_port = kit.free_port()
        gateway = await start_from_chart(
            cluster,
            manifest,
            "-gateway",
            namespace,
            tmp_path,
            {"MODELFLEET_GATEWAY_HOST": "127.0.0.1", "MODELFLEET_GATEWAY_PORT": str(gateway_port)},
        )
        processes.append(gateway)
        reply = await wait_for(
            lambda: chat(gateway_port, "gemma3-4B"), timeout=60, what="a reply through the gateway"
        )
        assert reply["model"] == "gemma3-4B"

        async def use_recorded() -> bool:
            md = (await md_names(kube, namespace))["gemma3-4b"]
            return labels.ANN_LAST_REQUEST in md["metadata"].get("annotations", {})

        await wait_for(use_recorded, timeout=60, what="the gateway's last-request annotation")
        # Deleting the models while the operator runs: it removes the replicas and its finalizer.
        await kubectl(
            cluster,
            "delete",
            "modeldeployments",
            "--all",
            "-n",
            namespace,
            "--wait",
            "--timeout=60s",
        )
        for started in processes:
            output = started.log.read_text(errors="replace")
            assert "Forbidden" not in output, output[-4000:]
            assert " 403" not in output, output[-4000:]
    finally:
        for started in reversed(processes):
            await started.stop()
        await helm(cluster, "uninstall", release, "-n", namespace, check=False)
        await kit.delete_test_nodes(kube, namespace)
        next(runner, None)


async def _pool_nodes(kube: KubeClient, label: str, pool: str) -> list[str]:
    nodes = await kube.get("/api/v1/nodes", labelSelector=f"{label}={pool}")
    return [n["metadata"]["name"] for n in nodes["items"]]


def values_default(*path: str) -> Any:
    node: Any = yaml.safe_load((CHART / "values.yaml").read_text())
    for part in path:
        node = node[part]
    return node


@dataclass
class ChartProcess:
    """A modelfleet component run here as the chart would run it in a pod."""

    process: asyncio.subprocess.Process
    log: Path
    env: dict[str, str]

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def start_from_chart(
    cluster: Cluster,
    manifest: list[dict[str, Any]],
    suffix: str,
    namespace: str,
    tmp: Path,
    overrides: dict[str, str],
    audience: str | None = None,
) -> ChartProcess:
    """Start the container of the chart's Deployment `*suffix` as a local process.

    It gets the container's arguments and literal environment, and the credentials its pod
    would have: a token of the Deployment's ServiceAccount from the TokenRequest API (in a
    kubeconfig, for the API server) and, with `audience`, a second one for the agents, in the
    file the projected volume would hold.
    """
    deployment = next(
        o for o in manifest if o["kind"] == "Deployment" and o["metadata"]["name"].endswith(suffix)
    )
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sa = pod["serviceAccountName"]
    token = (await kubectl(cluster, "create", "token", sa, "-n", namespace)).stdout.strip()
    kubeconfig = service_account_kubeconfig(
        cluster.kubeconfig, token, namespace, tmp / f"kubeconfig{suffix}"
    )
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    if audience is not None:
        agent_token = await kubectl(
            cluster, "create", "token", sa, "-n", namespace, "--audience", audience
        )
        token_file = tmp / f"agent-token{suffix}"
        token_file.write_text(agent_token.stdout.strip())
        env["MODELFLEET_AGENT_TOKEN_FILE"] = str(token_file)
    env |= overrides
    log = tmp / f"process{suffix}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "modelfleet",
            *container["args"],
            "--kubeconfig",
            str(kubeconfig),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | env,
            cwd=ROOT,
        )
    return ChartProcess(process, log, env)


async def chat(port: int, model: str) -> dict[str, Any] | None:
    """One chat completion through the gateway; None until it answers 200."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as reply,
        ):
            if reply.status != 200:
                return None
            data: dict[str, Any] = await reply.json()
            return data
    except (aiohttp.ClientError, TimeoutError):
        return None
