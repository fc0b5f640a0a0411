"""The fake GPU driver directory: a node's GPU inventory, their health, and who holds memory.

```
<dir>/gpus.yaml                    the inventory, in the agent's GPU file format:
                                   {node, gpus: [{index, uuid, product, memoryMib, maxPowerW}]}
<dir>/health/<uuid>                present while that GPU is unhealthy; holds the reason
<dir>/memory/<uuid>/<holder>.json  memory one process holds on that GPU, until expiresAt
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
