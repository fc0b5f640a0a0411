"""hack/images.py: the image it builds is the one the Dockerfile describes, and its inputs are
read the way apt and pip would. No debootstrap or chroot here: those run in `make image`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import images

ROOT = Path(__file__).resolve().parents[3]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [tuple(line.split(None, 1)) for line in lines if line and line[0] != "#"]
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    args = [x for x in instructions[:last_from] if x[0] == "ARG"]
    return [(w, a) for w, a in args + instructions[last_from:]]  # type: ignore[misc]


def dockerfile_pairs(arguments: str) -> dict[str, str]:
    """KEY=VALUE pairs of an ENV or LABEL line."""
    return dict(word.split("=", 1) for word in shlex.split(arguments))


def single(word: str) -> str:
    (found,) = [a for w, a in dockerfile_instructions() if w == word]
    return found


CONFIG = images.modelfleet_config()


def test_user_workdir_entrypoint_cmd_match_the_dockerfile() -> None:
    assert single("USER") == CONFIG.user
    assert single("WORKDIR") == CONFIG.working_dir
    assert json.loads(single("ENTRYPOINT")) == list(CONFIG.entrypoint)
    assert json.loads(single("CMD")) == list(CONFIG.cmd)


def test_exposed_ports_match_the_dockerfile() -> None:
    ports = single("EXPOSE").split()
    assert sorted(f"{p}/tcp" if "/" not in p else p for p in ports) == sorted(CONFIG.exposed_ports)


def test_labels_match_the_dockerfile() -> None:
    assert dockerfile_pairs(single("LABEL")) == dict(CONFIG.labels)


def test_env_matches_the_dockerfile() -> None:
    wanted = dockerfile_pairs(single("ENV"))
    env = CONFIG.env_dict()
    # $PATH is the base image's: the venv comes first in both.
    assert wanted.pop("PATH") == f"{images.VENV}/bin:$PATH"
    assert env.pop("PATH").startswith(f"{images.VENV}/bin:/usr/local/sbin:")
    # LANG=C.UTF-8 comes with the python base image in the Dockerfile's case.
    assert env.pop("LANG") == "C.UTF-8"
    assert env == wanted


def test_python_version_and_debian_suite_match_the_dockerfile() -> None:
    arg = dict(a.split("=", 1) for w, a in dockerfile_instructions() if w == "ARG")
    assert arg["PYTHON_VERSION"] == images.PYTHON_VERSION
    base = single("FROM")
    assert base == "python:${PYTHON_VERSION}-slim-" + images.SUITE
    # Debian's python3 for that suite is the version the Dockerfile names.
    assert images.SUITE == "bookworm"
    assert images.PYTHON_VERSION == "3.11"


def test_venv_path_matches_the_dockerfile() -> None:
    copy = [a for w, a in dockerfile_instructions() if w == "COPY"]
    assert copy == [f"--from=builder {images.VENV} {images.VENV}"]


def test_pause_config_and_references() -> None:
    config = images.pause_config()
    assert config.entrypoint == ("/pause",)
    assert config.user == "65535:65535"
    for reference in (images.PAUSE_REFERENCE, images.MODELFLEET_REFERENCE):
        repo, tag = images.oci.split_reference(reference)
        assert "/" in repo
        assert tag


def test_pause_script_is_valid_sh() -> None:
    proc = subprocess.run(["sh", "-n"], input=images.PAUSE_SCRIPT, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert images.PAUSE_SCRIPT.startswith(b"#!/bin/busybox sh\n")
    assert b"trap 'exit 0' TERM INT" in images.PAUSE_SCRIPT


DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirrors_from_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "other.sources.disabled").write_text(
        DEB822.replace("mirror.example", "off.example")
    )
    mirrors = images.find_mirrors(tmp_path, env={})
    assert mirrors.main == "http://mirror.example/debian"
    assert mirrors.security == "http://mirror.example/debian-security"
    assert mirrors.source.endswith("debian.sources")


def test_mirrors_from_one_line_sources_and_the_override(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ bookworm main\n"
    )
    mirrors = images.find_mirrors(tmp_path, env={})
    assert mirrors.main == "http://one.example/debian"
    assert mirrors.security == images.DEFAULT_SECURITY_MIRROR
    override = images.find_mirrors(tmp_path, env={"MODELFLEET_DEBIAN_MIRROR": "http://m/debian"})
    assert override.main == "http://m/debian"
    assert override.source == "MODELFLEET_DEBIAN_MIRROR"


def test_no_sources_falls_back_to_deb_debian_org(tmp_path: Path) -> None:
    assert images.find_mirrors(tmp_path, env={}).main == images.DEFAULT_MIRROR


def test_source_files_are_what_the_package_is_built_from(tmp_path: Path) -> None:
    (tmp_path / "operator" / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "operator" / "pkg.egg-info").mkdir()
    for name in ("pyproject.toml", "README.md", "operator/pkg/a.py", "operator/pkg/py.typed"):
        (tmp_path / name).write_text("x")
    (tmp_path / "operator" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_text("x")
    (tmp_path / "operator" / "pkg.egg-info" / "PKG-INFO").write_text("x")
    names = [p.relative_to(tmp_path).as_posix() for p in images.source_files(tmp_path)]
    assert names == ["pyproject.toml", "README.md", "operator/pkg/a.py", "operator/pkg/py.typed"]


def test_keys_are_stable_and_change_with_any_input() -> None:
    key = images.compute_key("bookworm", b"pins", images.build_base)
    assert key == images.compute_key("bookworm", b"pins", images.build_base)
    assert key != images.compute_key("bookworm", b"pins2", images.build_base)
    assert key != images.compute_key("bookworm", b"pins", images.build_deps)
    assert len(key) == 16


def test_dependencies_come_from_pyproject() -> None:
    deps = images.project_dependencies(ROOT / "pyproject.toml")
    assert any(d.startswith("kopf") for d in deps)
    assert not any(d.startswith("pytest") for d in deps)


def test_results_are_shell_lines() -> None:
    lines = images.format_results({"pause": (Path("/c/a b.tar"), images.PAUSE_REFERENCE)})
    assert lines == ["pause='/c/a b.tar'", f"pause_ref={images.PAUSE_REFERENCE}"]


def test_building_the_project_image_without_root_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(images.os, "geteuid", lambda: 1000)
    cache = images.Cache(tmp_path, images.Log(tmp_path / "log"))
    with pytest.raises(images.BuildError, match=r"need root.*sudo"):
        images.build_images(["modelfleet"], cache=cache, rebuild=set(), cached_only=False)


def test_cached_only_fails_clearly_on_an_empty_cache(tmp_path: Path) -> None:
    cache = images.Cache(tmp_path, images.Log(tmp_path / "log"))
    with pytest.raises(images.BuildError, match="not built"):
        images.build_images(["modelfleet"], cache=cache, rebuild=set(), cached_only=True)


def test_cache_dir_follows_xdg(tmp_path: Path) -> None:
    assert images.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "modelfleet/images"
