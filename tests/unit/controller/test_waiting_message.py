"""What status says about a replica that will not come up by itself: the kubelet's own words."""

from __future__ import annotations

from typing import Any

from modelfleet.controller.observed import compute_waiting_message, parse_pod


def replica(container_status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "gemma-instance-1",
            "namespace": "ml",
            "labels": {
                "app.kubernetes.io/component": "replica",
                "modelfleet.io/deployment": "gemma",
            },
        },
        "spec": {"nodeName": "n", "containers": [{"name": "vllm"}]},
        "status": {"phase": "Pending", "containerStatuses": [container_status]},
    }


def test_a_missing_token_secret_is_named() -> None:
    # As a kubelet reports a secretKeyRef whose Secret does not exist.
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}
    pod = parse_pod(replica({"name": "vllm", "state": {"waiting": waiting}}))
    assert pod is not None
    assert (pod.waiting_reason, pod.waiting_message) == (
        "CreateContainerConfigError",
        'secret "hf" not found',
    )


def test_a_crash_loop_says_how_the_last_run_ended() -> None:
    # The message is the run's log tail (FallbackToLogsOnError): its end is kept.
    log_tail = "INFO loading\n" * 100 + "ERROR cannot start: 401 Client Error: gated repo\n"
    last = {"terminated": {"exitCode": 1, "message": log_tail}}
    text = compute_waiting_message({"reason": "CrashLoopBackOff", "message": "back-off 40s"}, last)
    assert text.startswith("last run ended with exit code 1: ...")
    assert text.endswith("ERROR cannot start: 401 Client Error: gated repo")
    assert len(text) <= 300
    assert len(compute_waiting_message({"message": "x" * 1000}, {})) == 300
