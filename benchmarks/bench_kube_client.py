"""Why modelfleet has its own small Kubernetes client: memory and CPU of the official one.

Measures, each in a fresh interpreter: resident memory after importing the client, and the CPU
time to turn a LIST reply of N pods into usable objects (the official client's typed models
versus plain dicts from json.loads). Offline: no cluster needed, the reply is synthesized.
Last line: key=value pairs.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

PODS = 1000
RUNS = 5

IMPORT_OFFICIAL = "import kubernetes.client, kubernetes.config; kubernetes.client.CoreV1Api()"
IMPORT_OWN = "import modelfleet.kube"

PARSE = r"""
import json, time, resource
N = {n}
pod = {{
  "apiVersion": "v1", "kind": "Pod",
  "metadata": {{"name": "gemma-instance-1", "namespace": "models", "uid": "u",
    "labels": {{"app.kubernetes.io/component": "replica", "modelfleet.io/deployment": "gemma"}},
    "annotations": {{"modelfleet.io/gpus": "node-a:0"}}, "resourceVersion": "1",
    "creationTimestamp": "2026-11-22T10:00:00Z"}},
  "spec": {{"nodeName": "node-a", "containers": [{{"name": "vllm", "image": "vllm/vllm-openai",
    "args": ["--model", "m", "--port", "8000"],
    "resources": {{"limits": {{"nvidia.com/gpu": "1"}}}},
    "ports": [{{"containerPort": 8000, "name": "http"}}],
    "readinessProbe": {{"httpGet": {{"path": "/health", "port": 8000}}}}}}]}},
  "status": {{"phase": "Running", "podIP": "127.1.0.5",
    "conditions": [{{"type": "Ready", "status": "True",
      "lastTransitionTime": "2026-11-22T10:00:05Z"}}]}}
}}
body = json.dumps({{"apiVersion": "v1", "kind": "PodList", "metadata": {{"resourceVersion": "9"}},
                   "items": [pod] * N}}).encode()
{setup}
t0 = time.process_time()
for _ in range(5):
    {parse}
cpu_ms = (time.process_time() - t0) / 5 * 1000
print(cpu_ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

OFFICIAL_SETUP = """
import kubernetes.client
api = kubernetes.client.ApiClient()
text = body.decode()
"""
OFFICIAL_PARSE = "api.deserialize(text, 'V1PodList', 'application/json')"
OWN_SETUP = ""
OWN_PARSE = "json.loads(body)"


def run(code: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def rss_after(statement: str) -> float:
    code = (
        f"{statement}\nimport resource\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    return run(code)[0]


def main() -> None:
    base = statistics.median(rss_after("pass") for _ in range(RUNS))
    official_rss = statistics.median(rss_after(IMPORT_OFFICIAL) for _ in range(RUNS)) - base
    own_rss = statistics.median(rss_after(IMPORT_OWN) for _ in range(RUNS)) - base
    official = [
        run(PARSE.format(n=PODS, setup=OFFICIAL_SETUP, parse=OFFICIAL_PARSE)) for _ in range(RUNS)
    ]
    own = [run(PARSE.format(n=PODS, setup=OWN_SETUP, parse=OWN_PARSE)) for _ in range(RUNS)]
    official_ms = statistics.median(r[0] for r in official)
    own_ms = statistics.median(r[0] for r in own)
    print(
        f"import RSS over a bare interpreter: kubernetes {official_rss:.1f} MiB, "
        f"modelfleet.kube {own_rss:.1f} MiB"
    )
    print(
        f"LIST of {PODS} pods to objects: kubernetes {official_ms:.1f} ms CPU, "
        f"json.loads {own_ms:.1f} ms CPU"
    )
    print(
        f"official_import_mib={official_rss:.1f} own_import_mib={own_rss:.1f} "
        f"official_list_ms={official_ms:.1f} own_list_ms={own_ms:.1f} pods={PODS}"
    )


if __name__ == "__main__":
    main()
