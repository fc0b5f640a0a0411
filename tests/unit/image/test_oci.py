"""hack/oci.py writes OCI image-layout archives that are valid, complete and reproducible."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

import oci

CONFIG = oci.ImageConfig(
    entrypoint=("/bin/app",),
    cmd=("--help",),
    env=("PATH=/usr/bin:/bin", "A=1"),
    user="10001:10001",
    working_dir="/tmp",
    labels={"org.opencontainers.image.title": "t"},
    exposed_ports=("8080/tcp",),
)
REFERENCE = "docker.io/modelfleet/test:local"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tree(root: Path, mtime: int) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "app").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "conf").write_text("x=1\n")
    os.link(root / "etc" / "conf", root / "etc" / "conf.hard")
    (root / "etc" / "link").symlink_to("conf")
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return root


def build_archive(tmp: Path, mtime: int) -> Path:
    builder = oci.LayerBuilder()
    builder.add_directory(make_tree(tmp / "tree", mtime))
    lower = builder.write(tmp / "l1.tar.gz", created_by="tree")
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        info = tarfile.TarInfo("./usr/share/x")
        info.size, info.mtime, info.uname = 2, mtime, "someone"
        tar.addfile(info, io.BytesIO(b"hi"))
    stream.seek(0)
    upper = oci.LayerBuilder()
    upper.add_tar(stream)
    upper.add_file("pause", b"#!/bin/sh\n", mode=0o755)
    top = upper.write(tmp / "l2.tar.gz", created_by="top")
    out = tmp / "image.tar"
    oci.write_image_archive(out, [lower, top], CONFIG, REFERENCE)
    return out


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def blob(files: dict[str, bytes], descriptor: dict[str, Any]) -> bytes:
    data = files["blobs/sha256/" + descriptor["digest"].removeprefix("sha256:")]
    assert sha256(data) == descriptor["digest"]
    assert len(data) == descriptor["size"]
    return data


def test_layout_is_complete_and_digests_match(tmp_path: Path) -> None:
    files = read_archive(build_archive(tmp_path, mtime=1_700_000_000))
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert index["mediaType"] == oci.MEDIA_INDEX
    (entry,) = index["manifests"]
    assert entry["annotations"] == {
        "io.containerd.image.name": REFERENCE,
        "org.opencontainers.image.ref.name": "local",
    }
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    manifest = json.loads(blob(files, entry))
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST
    config = json.loads(blob(files, manifest["config"]))
    assert config["architecture"] == "amd64"
    assert config["os"] == "linux"
    assert config["config"] == {
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--help"],
        "Env": ["PATH=/usr/bin:/bin", "A=1"],
        "User": "10001:10001",
        "WorkingDir": "/tmp",
        "Labels": {"org.opencontainers.image.title": "t"},
        "ExposedPorts": {"8080/tcp": {}},
    }
    layers = [blob(files, d) for d in manifest["layers"]]
    assert [d["mediaType"] for d in manifest["layers"]] == [oci.MEDIA_LAYER_GZIP] * 2
    assert config["rootfs"]["diff_ids"] == [sha256(gzip.decompress(x)) for x in layers]
    assert [h["created_by"] for h in config["history"]] == ["tree", "top"]
    # Every blob is referenced: nothing extra, nothing missing.
    blobs = {n for n in files if n.startswith("blobs/")}
    assert len(blobs) == 2 + len(layers)
    # The manifest.json of `docker load` (before Docker 25) points at the same blobs.
    (docker,) = json.loads(files["manifest.json"])
    assert docker["RepoTags"] == ["modelfleet/test:local"]
    assert docker["Config"] == "blobs/sha256/" + manifest["config"]["digest"][7:]


def test_layer_entries_are_sorted_normalized_and_keep_modes_links(tmp_path: Path) -> None:
    files = read_archive(build_archive(tmp_path, mtime=1_700_000_000))
    manifest_digest = json.loads(files["index.json"])["manifests"][0]["digest"]
    manifest = json.loads(files["blobs/sha256/" + manifest_digest[7:]])
    first = files["blobs/sha256/" + manifest["layers"][0]["digest"][7:]]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(first))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names == ["bin", "bin/app", "etc", "etc/conf", "etc/conf.hard", "etc/link"]
    by_name = {m.name: m for m in members}
    assert {m.mtime for m in members} == {oci.DEFAULT_MTIME}
    assert {m.uname for m in members} == {""}
    assert by_name["bin/app"].mode == 0o755
    assert by_name["etc/conf.hard"].islnk()
    assert by_name["etc/conf.hard"].linkname == "etc/conf"
    assert by_name["etc/link"].issym()
    assert by_name["etc/link"].linkname == "conf"
    second = files["blobs/sha256/" + manifest["layers"][1]["digest"][7:]]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(second))) as tar:
        members = tar.getmembers()
    # The tar stream's "./" and owner name are gone; parents of added files are made.
    assert [m.name for m in members] == ["pause", "usr", "usr/share", "usr/share/x"]
    assert {m.uname for m in members} == {""}


def test_same_input_gives_the_same_bytes(tmp_path: Path) -> None:
    one = build_archive(tmp_path / "one", mtime=1_600_000_000).read_bytes()
    two = build_archive(tmp_path / "two", mtime=1_700_000_000).read_bytes()
    assert one == two


def test_a_change_changes_the_digest(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", 0)
    first = oci.LayerBuilder()
    first.add_directory(tree)
    a = first.write(tmp_path / "a.tar.gz")
    (tree / "bin" / "app").chmod(0o700)
    second = oci.LayerBuilder()
    second.add_directory(tree)
    b = second.write(tmp_path / "b.tar.gz")
    assert a.digest != b.digest
    assert a.diff_id != b.diff_id


def test_changes_layer_holds_only_what_changed_and_whiteouts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "opt" / "venv" / "old").mkdir(parents=True)
    (root / "opt" / "venv" / "old" / "f").write_text("1")
    (root / "opt" / "venv" / "keep").write_text("same")
    (root / "opt" / "venv" / "edit").write_text("before")
    (root / "etc").mkdir()
    (root / "etc" / "outside").write_text("not in opt")
    before = oci.snapshot_tree(root, "opt")
    (root / "opt" / "venv" / "old" / "f").unlink()
    (root / "opt" / "venv" / "old").rmdir()
    (root / "opt" / "venv" / "edit").write_text("after")
    (root / "opt" / "venv" / "new").mkdir()
    (root / "opt" / "venv" / "new" / "g").write_text("2")
    builder = oci.LayerBuilder()
    oci.add_changes(builder, root, before, "opt")
    assert builder.names() == [
        "opt",
        "opt/venv",
        "opt/venv/.wh.old",
        "opt/venv/edit",
        "opt/venv/new",
        "opt/venv/new/g",
    ]


def test_directory_filter_keeps_mount_points_but_not_their_contents(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "null").write_text("")
    (tmp_path / "etc").mkdir()
    builder = oci.LayerBuilder()
    builder.add_directory(tmp_path, include=lambda n: not n.startswith("dev/"))
    assert builder.names() == ["dev", "etc"]


@pytest.mark.parametrize(
    ("reference", "repo", "tag"),
    [
        ("docker.io/modelfleet/modelfleet:local", "docker.io/modelfleet/modelfleet", "local"),
        ("localhost:5000/x:1.0", "localhost:5000/x", "1.0"),
    ],
)
def test_split_reference(reference: str, repo: str, tag: str) -> None:
    assert oci.split_reference(reference) == (repo, tag)


@pytest.mark.parametrize("reference", ["localhost:5000/x", "x@sha256:abc", "x"])
def test_reference_without_tag_is_refused(reference: str) -> None:
    with pytest.raises(oci.OCIError):
        oci.split_reference(reference)


@pytest.mark.parametrize(
    ("reference", "tag"),
    [
        ("docker.io/library/busybox:1", "busybox:1"),
        ("docker.io/modelfleet/modelfleet:local", "modelfleet/modelfleet:local"),
        ("registry.k8s.io/pause:3.10-modelfleet", "registry.k8s.io/pause:3.10-modelfleet"),
    ],
)
def test_docker_tag(reference: str, tag: str) -> None:
    assert oci.docker_tag(reference) == tag


def test_entry_leaving_the_root_is_refused() -> None:
    with pytest.raises(oci.OCIError, match="leaves the root"):
        oci.LayerBuilder().add_file("../etc/passwd", b"")
