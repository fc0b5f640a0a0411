"""`modelfleet agent` as a real process: serves the endpoints, stops on SIGTERM, and refuses bad
options with a message that names the option."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from modelfleet.agent.cli import FLAGS
from modelfleet.settings import AgentSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
    env.pop("NODE_NAME", None)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.update(extra)
    return env


def run_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or agent_env(),
        check=False,
    )


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_simulated_agent_serves_all_endpoints() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelfleet",
            "agent",
            "--backend",
            "simulated",
            "--gpus",
            "8",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=agent_env(NODE_NAME="cli-node"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if get(f"{base}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "agent did not become ready in 30 s"
            time.sleep(0.05)
        status, body = get(f"{base}/v1/gpus")
        assert status == 200
        report = json.loads(body)
        assert report["node"] == "cli-node"  # from NODE_NAME, the downward API
        assert [g["gpuId"] for g in report["gpus"]] == [f"cli-node:{i}" for i in range(8)]
        status, body = get(f"{base}/metrics")
        assert status == 200
        assert b"DCGM_FI_DEV_FB_FREE{" in body
        assert get(f"{base}/healthz")[0] == 200
        status, body = get(f"{base}/missing")
        assert status == 404
        assert json.loads(body)["status"] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "0"], {}, "--port=0"),
        (["--port", "70000"], {}, "--port=70000"),
        (["--poll-interval", "-1"], {}, "--poll-interval"),
        (["--gpus", "65"], {}, "--gpus"),
        ([], {"MODELFLEET_AGENT_PORT": "nope"}, "MODELFLEET_AGENT_PORT"),
        ([], {"MODELFLEET_AGENT_GPUS": "-3"}, "MODELFLEET_AGENT_GPUS"),
        (["--node", "Not_A_Node"], {}, "--node"),
        (["--gpu-file", "/nonexistent/gpus.yaml"], {}, "--gpu-file"),
        (["--auth", "token"], {}, "--token-file"),
        (["--auth", "tokenreview"], {}, "--kubeconfig"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], {}, "--kubeconfig"),
        (["--pod-resources-timeout", "0"], {}, "--pod-resources-timeout"),
        ([], {"MODELFLEET_AGENT_POD_RESOURCES_TIMEOUT_S": "x"}, "POD_RESOURCES_TIMEOUT_S"),
    ],
)
def test_bad_options_exit_nonzero_naming_the_option(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run_agent("--backend", "simulated", "--host", "127.0.0.1", *args, env=agent_env(**env))
    assert result.returncode != 0
    assert named in result.stderr, result.stderr


@pytest.mark.parametrize("args", [["--port", "abc"], ["--backend", "cuda"]])
def test_argparse_errors_name_the_flag(args: list[str]) -> None:
    result = run_agent(*args)
    assert result.returncode == 2
    assert args[0] in result.stderr


def test_bad_gpu_file_names_the_file(tmp_path: Path) -> None:
    gpu_file = tmp_path / "gpus.yaml"
    gpu_file.write_text("- {memoryMib: -5}\n")
    result = run_agent("--backend", "simulated", "--gpu-file", str(gpu_file))
    assert result.returncode != 0
    assert "--gpu-file" in result.stderr
    assert "GPU #0" in result.stderr


def test_nvml_without_driver_exits_plainly() -> None:
    """The real nvidia-ml-py on this GPU-less machine: no library, so NVML cannot start."""
    result = run_agent("--backend", "nvml", "--host", "127.0.0.1", "--port", str(free_port()))
    assert result.returncode == 1
    assert "NVML could not start" in result.stderr
    assert "--backend simulated" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_setting_has_a_flag() -> None:
    assert set(FLAGS.values()) == set(AgentSettings.model_fields)
