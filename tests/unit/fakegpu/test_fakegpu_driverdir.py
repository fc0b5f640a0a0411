"""The fake GPU driver directory: inventory, health, memory records and their expiry, and the
`modelfleet sim-gpu-driver` command."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from modelfleet.cli import main
from modelfleet.fakegpu.driverdir import (
    DriverDir,
    DriverDirError,
    NvmlFaults,
    build_holder_name,
    parse_visible_devices,
)
from modelfleet.gpufile import build_sim_gpus, load_gpu_file, simulated_uuid

NODE = "gpu-node-a"


def init(path: Path, count: int = 2) -> DriverDir:
    driver = DriverDir(path)
    driver.init_inventory(NODE, build_sim_gpus(NODE, count, 81559, "NVIDIA-H100-80GB-HBM3"))
    return driver


def test_init_writes_the_agents_gpu_file_format(tmp_path: Path) -> None:
    driver = init(tmp_path / "d")
    # The simulated backend's --gpu-file reads the same file.
    gpus = load_gpu_file(str(driver.inventory_path), NODE)
    assert [(g.index, g.uuid, g.memory_mib) for g in gpus] == [
        (0, simulated_uuid(NODE, 0), 81559),
        (1, simulated_uuid(NODE, 1), 81559),
    ]
    assert driver.read_inventory() == (NODE, gpus)
    for directory in (driver.memory_dir, driver.memory_dir / gpus[0].uuid):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o1777  # any container user may write


def test_init_is_idempotent_and_keeps_health(tmp_path: Path) -> None:
    driver = init(tmp_path / "d")
    uuid = simulated_uuid(NODE, 1)
    driver.set_health(uuid, "XID 79")
    before = driver.inventory_path.stat().st_mtime_ns
    assert not driver.init_inventory(NODE, build_sim_gpus(NODE, 2, 81559, "NVIDIA-H100-80GB-HBM3"))
    assert driver.inventory_path.stat().st_mtime_ns == before
    assert driver.read_health() == {uuid: "XID 79"}


def test_missing_inventory_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DriverDirError, match="sim-gpu-driver init"):
        DriverDir(tmp_path).read_inventory()


def test_health_files(tmp_path: Path) -> None:
    driver = init(tmp_path)
    uuid = simulated_uuid(NODE, 0)
    driver.set_health(uuid, "  overheated\n")
    assert driver.read_health() == {uuid: "overheated"}
    assert not list(driver.health_dir.glob(".*"))  # no temporary file left behind
    driver.set_health(uuid, None)
    driver.set_health(uuid, None)  # healthy twice is fine
    assert driver.read_health() == {}


def test_memory_records_sum_per_device_and_expire(tmp_path: Path) -> None:
    driver = init(tmp_path)
    a, b = simulated_uuid(NODE, 0), simulated_uuid(NODE, 1)
    driver.write_memory(a, "pod-x-1-aaaa", 1000, ttl_s=10)
    driver.write_memory(a, "pod-y-1-bbbb", 500, ttl_s=1)
    driver.write_memory(b, "pod-x-1-aaaa", 7, ttl_s=10)
    now = time.time()
    assert driver.used_mib(a, now=now) == 1500
    assert driver.used_mib(b, now=now) == 7
    # A holder that stops renewing (a killed container) stops counting once its record expires.
    assert driver.used_mib(a, now=now + 2) == 1000
    driver.write_memory(a, "pod-y-1-bbbb", 500, ttl_s=10)  # a heartbeat renews it
    assert driver.used_mib(a, now=now + 2) == 1500
    driver.remove_memory(a, "pod-y-1-bbbb")
    assert [r.holder for r in driver.read_memory(a)] == ["pod-x-1-aaaa"]


def test_a_record_expires_in_real_time(tmp_path: Path) -> None:
    driver = init(tmp_path)
    a = simulated_uuid(NODE, 0)
    driver.write_memory(a, "short", 100, ttl_s=0.2)
    assert driver.used_mib(a) == 100
    deadline = time.monotonic() + 3
    while driver.used_mib(a) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert driver.used_mib(a) == 0


def test_sweep_removes_only_long_expired_records(tmp_path: Path) -> None:
    driver = init(tmp_path)
    a = simulated_uuid(NODE, 0)
    driver.write_memory(a, "old", 1, ttl_s=1)
    driver.write_memory(a, "live", 2, ttl_s=1000)
    assert driver.sweep_expired(older_than_s=60, now=time.time() + 30) == 0
    assert driver.sweep_expired(older_than_s=60, now=time.time() + 120) == 1
    assert [r.holder for r in driver._records(a)] == ["live"]


def test_a_garbled_record_is_skipped(tmp_path: Path) -> None:
    driver = init(tmp_path)
    a = simulated_uuid(NODE, 0)
    (driver.memory_dir / a / "bad.json").write_text("{not json")
    driver.write_memory(a, "good", 5)
    assert driver.used_mib(a) == 5


@pytest.mark.parametrize(
    ("value", "indexes", "unknown"),
    [
        pytest.param("all", [0, 1, 2], [], id="all"),
        pytest.param("", [], [], id="empty"),
        pytest.param("void", [], [], id="void"),
        pytest.param("none", [], [], id="none"),
        pytest.param("2,0", [2, 0], [], id="indexes in order"),
        pytest.param("UUID1, 1", [1], [], id="uuid and index of one GPU"),
        pytest.param("GPU-nope,7", [], ["GPU-nope", "7"], id="unknown"),
    ],
)
def test_parse_visible_devices(value: str, indexes: list[int], unknown: list[str]) -> None:
    gpus = build_sim_gpus(NODE, 3, 100, "X")
    value = value.replace("UUID1", gpus[1].uuid)
    found, missing = parse_visible_devices(value, gpus)
    assert [g.index for g in found] == indexes
    assert missing == unknown


def test_holder_names_are_unique_and_file_safe() -> None:
    a = build_holder_name({"POD_NAME": "ml/gemma instance"})
    b = build_holder_name({"POD_NAME": "ml/gemma instance"})
    assert a != b
    assert a.startswith("ml_gemma_instance-")
    assert "/" not in a
    assert " " not in a


def test_cli_init_and_set_health(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "fake-gpu")
    args = ["--dir", d, "--node", NODE, "--count", "4", "--memory-mib", "1024", "--product", "P"]
    assert main(["sim-gpu-driver", "init", *args]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["sim-gpu-driver", "init", *args]) == 0
    assert "unchanged" in capsys.readouterr().out
    driver = DriverDir(d)
    assert len(driver.read_inventory()[1]) == 4
    uuid3 = simulated_uuid(NODE, 3)
    assert (
        main(["sim-gpu-driver", "set-health", "--dir", d, "--gpu", "3", "--unhealthy", "hot"]) == 0
    )
    assert driver.read_health() == {uuid3: "hot"}
    assert main(["sim-gpu-driver", "set-health", "--dir", d, "--gpu", uuid3, "--healthy"]) == 0
    assert driver.read_health() == {}
    capsys.readouterr()
    assert main(["sim-gpu-driver", "set-health", "--dir", d, "--gpu", "9", "--healthy"]) == 2
    assert "no GPU '9' in the inventory" in capsys.readouterr().err


def test_cli_init_refuses_a_bad_node_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dir", str(tmp_path), "--node", "Bad_Node", "--count", "1"]
    assert main(["sim-gpu-driver", "init", *args, "--memory-mib", "1", "--product", "P"]) == 2
    assert "not a DNS subdomain" in capsys.readouterr().err


def test_nvml_faults_round_trip_and_clear(tmp_path: Path) -> None:
    driver = init(tmp_path)
    a, b = simulated_uuid(NODE, 0), simulated_uuid(NODE, 1)
    assert driver.read_nvml_faults() == NvmlFaults()
    driver.set_nvml_fault(a, "power", "NOT_SUPPORTED")
    driver.set_nvml_fault(b, "memory", "UNKNOWN")
    driver.set_nvml_fault_all("UNKNOWN")
    faults = driver.read_nvml_faults()
    assert faults.all == "UNKNOWN"
    assert faults.error_for(a, "power") == "NOT_SUPPORTED"
    assert faults.error_for(a, "memory") is None
    driver.set_nvml_fault_all(None)
    driver.set_nvml_fault(a, "power", None)
    assert driver.read_nvml_faults() == NvmlFaults(gpus={b: {"memory": "UNKNOWN"}})
    driver.clear_nvml_faults(b)
    # No fault left: no file, which is the format before faults existed.
    assert not driver.nvml_faults_path.exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[", "not valid JSON"),
        ('{"all": "BROKEN"}', "'BROKEN' is not one of"),
        ('{"gpus": {"GPU-x": {"clocks": "UNKNOWN"}}}', "not a reading"),
        ('{"gpus": []}', "expected an object of GPU UUIDs"),
    ],
)
def test_malformed_nvml_faults_name_the_problem(tmp_path: Path, text: str, words: str) -> None:
    driver = init(tmp_path)
    driver.nvml_faults_path.write_text(text)
    with pytest.raises(DriverDirError, match=words):
        driver.read_nvml_faults()


def test_cli_set_fault(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    driver = init(tmp_path, 4)
    d = str(driver.path)
    uuid1 = simulated_uuid(NODE, 1)
    fault = ["sim-gpu-driver", "set-fault", "--dir", d]
    assert main([*fault, "--gpu", "1", "--field", "power", "--error", "UNKNOWN"]) == 0
    assert capsys.readouterr().out == f"{uuid1} power: NVML_ERROR_UNKNOWN\n"
    assert main([*fault, "--all", "UNKNOWN"]) == 0
    assert driver.read_nvml_faults().all == "UNKNOWN"
    assert main([*fault, "--gpu", uuid1, "--field", "power", "--clear"]) == 0
    assert capsys.readouterr().out.endswith("every NVML call: NVML_ERROR_UNKNOWN\n")
    assert main([*fault, "--clear"]) == 0
    assert capsys.readouterr().out == "no NVML faults\n"
    assert not driver.nvml_faults_path.exists()
    # Half a fault is refused with a plain message.
    assert main([*fault, "--gpu", "1", "--field", "power"]) == 2
    assert "--gpu needs --field and --error" in capsys.readouterr().err
    assert main([*fault, "--all", "UNKNOWN", "--gpu", "1"]) == 2
    assert "--all stands alone" in capsys.readouterr().err
    assert main([*fault, "--gpu", "9", "--clear"]) == 2
    assert "no GPU '9'" in capsys.readouterr().err
