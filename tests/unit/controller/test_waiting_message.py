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
    last = {"terminated": {"exitCode": 1, "message": "401 Client Error: gated repo\n..."}}
    text = compute_waiting_message({"reason": "CrashLoopBackOff", "message": "back-off 40s"}, last)
    assert text == "last run ended with exit code 1: 401 Client Error: gated repo ..."
    assert len(compute_waiting_message({"message": "x" * 1000}, {})) == 300
