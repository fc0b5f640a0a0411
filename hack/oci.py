"""A small OCI image writer: layers and a config in, an OCI image-layout tar archive out.

Standard library only, so it runs under any Python 3.11 (root's included) with nothing installed.
The archive holds `oci-layout`, `index.json` and `blobs/sha256/...` (what `ctr images import`,
`skopeo copy oci-archive:` and `docker load` of Docker 25+ read), plus the `manifest.json` that
older `docker load` wants. Everything is deterministic: entries sorted, one fixed mtime, numeric
owners without names, gzip without a timestamp; the same input gives the same bytes and digests.

    builder = LayerBuilder()
    builder.add_directory(rootfs)                     # or add_tar(stream), add_file(name, data)
    layer = builder.write(cache / "layer.tar.gz", created_by="debootstrap bookworm")
    write_image_archive(out, [layer], config, "docker.io/modelfleet/modelfleet:local")
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

# Every file in a layer and in the archive gets this mtime; SOURCE_DATE_EPOCH's convention.
DEFAULT_MTIME = 0
# Level 6 is gzip's default: a tenth larger than 9 and twice as fast on a 200 MB root filesystem.
GZIP_LEVEL = 6
_CHUNK = 1 << 20


class OCIError(Exception):
    """Input the writer cannot turn into an image (a bad name, a file type tar cannot hold)."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """A finished layer: a gzip-compressed tar on disk and the digests an image refers to it by."""

    path: Path
    digest: str  # sha256 of the compressed blob (the manifest names the layer by it)
    diff_id: str  # sha256 of the uncompressed tar (the config's rootfs.diff_ids)
    size: int  # bytes of the compressed blob
    created_by: str = ""  # the history line for this layer

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layer:
        return cls(
            path=Path(data["path"]),
            digest=str(data["digest"]),
            diff_id=str(data["diff_id"]),
            size=int(data["size"]),
            created_by=str(data.get("created_by", "")),
        )


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image config (what a Dockerfile's ENV, USER, ... set)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    user: str = ""
    working_dir: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    exposed_ports: tuple[str, ...] = ()  # "8080/tcp"
    stop_signal: str = ""
    architecture: str = "amd64"
    os: str = "linux"

    def env_dict(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.env)


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclasses.dataclass(frozen=True)
class _Entry:
    info: tarfile.TarInfo
    read: Callable[[], IO[bytes]] | None = None  # opens the member's bytes (regular files)
    inode: str | None = None  # "dev:ino" of a file with several hard links


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no spaces: the same value always gives the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _clean_name(name: str) -> str:
    """A member name relative to the root, '/'-separated, without '.', '..' or a leading '/'."""
    parts = [p for p in PurePosixPath(name.lstrip("/")).parts if p not in (".", "")]
    if ".." in parts:
        raise OCIError(f"layer entry {name!r} leaves the root")
    return "/".join(parts)


def _normalized(info: tarfile.TarInfo, name: str, mtime: int) -> tarfile.TarInfo:
    out = tarfile.TarInfo(name)
    out.type = info.type
    out.mode = info.mode & 0o7777
    out.uid, out.gid = info.uid, info.gid
    out.uname = out.gname = ""  # numeric owners: names would come from the building machine
    out.mtime = mtime
    out.size = info.size if info.isreg() else 0
    out.linkname = info.linkname
    out.devmajor, out.devminor = info.devmajor, info.devminor
    return out


class LayerBuilder:
    """Collects layer entries from directories, tar streams and literal files, then writes them.

    Later additions replace earlier entries of the same name. `write` emits entries sorted by
    name with one mtime, so the layer's bytes depend only on names, modes, owners and contents.
    """

    def __init__(self, *, mtime: int = DEFAULT_MTIME) -> None:
        self._entries: dict[str, _Entry] = {}
        self._mtime = mtime
        self._spools: list[IO[bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def add_directory(
        self,
        root: Path,
        *,
        prefix: str = "",
        include: Callable[[str], bool] | None = None,
    ) -> None:
        """Add `root`'s tree (not `root` itself) under `prefix`, keeping modes, uid and gid.

        `include(relative_name)` may leave entries out; a left-out directory's contents are not
        visited. Sockets are skipped (tar cannot hold them). Hard links inside the added set are
        written as tar hard links.
        """
        root = Path(root)
        if prefix:
            self._add_parents(_clean_name(prefix) + "/x")
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir
            kept_dirs = []
            for d in sorted(dirnames):
                rel = f"{rel_dir}/{d}" if rel_dir else d
                if include is None or include(rel):
                    kept_dirs.append(d)
                    self._add_path(Path(dirpath, d), _clean_name(f"{prefix}/{rel}"))
            dirnames[:] = kept_dirs  # os.walk does not follow symlinked directories
            for f in sorted(filenames):
                rel = f"{rel_dir}/{f}" if rel_dir else f
                if include is None or include(rel):
                    self._add_path(Path(dirpath, f), _clean_name(f"{prefix}/{rel}"))

    def add_paths(self, root: Path, names: Iterable[str]) -> None:
        """Add the named paths below `root` (each with its parent directories)."""
        for name in names:
            clean = _clean_name(name)
            self._add_parents(clean, root)
            self._add_path(Path(root, clean), clean)

    def add_tar(
        self,
        stream: IO[bytes],
        *,
        select: Callable[[str], str | None] | None = None,
    ) -> None:
        """Add the members of a tar stream (any compression tarfile knows).

        `select(name)` returns the name to store the member under, or None to leave it out.
        The stream is spooled to a temporary file first so it may be a pipe.
        """
        # Both stay open until write() has read the members: closed there.
        spool = tempfile.TemporaryFile()  # noqa: SIM115
        shutil.copyfileobj(stream, spool, _CHUNK)
        spool.seek(0)
        self._spools.append(spool)
        archive = tarfile.open(fileobj=spool, mode="r:*")  # noqa: SIM115
        for member in archive.getmembers():
            if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                continue
            name = _clean_name(member.name)
            target = select(name) if select else name
            if not target:
                continue
            if member.islnk():
                linked = select(_clean_name(member.linkname)) if select else member.linkname
                if not linked:
                    raise OCIError(f"{name} is a hard link to {member.linkname}, left out")
                member.linkname = _clean_name(linked)
            info = _normalized(member, _clean_name(target), self._mtime)
            self._add_parents(info.name)
            reader = None
            if member.isreg():

                def reader(m: tarfile.TarInfo = member, a: tarfile.TarFile = archive) -> IO[bytes]:
                    handle = a.extractfile(m)
                    assert handle is not None
                    return handle

            self._entries[info.name] = _Entry(info, reader)

    def add_file(
        self, name: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> None:
        """Add a regular file with literal contents (and its parent directories)."""
        clean = _clean_name(name)
        self._add_parents(clean)
        info = tarfile.TarInfo(clean)
        info.mode, info.uid, info.gid, info.size = mode, uid, gid, len(data)
        self._entries[clean] = _Entry(
            _normalized(info, clean, self._mtime), lambda: io.BytesIO(data)
        )

    def add_whiteout(self, name: str) -> None:
        """Mark `name` deleted from the layers below (OCI whiteout file `.wh.<name>`)."""
        clean = PurePosixPath(_clean_name(name))
        self.add_file(str(clean.parent / f".wh.{clean.name}"), b"")

    def _add_parents(self, name: str, root: Path | None = None) -> None:
        parts = PurePosixPath(name).parts[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent in self._entries:
                continue
            if root is not None and Path(root, parent).is_dir():
                self._add_path(Path(root, parent), parent)
            else:
                info = tarfile.TarInfo(parent)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                self._entries[parent] = _Entry(_normalized(info, parent, self._mtime))

    def _add_path(self, path: Path, name: str) -> None:
        st = path.lstat()
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        reader: Callable[[], IO[bytes]] | None = None
        if stat.S_ISREG(st.st_mode):
            info.type, info.size = tarfile.REGTYPE, st.st_size
            reader = lambda: path.open("rb")  # noqa: E731
        elif stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        else:
            return  # a socket: nothing a layer can carry
        # Hard links: the first name in sorted order gets the bytes, the others link to it.
        inode = f"{st.st_dev}:{st.st_ino}" if info.isreg() and st.st_nlink > 1 else None
        self._entries[name] = _Entry(_normalized(info, name, self._mtime), reader, inode)

    def _sorted_entries(self) -> Iterator[_Entry]:
        first_name: dict[str, str] = {}
        for name in sorted(self._entries):
            entry = self._entries[name]
            if entry.inode is None:
                yield entry
            elif entry.inode in first_name:
                info = _normalized(entry.info, name, self._mtime)
                info.type, info.size, info.linkname = tarfile.LNKTYPE, 0, first_name[entry.inode]
                yield _Entry(info)
            else:
                first_name[entry.inode] = name
                yield entry

    def write(self, dest: Path, *, created_by: str = "") -> Layer:
        """Write the layer as a gzip-compressed tar at `dest` (atomically) and describe it."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        try:
            with tmp.open("wb") as out:
                compressed = _HashingWriter(out)
                # No file name and mtime 0 in the gzip header: the bytes depend on the tar only.
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0
                ) as gz:
                    uncompressed = _HashingWriter(gz)
                    with tarfile.open(
                        fileobj=cast("IO[bytes]", uncompressed),
                        mode="w|",
                        format=tarfile.PAX_FORMAT,
                    ) as tar:
                        for entry in self._sorted_entries():
                            if entry.read is None:
                                tar.addfile(entry.info)
                            else:
                                with entry.read() as handle:
                                    tar.addfile(entry.info, handle)
        finally:
            for spool in self._spools:
                spool.close()
            self._spools.clear()
        os.replace(tmp, dest)
        return Layer(
            path=dest,
            digest=compressed.digest(),
            diff_id=uncompressed.digest(),
            size=compressed.size,
            created_by=created_by,
        )


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through to `target`."""

    def __init__(self, target: IO[bytes] | gzip.GzipFile) -> None:
        self._target = target
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        self._target.write(data)
        return len(data)

    def flush(self) -> None:
        self._target.flush()

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


# --- tree snapshots, for layers that hold only what a step changed ---------------------------

Snapshot = dict[str, tuple[str, ...]]


def snapshot_tree(root: Path, subdir: str = "") -> Snapshot:
    """Every path in `root/subdir` (named relative to `root`) with type, mode, owner and a hash
    of its contents; mtimes are left out, as the layers do not keep them."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(Path(root, subdir)):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            meta: tuple[str, ...] = (str(stat.S_IFMT(st.st_mode)), oct(stat.S_IMODE(st.st_mode)))
            meta += (str(st.st_uid), str(st.st_gid))
            if stat.S_ISREG(st.st_mode):
                hasher = hashlib.sha256()
                with path.open("rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        hasher.update(chunk)
                meta += (hasher.hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                meta += (os.readlink(path),)
            result[path.relative_to(root).as_posix()] = meta
    return result


def add_changes(builder: LayerBuilder, root: Path, before: Snapshot, subdir: str = "") -> None:
    """Add to `builder` what differs in `root/subdir` from the `before` snapshot of it.

    New and changed paths are added with their parent directories; removed ones become
    whiteouts (one for a removed directory, none for what was inside it).
    """
    after = snapshot_tree(root, subdir)
    builder.add_paths(root, sorted(n for n, meta in after.items() if before.get(n) != meta))
    removed = {n for n in before if n not in after}
    for name in sorted(removed):
        if PurePosixPath(name).parent.as_posix() not in removed:
            builder.add_whiteout(name)


# --- the image: config, manifest, index and the archive -------------------------------------


def _created(mtime: int) -> str:
    return datetime.datetime.fromtimestamp(mtime, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_config(
    config: ImageConfig, layers: Iterable[Layer], *, mtime: int = DEFAULT_MTIME
) -> dict[str, Any]:
    """The OCI image config document for `config` over `layers`."""
    layers = list(layers)
    runtime: dict[str, Any] = {}
    if config.user:
        runtime["User"] = config.user
    if config.exposed_ports:
        runtime["ExposedPorts"] = {port: {} for port in config.exposed_ports}
    if config.env:
        runtime["Env"] = list(config.env)
    if config.entrypoint:
        runtime["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        runtime["Cmd"] = list(config.cmd)
    if config.working_dir:
        runtime["WorkingDir"] = config.working_dir
    if config.labels:
        runtime["Labels"] = dict(config.labels)
    if config.stop_signal:
        runtime["StopSignal"] = config.stop_signal
    created = _created(mtime)
    return {
        "created": created,
        "architecture": config.architecture,
        "os": config.os,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": layer.created_by} for layer in layers],
    }


def split_reference(reference: str) -> tuple[str, str]:
    """`registry/repo:tag` -> (`registry/repo`, `tag`); a digest reference is refused."""
    if "@" in reference:
        raise OCIError(f"{reference!r}: name the image by a tag, not a digest")
    repo, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        raise OCIError(f"{reference!r} has no tag (expected registry/name:tag)")
    return repo, tag


def docker_tag(reference: str) -> str:
    """The name `docker load` shows: docker.io/ and library/ dropped, as Docker writes them."""
    name = reference.removeprefix("docker.io/")
    return name.removeprefix("library/") if name.count("/") == 1 else name


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """The blobs of one image (config, manifest, index) and its layers, before any is written."""

    reference: str
    config_blob: bytes
    manifest_blob: bytes
    index_blob: bytes
    layers: tuple[Layer, ...]

    @property
    def manifest_digest(self) -> str:
        return _digest(self.manifest_blob)


def plan_image(
    layers: Iterable[Layer], config: ImageConfig, reference: str, *, mtime: int = DEFAULT_MTIME
) -> ImagePlan:
    """Compute config, manifest and index for an image, without writing anything."""
    layers = tuple(layers)
    _, tag = split_reference(reference)
    config_blob = canonical_json(build_config(config, layers, mtime=mtime))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": Descriptor(MEDIA_CONFIG, _digest(config_blob), len(config_blob)).to_json(),
        "layers": [Descriptor(MEDIA_LAYER_GZIP, x.digest, x.size).to_json() for x in layers],
    }
    manifest_blob = canonical_json(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                **Descriptor(MEDIA_MANIFEST, _digest(manifest_blob), len(manifest_blob)).to_json(),
                "platform": {"architecture": config.architecture, "os": config.os},
                "annotations": {
                    ANNOTATION_CONTAINERD_NAME: reference,
                    ANNOTATION_REF_NAME: tag,
                },
            }
        ],
    }
    return ImagePlan(reference, config_blob, manifest_blob, canonical_json(index), layers)


def write_image_archive(
    dest: Path,
    layers: Iterable[Layer],
    config: ImageConfig,
    reference: str,
    *,
    mtime: int = DEFAULT_MTIME,
) -> ImagePlan:
    """Write an OCI image-layout tar archive for one image named `reference`; returns its plan."""
    plan = plan_image(layers, config, reference, mtime=mtime)
    write_plan(dest, plan, mtime=mtime)
    return plan


def write_plan(dest: Path, plan: ImagePlan, *, mtime: int = DEFAULT_MTIME) -> None:
    """Write a planned image as an archive at `dest` (atomically)."""
    config_name = "blobs/sha256/" + _digest(plan.config_blob).removeprefix("sha256:")
    docker_manifest = [
        {
            "Config": config_name,
            "RepoTags": [docker_tag(plan.reference)],
            "Layers": ["blobs/sha256/" + x.digest.removeprefix("sha256:") for x in plan.layers],
        }
    ]
    files: dict[str, bytes | Path] = {
        "oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": plan.index_blob,
        "manifest.json": canonical_json(docker_manifest),
        config_name: plan.config_blob,
        "blobs/sha256/" + plan.manifest_digest.removeprefix("sha256:"): plan.manifest_blob,
    }
    for layer in plan.layers:
        files["blobs/sha256/" + layer.digest.removeprefix("sha256:")] = layer.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        for name in sorted(files):
            content = files[name]
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = 0o644, mtime
            if isinstance(content, Path):
                info.size = content.stat().st_size
                with content.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    os.replace(tmp, dest)
