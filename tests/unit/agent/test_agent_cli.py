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


def start_agent(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """`modelfleet agent ARGS` on a free loopback port: the process and its base URL."""
    port = free_port()
    listen = ("--host", "127.0.0.1", "--port", str(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfleet", "agent", *args, *listen],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_until_answering(proc: subprocess.Popen[str], url: str, status: int = 200) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if get(url)[0] == status:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer {status} in 30 s"
        time.sleep(0.05)


def test_simulated_agent_serves_all_endpoints() -> None:
    proc, base = start_agent(
        "--backend", "simulated", "--gpus", "8", env=agent_env(NODE_NAME="cli-node")
    )
    try:
        wait_until_answering(proc, f"{base}/readyz")
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


def test_nvml_without_driver_runs_not_ready_and_says_why() -> None:
    """The real nvidia-ml-py on this GPU-less machine: no library, as in a pod without the NVIDIA
    runtime. The agent stays up (live, not ready), says why and what to set, and keeps trying."""
    proc, base = start_agent("--backend", "nvml", env=agent_env(NODE_NAME="gpu-node-a"))
    try:
        wait_until_answering(proc, f"{base}/healthz")
        wait_until_answering(proc, f"{base}/readyz", status=503)
        _, body = get(f"{base}/readyz")
        readyz = json.loads(body)
        status, body = get(f"{base}/v1/gpus")
        report = json.loads(body)
        _, metrics = get(f"{base}/metrics")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert readyz["status"] == "not ready"
    reason = readyz["reason"]
    assert "NVML could not start" in reason
    assert "NVML_ERROR_LIBRARY_NOT_FOUND" in reason
    assert "agent.runtimeClassName" in reason
    assert "agent.platform" in reason
    assert "re-initialising NVML every 5 s to 300 s" in reason
    assert status == 200
    assert report["ready"] is False
    assert report["reason"] == reason
    assert report["gpus"] == []
    assert b"modelfleet_agent_ready 0.0" in metrics
    # One line says it, with the fix; no traceback.
    said = [line for line in out.splitlines() if "NVML could not start" in line]
    assert len(said) == 1, out
    assert "ERROR" in said[0]
    assert "--backend simulated" in said[0]
    assert "Traceback" not in out


def test_nvml_backend_without_nvidia_ml_py_exits_1(tmp_path: Path) -> None:
    """A broken image (no nvidia-ml-py) is the one NVML failure no retry mends: exit 1."""
    (tmp_path / "pynvml.py").write_text('raise ImportError("No module named pynvml")\n')
    env = agent_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = run_agent("--backend", "nvml", "--host", "127.0.0.1", "--port", "0", env=env)
    assert result.returncode == 2  # --port 0 is refused first: settings are checked before NVML
    result = run_agent(
        "--backend", "nvml", "--host", "127.0.0.1", "--port", str(free_port()), env=env
    )
    assert result.returncode == 1, result.stderr
    assert "nvidia-ml-py (pynvml) cannot be imported" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_setting_has_a_flag() -> None:
    assert set(FLAGS.values()) == set(AgentSettings.model_fields)
