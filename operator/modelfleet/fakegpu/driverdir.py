"""The fake GPU driver directory: a node's GPU inventory, their health, and who holds memory.

```
<dir>/gpus.yaml                    the inventory, in the agent's GPU file format:
                                   {node, gpus: [{index, uuid, product, memoryMib, maxPowerW}]}
<dir>/health/<uuid>                present while that GPU is unhealthy; holds the reason
<dir>/memory/<uuid>/<holder>.json  memory one process holds on that GPU, until expiresAt
<dir>/nvml-faults.json             optional: NVML errors the fake NVML answers (test knobs):
                                   {all: ERROR|null, gpus: {<uuid>: {<field>: ERROR}}}
```

Every file is written whole to a temporary name in the same directory and renamed into place, so
a reader sees the old content or the new, never half of it. Readers skip names that start with a
dot (the temporary files).

Memory records are written by processes in other containers (other PID namespaces, other users)
that share nothing but this directory, so no PID or lock can tell whether a holder still lives.
Instead each record carries an expiry in wall-clock time (one host, one clock) that its holder
pushes forward with a heartbeat; a record past its expiry no longer counts, which is what makes a
killed container's memory come free. A clean exit removes the records at once. `memory/` and its
per-GPU directories are world-writable with the sticky bit (like /tmp): any container user may add
a record, only its owner (or root: the device plugin sweeps long-expired ones) may remove it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modelfleet.gpufile import GpuFileError, SimGpu, parse_gpu_file

log = logging.getLogger(__name__)

#: Where the device plugin mounts the driver directory in every container it gives GPUs to.
CONTAINER_DIR = "/run/modelfleet/fake-gpu"
#: The variable (set by the device plugin's Allocate) that tells a container where that is.
DIR_ENV = "MODELFLEET_FAKE_GPU_DIR"
INVENTORY_FILE = "gpus.yaml"
HEALTH_DIR = "health"
MEMORY_DIR = "memory"
NVML_FAULTS_FILE = "nvml-faults.json"
#: The readings an NVML fault can fail, by the agent's names for them.
FAULT_FIELDS = ("memory", "utilization", "temperature", "power")
#: The NVML errors a fault can answer, by NVML's names (NVML_ERROR_<name>).
FAULT_ERRORS = (
    "NOT_SUPPORTED",
    "UNKNOWN",
    "GPU_IS_LOST",
    "RESET_REQUIRED",
    "UNINITIALIZED",
    "DRIVER_NOT_LOADED",
    "TIMEOUT",
    "NO_PERMISSION",
)
#: A holder rewrites its records this often, each valid for RECORD_TTL_S.
HEARTBEAT_S = 5.0
#: Three heartbeats: one late write does not free the memory, a killed holder's goes in 15 s.
RECORD_TTL_S = 15.0
#: Records expired this long ago are deleted by the device plugin's sweep.
SWEEP_AFTER_S = 300.0

_SHARED_DIR_MODE = 0o1777  # world-writable, sticky: as /tmp
_HOLDER_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class DriverDirError(ValueError):
    """The driver directory cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """Memory one holder keeps on one GPU, counted while `expires_at` (Unix time) is ahead."""

    holder: str
    memory_mib: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class NvmlFaults:
    """NVML errors the fake NVML answers: every call (`all`), or one reading of one GPU."""

    all: str | None = None
    gpus: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # uuid -> field -> error

    def error_for(self, uuid: str, reading: str) -> str | None:
        return self.gpus.get(uuid, {}).get(reading)

    def to_json(self) -> str:
        gpus = {u: dict(sorted(f.items())) for u, f in sorted(self.gpus.items()) if f}
        return json.dumps({"all": self.all, "gpus": gpus}, indent=2) + "\n"


def parse_nvml_faults(text: str, source: str = NVML_FAULTS_FILE) -> NvmlFaults:
    """The faults file; DriverDirError naming the file and what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise DriverDirError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DriverDirError(f"{source}: expected an object with 'all' and 'gpus'")
    every = doc.get("all")
    if every is not None:
        _check_error(every, f"{source}: all")
    gpus: dict[str, dict[str, str]] = {}
    raw = doc.get("gpus")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise DriverDirError(f"{source}: gpus: expected an object of GPU UUIDs")
    for uuid, readings in raw.items():
        if not isinstance(readings, dict):
            raise DriverDirError(f"{source}: gpus.{uuid}: expected an object of readings")
        for reading, error in readings.items():
            if reading not in FAULT_FIELDS:
                raise DriverDirError(
                    f"{source}: gpus.{uuid}.{reading}: not a reading; one of "
                    f"{', '.join(FAULT_FIELDS)}"
                )
            _check_error(error, f"{source}: gpus.{uuid}.{reading}")
        gpus[str(uuid)] = {str(k): str(v) for k, v in readings.items()}
    return NvmlFaults(all=every, gpus=gpus)


def _check_error(error: object, where: str) -> None:
    if error not in FAULT_ERRORS:
        raise DriverDirError(f"{where}: {error!r} is not one of {', '.join(FAULT_ERRORS)}")


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` in one rename (a reader sees the old file or the new one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _visible(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


class DriverDir:
    """One node's fake driver directory; every method is a few small blocking file operations."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def inventory_path(self) -> Path:
        return self.path / INVENTORY_FILE

    @property
    def health_dir(self) -> Path:
        return self.path / HEALTH_DIR

    @property
    def memory_dir(self) -> Path:
        return self.path / MEMORY_DIR

    # --- inventory -------------------------------------------------------------------------

    def init_inventory(self, node: str, gpus: Sequence[SimGpu]) -> bool:
        """Write the inventory and the directories; True when anything changed (idempotent).

        The health of GPUs that stay and the memory records are left as they are.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        self.health_dir.mkdir(exist_ok=True)
        changed = self._shared_dir(self.memory_dir)
        for gpu in gpus:
            changed = self._shared_dir(self.memory_dir / gpu.uuid) or changed
        doc = {"node": node, "gpus": [gpu.model_dump(by_alias=True) for gpu in gpus]}
        text = yaml.safe_dump(doc, sort_keys=False)
        try:
            current = self.inventory_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            write_atomic(self.inventory_path, text)
            changed = True
        return changed

    @staticmethod
    def _shared_dir(path: Path) -> bool:
        created = not path.is_dir()
        path.mkdir(exist_ok=True)
        if path.stat().st_mode & 0o7777 != _SHARED_DIR_MODE:
            os.chmod(path, _SHARED_DIR_MODE)  # mkdir's mode is cut by the umask
            created = True
        return created

    def read_inventory(self) -> tuple[str, list[SimGpu]]:
        """(node, GPUs by index); DriverDirError when the inventory is missing or malformed."""
        try:
            text = self.inventory_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DriverDirError(
                f"no fake GPU inventory at {self.inventory_path} ({exc.strerror}): "
                "run `modelfleet sim-gpu-driver init` for this node first"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DriverDirError(f"{self.inventory_path}: not valid YAML: {exc}") from None
        node = str(doc.get("node") or "") if isinstance(doc, dict) else ""
        try:
            gpus = parse_gpu_file(text, node or "fake-gpu-node", source=str(self.inventory_path))
        except GpuFileError as exc:
            raise DriverDirError(str(exc)) from None
        return node, sorted(gpus, key=lambda g: g.index)

    @staticmethod
    def find_gpu(gpus: Sequence[SimGpu], key: str) -> SimGpu:
        """The GPU whose index or UUID is `key`; DriverDirError naming the known ones."""
        for gpu in gpus:
            if key == gpu.uuid or (key.isdigit() and int(key) == gpu.index):
                return gpu
        known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus)
        raise DriverDirError(f"no GPU {key!r} in the inventory; known: {known}")

    # --- health ----------------------------------------------------------------------------

    def set_health(self, uuid: str, unhealthy_reason: str | None) -> None:
        """Mark the GPU unhealthy with a reason, or healthy again (None)."""
        self.health_dir.mkdir(parents=True, exist_ok=True)
        path = self.health_dir / uuid
        if unhealthy_reason is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        write_atomic(path, unhealthy_reason.strip() or "marked unhealthy")

    def read_health(self) -> dict[str, str]:
        """UUID -> reason, for every unhealthy GPU."""
        try:
            names = _visible(os.listdir(self.health_dir))
        except FileNotFoundError:
            return {}
        out: dict[str, str] = {}
        for name in names:
            try:
                reason = (self.health_dir / name).read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                continue  # marked healthy while we listed
            out[name] = reason or "marked unhealthy"
        return out

    # --- NVML faults ----------------------------------------------------------------------

    @property
    def nvml_faults_path(self) -> Path:
        return self.path / NVML_FAULTS_FILE

    def read_nvml_faults(self) -> NvmlFaults:
        """The injected NVML faults (none without the file); DriverDirError when malformed."""
        try:
            text = self.nvml_faults_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return NvmlFaults()
        return parse_nvml_faults(text, str(self.nvml_faults_path))

    def write_nvml_faults(self, faults: NvmlFaults) -> None:
        """Replace the faults; no fault at all removes the file."""
        if faults.all is None and not any(faults.gpus.values()):
            with contextlib.suppress(FileNotFoundError):
                self.nvml_faults_path.unlink()
            return
        write_atomic(self.nvml_faults_path, faults.to_json())

    def set_nvml_fault(self, uuid: str, reading: str, error: str | None) -> NvmlFaults:
        """Make one reading of one GPU fail with `error`, or read normally again (None)."""
        if reading not in FAULT_FIELDS:
            raise DriverDirError(f"no reading {reading!r}; one of {', '.join(FAULT_FIELDS)}")
        if error is not None:
            _check_error(error, "error")
        current = self.read_nvml_faults()
        gpus = {u: dict(f) for u, f in current.gpus.items()}
        readings = gpus.setdefault(uuid, {})
        if error is None:
            readings.pop(reading, None)
        else:
            readings[reading] = error
        faults = NvmlFaults(all=current.all, gpus={u: f for u, f in gpus.items() if f})
        self.write_nvml_faults(faults)
        return faults

    def set_nvml_fault_all(self, error: str | None) -> NvmlFaults:
        """Make every NVML call (nvmlInit too) fail with `error`, or stop that (None)."""
        if error is not None:
            _check_error(error, "error")
        current = self.read_nvml_faults()
        faults = NvmlFaults(all=error, gpus=current.gpus)
        self.write_nvml_faults(faults)
        return faults

    def clear_nvml_faults(self, uuid: str | None = None) -> NvmlFaults:
        """Remove every fault, or (with `uuid`) every fault of that GPU."""
        if uuid is None:
            faults = NvmlFaults()
        else:
            current = self.read_nvml_faults()
            faults = NvmlFaults(
                all=current.all, gpus={u: f for u, f in current.gpus.items() if u != uuid}
            )
        self.write_nvml_faults(faults)
        return faults

    # --- memory records --------------------------------------------------------------------

    def write_memory(
        self, uuid: str, holder: str, memory_mib: int, *, ttl_s: float = RECORD_TTL_S
    ) -> None:
        """Record (or renew) `holder`'s memory on GPU `uuid`, valid for `ttl_s` from now."""
        directory = self.memory_dir / uuid
        if not directory.is_dir():
            self._shared_dir(directory)
        record = {
            "holder": holder,
            "memoryMib": int(memory_mib),
            "expiresAt": round(time.time() + ttl_s, 3),
        }
        write_atomic(directory / f"{holder}.json", json.dumps(record))

    def remove_memory(self, uuid: str, holder: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.memory_dir / uuid / f"{holder}.json").unlink()

    def read_memory(self, uuid: str, *, now: float | None = None) -> list[MemoryRecord]:
        """The live records on GPU `uuid` (expired and unreadable ones are skipped)."""
        now = time.time() if now is None else now
        return [r for r in self._records(uuid) if r.expires_at > now]

    def used_mib(self, uuid: str, *, now: float | None = None) -> int:
        """Memory in use on GPU `uuid`: the sum of its live records."""
        return sum(r.memory_mib for r in self.read_memory(uuid, now=now))

    def _records(self, uuid: str) -> list[MemoryRecord]:
        directory = self.memory_dir / uuid
        try:
            names = _visible(os.listdir(directory))
        except FileNotFoundError:
            return []
        out: list[MemoryRecord] = []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                doc = json.loads((directory / name).read_text(encoding="utf-8"))
                out.append(
                    MemoryRecord(
                        holder=str(doc["holder"]),
                        memory_mib=max(0, int(doc["memoryMib"])),
                        expires_at=float(doc["expiresAt"]),
                    )
                )
            except FileNotFoundError:
                continue  # removed while we listed
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring memory record %s: %s", directory / name, exc)
        return out

    def sweep_expired(
        self, *, older_than_s: float = SWEEP_AFTER_S, now: float | None = None
    ) -> int:
        """Delete records expired more than `older_than_s` ago; how many went."""
        now = time.time() if now is None else now
        try:
            uuids = _visible(os.listdir(self.memory_dir))
        except FileNotFoundError:
            return 0
        removed = 0
        for uuid in uuids:
            for record in self._records(uuid):
                if record.expires_at < now - older_than_s:
                    with contextlib.suppress(OSError):
                        (self.memory_dir / uuid / f"{record.holder}.json").unlink()
                        removed += 1
        return removed


def build_holder_name(env: dict[str, str] | None = None) -> str:
    """A name for this process's records, unique across containers: pod (or host), PID, nonce."""
    env = dict(os.environ) if env is None else env
    who = env.get("POD_NAME") or socket.gethostname() or "process"
    name = f"{who}-{os.getpid()}-{secrets.token_hex(3)}"
    return _HOLDER_UNSAFE.sub("_", name)[:200]


def parse_visible_devices(value: str, gpus: Sequence[SimGpu]) -> tuple[list[SimGpu], list[str]]:
    """The GPUs NVIDIA_VISIBLE_DEVICES names (UUIDs or indexes, `all`, `none`, `void`) and the
    entries that name no GPU of the inventory."""
    text = value.strip()
    if text in ("", "none", "void"):
        return [], []
    if text == "all":
        return list(gpus), []
    found: list[SimGpu] = []
    unknown: list[str] = []
    for raw in text.split(","):
        key = raw.strip()
        if not key:
            continue
        try:
            gpu = DriverDir.find_gpu(gpus, key)
        except DriverDirError:
            unknown.append(key)
            continue
        if gpu not in found:
            found.append(gpu)
    return found, unknown
