#!/usr/bin/env python3
"""Build the project's container images as OCI archives, without Docker or a registry.

Two images, for kubelet nodes that import them (`ctr -n k8s.io images import`) and run them with
imagePullPolicy: Never:

- the pause image (PAUSE_REFERENCE): Debian's static busybox and a shell script that waits until
  SIGTERM or SIGINT and exits 0; containerd's `sandbox_image` names it;
- the modelfleet image (MODELFLEET_REFERENCE): what the Dockerfile describes, on a root
  filesystem made by debootstrap from the Debian mirror apt already uses, in three layers (Debian
  and Python; the pinned dependencies in /opt/modelfleet; the modelfleet package), each cached
  under a key of what determines it, so a source change rebuilds only the top layer.

    hack/images.py build                # both; stdout: pause=, pause_ref=, modelfleet=, ... lines
    hack/images.py build --image pause  # only the pause image (needs no root)
    hack/images.py build --cached-only  # print the paths if built, fail otherwise
    hack/images.py refs                 # only the references

The modelfleet image needs root (debootstrap and chroot). Standard library only: it runs under
the system python3 as root, with no virtualenv.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oci

ROOT = Path(__file__).resolve().parent.parent
# The layer writer's own source is part of every layer's key: a change to it rewrites them.
WRITER = Path(oci.__file__).read_bytes()

PAUSE_REFERENCE = "registry.k8s.io/pause:3.10-modelfleet"
MODELFLEET_REFERENCE = "docker.io/modelfleet/modelfleet:local"
# The same layers as the modelfleet image, started as `modelfleet sim-vllm`: the vLLM stand-in in
# place of the vllm-openai image, whose entrypoint takes vLLM's arguments the same way.
VLLM_SIM_REFERENCE = "docker.io/modelfleet/vllm-sim:local"
IMAGES = ("pause", "modelfleet", "vllm-sim")

SUITE = "bookworm"  # the Dockerfile's base is python:<version>-slim-bookworm
PYTHON_VERSION = "3.11"  # bookworm's python3; the Dockerfile's ARG PYTHON_VERSION
VENV = "/opt/modelfleet"
# The runtime packages python:3.11-slim-bookworm carries besides Python itself.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "netbase", "tzdata")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# pause: PID 1 ignores signals it has no handler for, so the trap is what makes SIGTERM work.
PAUSE_SCRIPT = b"""#!/bin/busybox sh
# Hold the pod's namespaces until the kubelet stops the sandbox; exit 0 on SIGTERM or SIGINT.
trap 'exit 0' TERM INT
while :; do
  /bin/busybox sleep 2147483647 &
  wait $!
done
"""

# Paths the Debian root filesystem keeps out of the image: what only an install needs, host
# files debootstrap copies in, and what a container runtime mounts over anyway.
SLIM_GLOBS = (
    "var/lib/apt/lists/*",
    "var/cache/apt/*",
    "var/cache/debconf/*-old",
    "var/cache/ldconfig/aux-cache",
    "var/log/*",
    "usr/share/doc/*/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "usr/share/man/*",
    "usr/share/lintian/*",
    "usr/share/linda/*",
    "tmp/*",
    "var/tmp/*",
    "root/.cache",
    "etc/hostname",
    "etc/resolv.conf",
)
# What SLIM_GLOBS matches but the image keeps: licences, and the alias table glibc reads.
SLIM_KEEP = ("copyright", "locale.alias")
# Future installs inside the image skip what SLIM_GLOBS removes.
DPKG_EXCLUDES = b"""path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
"""


# netbase's /etc/hosts (a runtime mounts its own over it; this is for the image on its own).
ETC_HOSTS = b"""127.0.0.1\tlocalhost
::1\t\tlocalhost ip6-localhost ip6-loopback
ff02::1\t\tip6-allnodes
ff02::2\t\tip6-allrouters
"""


class BuildError(Exception):
    """A step failed; the message says which and what to do."""


# --- what the images are --------------------------------------------------------------------


def modelfleet_config() -> oci.ImageConfig:
    """The modelfleet image's runtime config; tests/unit/image checks it against the Dockerfile."""
    return oci.ImageConfig(
        entrypoint=("modelfleet",),
        cmd=("--help",),
        env=(
            f"PATH={VENV}/bin:{CHROOT_PATH}",
            "LANG=C.UTF-8",  # as in the python image: UTF-8 I/O without a locale package
            "PYTHONUNBUFFERED=1",
            "PYTHONDONTWRITEBYTECODE=1",
        ),
        # A numeric user (and group) that the chart's securityContext names too.
        user="10001:10001",
        working_dir="/tmp",
        exposed_ports=("8080/tcp", "9400/tcp"),
        labels={
            "org.opencontainers.image.title": "modelfleet",
            "org.opencontainers.image.description": (
                "Runs LLM model replicas (vLLM) across NVIDIA GPU nodes on Kubernetes"
            ),
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.source": "https://github.com/modelfleet/modelfleet",
        },
    )


def vllm_sim_config() -> oci.ImageConfig:
    """The vLLM stand-in: the modelfleet image with vLLM's arguments after `sim-vllm`."""
    base = modelfleet_config()
    return dataclasses.replace(
        base,
        entrypoint=("modelfleet", "sim-vllm"),
        cmd=(),
        exposed_ports=("8000/tcp",),
        labels={**base.labels, "org.opencontainers.image.title": "modelfleet-vllm-sim"},
    )


def pause_config() -> oci.ImageConfig:
    """The pause image's config: the upstream pause image's user, our script as entrypoint."""
    return oci.ImageConfig(
        entrypoint=("/pause",),
        user="65535:65535",
        labels={
            "org.opencontainers.image.title": "modelfleet-pause",
            "org.opencontainers.image.description": "Pod sandbox: waits until SIGTERM (busybox)",
            "org.opencontainers.image.source": "https://github.com/modelfleet/modelfleet",
        },
    )


def project_dependencies(pyproject: Path) -> list[str]:
    """The `[project] dependencies` of pyproject.toml: what the venv layer installs."""
    with pyproject.open("rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def source_files(root: Path) -> list[Path]:
    """The files the package layer is built from (what .dockerignore lets into the context)."""
    files = [root / "pyproject.toml", root / "README.md"]
    for path in sorted((root / "operator").rglob("*")):
        parts = path.relative_to(root).parts
        generated = "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts)
        if path.is_file() and not generated and path.suffix != ".pyc":
            files.append(path)
    return files


def compute_key(*parts: object) -> str:
    """A short stable hash of the parts (strings, bytes, functions by their source)."""
    hasher = hashlib.sha256()
    for part in parts:
        if callable(part):
            part = inspect.getsource(part)
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        hasher.update(len(data).to_bytes(8, "big") + data)
    return hasher.hexdigest()[:16]


# --- Debian mirrors -------------------------------------------------------------------------


@dataclass(frozen=True)
class Mirrors:
    main: str
    security: str
    source: str  # where they were read from, for error messages


def parse_apt_sources(text: str, *, deb822: bool) -> list[tuple[str, list[str]]]:
    """(URI, suites) of each `deb` entry of a sources.list (one-line) or .sources (deb822) file."""
    entries: list[tuple[str, list[str]]] = []
    if not deb822:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                if words[1].startswith("["):  # options: deb [arch=amd64 signed-by=...] uri ...
                    while words and not words[0].endswith("]"):
                        words.pop(0)
                    words = ["deb", *words[1:]]
                if len(words) >= 3:
                    entries.append((words[1], [words[2]]))
        return entries
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            for uri in fields.get("uris", "").split():
                entries.append((uri, fields.get("suites", "").split()))
    return entries


def find_mirrors(etc_apt: Path = Path("/etc/apt"), env: Mapping[str, str] = os.environ) -> Mirrors:
    """The Debian mirrors apt on this machine uses for SUITE and its security updates.

    MODELFLEET_DEBIAN_MIRROR and MODELFLEET_DEBIAN_SECURITY_MIRROR override what apt's sources say.
    """
    files = [etc_apt / "sources.list"] if (etc_apt / "sources.list").is_file() else []
    files += sorted((etc_apt / "sources.list.d").glob("*.list"))
    files += sorted((etc_apt / "sources.list.d").glob("*.sources"))
    main = security = ""
    where = "defaults"
    for path in files:
        for uri, suites in parse_apt_sources(path.read_text(), deb822=path.suffix == ".sources"):
            if not main and SUITE in suites:
                main, where = uri.rstrip("/"), str(path)
            if not security and f"{SUITE}-security" in suites:
                security = uri.rstrip("/")
    main = env.get("MODELFLEET_DEBIAN_MIRROR") or main or DEFAULT_MIRROR
    security = env.get("MODELFLEET_DEBIAN_SECURITY_MIRROR") or security or DEFAULT_SECURITY_MIRROR
    if env.get("MODELFLEET_DEBIAN_MIRROR"):
        where = "MODELFLEET_DEBIAN_MIRROR"
    return Mirrors(main, security, where)


def check_reachable(url: str, what: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            reply.read(1)
    except (urllib.error.URLError, OSError) as err:
        raise BuildError(f"cannot reach {what} ({url}): {err}") from err


# --- running things -------------------------------------------------------------------------


class Log:
    """Step lines on stderr; each step's full output in a log file, its tail shown on failure."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.path.write_text("")

    def say(self, message: str) -> None:
        print(f"images: {message}", file=sys.stderr, flush=True)

    def run(
        self,
        argv: Sequence[str],
        what: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        with self.path.open("a") as out:
            out.write(f"\n$ {shlex.join(argv)}\n")
            out.flush()
            proc = subprocess.run(
                list(argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False
            )
        if proc.returncode != 0:
            tail = "\n".join(self.path.read_text().splitlines()[-25:])
            raise BuildError(f"{what} failed (exit {proc.returncode}); log {self.path}:\n{tail}")


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf, but only once nothing is mounted inside (a live mount would be emptied too)."""
    if not path.exists():
        return
    for point in mounts_below(path):
        subprocess.run(["umount", "-l", point], check=False)
    if left := mounts_below(path):
        raise BuildError(f"{path} still has mounts ({', '.join(left)}); not removing it")
    shutil.rmtree(path)


def host_ca_bundle(env: Mapping[str, str] = os.environ) -> Path | None:
    """The CA bundle the host's pip trusts, so pip in the chroot trusts the same index."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if env.get(name) and Path(env[name]).is_file():
            return Path(env[name])
    return None


PASSED_ENV = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
)


@contextlib.contextmanager
def chroot_session(rootfs: Path, *, network: bool) -> Iterator[dict[str, str]]:
    """Mount /proc and a private /dev in `rootfs`, and with `network` lend it the host's DNS
    files and CA bundle; yields the environment for commands in the chroot. Everything is undone
    on the way out, failures and signals included."""
    dev = rootfs / "dev"
    borrowed: dict[Path, bytes | None] = {}
    env = {
        "PATH": CHROOT_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    try:
        (rootfs / "proc").mkdir(exist_ok=True)
        dev.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
        # A tmpfs of our own, not the host's /dev: removing the tree later cannot touch the host.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "dev", str(dev)], check=True)
        for name, major, minor in (
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ):
            os.mknod(dev / name, 0o20666, os.makedev(major, minor))
            os.chmod(dev / name, 0o666)
        (dev / "shm").mkdir(mode=0o1777)
        os.chmod(dev / "shm", 0o1777)
        (dev / "fd").symlink_to("/proc/self/fd")
        if network:
            for name in ("etc/resolv.conf", "etc/hosts"):
                target = rootfs / name
                borrowed[target] = target.read_bytes() if target.is_file() else None
                target.unlink(missing_ok=True)
                shutil.copyfile(Path("/", name), target)
            ca = host_ca_bundle()
            if ca is not None:
                shutil.copyfile(ca, rootfs / "tmp" / "host-ca.crt")
                borrowed[rootfs / "tmp" / "host-ca.crt"] = None
                env["PIP_CERT"] = "/tmp/host-ca.crt"
            env.update({k: v for k in PASSED_ENV if (v := os.environ.get(k))})
        yield env
    finally:
        for target, content in borrowed.items():
            target.unlink(missing_ok=True)
            if content is not None:
                target.write_bytes(content)
        for point in mounts_below(rootfs):
            subprocess.run(["umount", point], check=False)


def chroot_argv(rootfs: Path, *argv: str, user: str | None = None) -> list[str]:
    return ["chroot", *([f"--userspec={user}"] if user else []), str(rootfs), *argv]


def reset_mtimes(root: Path, mtime: int = oci.DEFAULT_MTIME) -> None:
    """Give every path below `root` the layers' fixed mtime, so .pyc files compiled afterwards
    record the mtime their sources have in the image and stay valid there."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))


def extract_layers(layers: Sequence[oci.Layer], rootfs: Path, log: Log) -> None:
    rootfs.mkdir(parents=True)
    for layer in layers:
        log.run(
            ["tar", "-xzpf", str(layer.path), "--numeric-owner", "-C", str(rootfs)],
            f"unpacking {layer.path.name}",
        )


# --- the stages -----------------------------------------------------------------------------

RECOMPILE_PYC = """
import pathlib, py_compile, sys
mode = py_compile.PycInvalidationMode.TIMESTAMP
for pyc in pathlib.Path(sys.argv[1]).rglob('__pycache__/*.pyc'):
    src = pyc.parent.parent / (pyc.name.split('.')[0] + '.py')
    if src.is_file():
        py_compile.compile(str(src), cfile=str(pyc), doraise=True, invalidation_mode=mode)
"""


def build_base(
    work: Path, dest: Path, lower: Sequence[oci.Layer], log: Log, *, mirrors: Mirrors
) -> oci.Layer:
    """Debian minbase plus Python 3 from the mirror, slimmed: the bottom layer."""
    ensure_debootstrap(log)
    check_reachable(
        f"{mirrors.main}/dists/{SUITE}/Release", f"the Debian mirror ({mirrors.source})"
    )
    rootfs = work / "rootfs"
    log.say(f"debootstrap --variant=minbase {SUITE} from {mirrors.main} (a few minutes)")
    log.run(
        ["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirrors.main],
        f"debootstrap from {mirrors.main}",
    )
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {mirrors.main} {SUITE} main\n"
        f"deb {mirrors.main} {SUITE}-updates main\n"
        f"deb {mirrors.security} {SUITE}-security main\n"
    )
    (rootfs / "etc/dpkg/dpkg.cfg.d/modelfleet-slim").write_bytes(DPKG_EXCLUDES)
    log.say(f"apt-get install {' '.join(BASE_PACKAGES)} (with {SUITE}-updates and -security)")
    with chroot_session(rootfs, network=True) as env:
        apt = ["apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0"]
        log.run(chroot_argv(rootfs, *apt, "update"), f"apt-get update from {mirrors.main}", env=env)
        log.run(chroot_argv(rootfs, *apt, "upgrade"), "apt-get upgrade", env=env)
        log.run(
            chroot_argv(rootfs, *apt, "install", "--no-install-recommends", *BASE_PACKAGES),
            "apt-get install",
            env=env,
        )
        log.run(chroot_argv(rootfs, "apt-get", "clean"), "apt-get clean", env=env)
    slim_rootfs(rootfs)
    reset_mtimes(rootfs)
    with chroot_session(rootfs, network=False) as env:
        version = subprocess.run(
            chroot_argv(
                rootfs, "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"
            ),
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if version != PYTHON_VERSION:
            raise BuildError(f"{SUITE}'s python3 is {version}, the image wants {PYTHON_VERSION}")
        log.run(
            chroot_argv(rootfs, "python3", "-c", RECOMPILE_PYC, "/usr/lib"),
            "recompiling the standard library's .pyc files",
            env=env,
        )
    builder = oci.LayerBuilder()
    # /dev, /proc and /sys are mount points in a container: the directories, not their contents.
    builder.add_directory(rootfs, include=lambda n: n.split("/")[0] not in _MOUNTED or "/" not in n)
    return builder.write(
        dest, created_by=f"debootstrap --variant=minbase {SUITE} + {BASE_PACKAGES}"
    )


_MOUNTED = ("dev", "proc", "sys")


def slim_rootfs(rootfs: Path) -> None:
    """Remove what SLIM_GLOBS names, except SLIM_KEEP."""
    for pattern in SLIM_GLOBS:
        for path in rootfs.glob(pattern):
            if path.name in SLIM_KEEP:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    # The chroot borrowed the host's /etc/hosts while netbase was installed: put netbase's back.
    hosts = rootfs / "etc/hosts"
    if not hosts.exists():
        hosts.write_bytes(ETC_HOSTS)


def build_deps(work: Path, dest: Path, lower: Sequence[oci.Layer], log: Log) -> oci.Layer:
    """The venv at /opt/modelfleet with the project's dependencies, at their pinned versions."""
    rootfs = work / "rootfs"
    extract_layers(lower, rootfs, log)
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/")
    check_reachable(index.rstrip("/") + "/pip/", "the Python package index")
    requirements = project_dependencies(ROOT / "pyproject.toml")
    shutil.copyfile(ROOT / "constraints.txt", rootfs / "tmp/constraints.txt")
    before = oci.snapshot_tree(rootfs, "opt")
    log.say(f"pip install {len(requirements)} dependencies (constraints.txt) into {VENV}")
    with chroot_session(rootfs, network=True) as env:
        log.run(chroot_argv(rootfs, "python3", "-m", "venv", VENV), "python3 -m venv", env=env)
        pip = [f"{VENV}/bin/pip", "install", "--no-compile", "--only-binary=:all:"]
        log.run(
            chroot_argv(rootfs, *pip, "--constraint", "/tmp/constraints.txt", *requirements),
            f"pip install of the dependencies from {index}",
            env=env,
        )
    (rootfs / "tmp/constraints.txt").unlink()
    return _finish_venv_layer(rootfs, before, dest, "pip install -c constraints.txt", log)


def build_package(work: Path, dest: Path, lower: Sequence[oci.Layer], log: Log) -> oci.Layer:
    """The modelfleet package itself, on top of the dependencies; checked by running it."""
    rootfs = work / "rootfs"
    extract_layers(lower, rootfs, log)
    src = rootfs / "tmp/modelfleet-src"
    for path in source_files(ROOT):
        target = src / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    before = oci.snapshot_tree(rootfs, "opt")
    log.say("pip install modelfleet (no dependencies: the layer below has them)")
    with chroot_session(rootfs, network=True) as env:
        log.run(
            chroot_argv(
                rootfs,
                f"{VENV}/bin/pip",
                "install",
                "--no-compile",
                "--no-deps",
                "/tmp/modelfleet-src",
            ),
            "pip install of modelfleet",
            env=env,
        )
        log.run(chroot_argv(rootfs, f"{VENV}/bin/pip", "check"), "pip check", env=env)
    shutil.rmtree(src)
    layer = _finish_venv_layer(rootfs, before, dest, "pip install --no-deps modelfleet", log)
    check_runs(rootfs, log)
    return layer


def _finish_venv_layer(
    rootfs: Path, before: oci.Snapshot, dest: Path, created_by: str, log: Log
) -> oci.Layer:
    reset_mtimes(rootfs / "opt")
    with chroot_session(rootfs, network=False) as env:
        log.run(
            chroot_argv(
                rootfs,
                f"{VENV}/bin/python",
                "-m",
                "compileall",
                "-q",
                "-j0",
                "--invalidation-mode",
                "timestamp",
                f"{VENV}/lib",
            ),
            "compiling .pyc files",
            env=env,
        )
    builder = oci.LayerBuilder()
    oci.add_changes(builder, rootfs, before, "opt")
    return builder.write(dest, created_by=created_by)


def check_runs(rootfs: Path, log: Log) -> None:
    """Run the image's entrypoint the way a runtime would: its user, env and workdir."""
    config = modelfleet_config()
    with chroot_session(rootfs, network=False):
        argv = chroot_argv(
            rootfs,
            "sh",
            "-c",
            'cd "$1" && shift && exec "$@"',
            "sh",
            config.working_dir,
            *config.entrypoint,
            *config.cmd,
            user=config.user,
        )
        log.run(argv, "running `modelfleet --help` in the image", env=config.env_dict())


def build_pause(work: Path, dest: Path, log: Log) -> oci.Layer:
    """/bin/busybox from Debian's busybox-static, and the /pause script."""
    work.mkdir(parents=True, exist_ok=True)
    log.run(
        ["apt-get", "download", "-q", "busybox-static"],
        "apt-get download busybox-static",
        cwd=work,
    )
    deb = next(work.glob("busybox-static_*.deb"))
    keep = {"bin/busybox", "usr/share/doc/busybox-static/copyright"}
    builder = oci.LayerBuilder()
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        builder.add_tar(proc.stdout, select=lambda name: name if name in keep else None)
    if proc.returncode != 0 or "bin/busybox" not in builder.names():
        raise BuildError(f"{deb.name} holds no bin/busybox")
    builder.add_file("pause", PAUSE_SCRIPT, mode=0o755)
    return builder.write(dest, created_by="busybox-static /bin/busybox + /pause")


def ensure_debootstrap(log: Log) -> None:
    if shutil.which("debootstrap"):
        return
    log.say("installing debootstrap (apt-get install -y --no-install-recommends debootstrap)")
    log.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"],
        "apt-get install debootstrap",
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


# --- the cache ------------------------------------------------------------------------------


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelfleet" / "images"


@dataclass(frozen=True)
class Stage:
    name: str
    key: str
    # (work directory, layer destination, the layers below, log) -> the layer
    build: Callable[[Path, Path, Sequence[oci.Layer], Log], oci.Layer]


class Cache:
    """Layers as `layers/<stage>-<key>.tar.gz` with a `.json` beside each; archives at the top."""

    def __init__(self, root: Path, log: Log) -> None:
        self.root = root
        self.log = log
        self.used: set[Path] = set()

    def layer(
        self,
        stage: Stage,
        lower: Sequence[oci.Layer],
        *,
        rebuild: bool = False,
        cached_only: bool = False,
    ) -> oci.Layer:
        blob = self.root / "layers" / f"{stage.name}-{stage.key}.tar.gz"
        meta = blob.with_suffix("").with_suffix(".json")
        self.used |= {blob, meta}
        if meta.is_file() and blob.is_file() and not rebuild:
            data = json.loads(meta.read_text())
            return oci.Layer.from_json({**data, "path": str(blob)})
        if cached_only:
            raise BuildError(f"the {stage.name} layer is not built: run `hack/images.py build`")
        work = self.root / "work" / f"{stage.name}-{os.getpid()}"
        remove_tree(work)
        started = time.monotonic()
        self.log.say(f"building the {stage.name} layer ({stage.key})")
        try:
            layer = stage.build(work, blob, lower, self.log)
        finally:
            remove_tree(work)
        data = {k: v for k, v in layer.to_json().items() if k != "path"}
        meta.write_text(json.dumps(data, indent=2) + "\n")
        self.log.say(
            f"{stage.name} layer: {layer.size / 2**20:.1f} MiB compressed, "
            f"{time.monotonic() - started:.0f} s"
        )
        return layer

    def prune(self, stage_names: set[str]) -> None:
        """Remove files of the given stages that this build did not use."""
        for path in (self.root / "layers").glob("*"):
            stage = path.name.split("-", 1)[0]
            if stage in stage_names and path not in self.used:
                path.unlink()


def _root_needed(what: str) -> None:
    if os.geteuid() != 0:
        raise BuildError(
            f"{what} runs debootstrap and chroot, which need root: run "
            "`sudo hack/images.py build` (or `sudo make image`); "
            "`hack/images.py build --image pause` needs no root"
        )


def modelfleet_stages() -> list[Stage]:
    """The modelfleet image's layers: Debian and Python, the pinned dependencies, the package."""
    mirrors = find_mirrors()
    base_key = compute_key(
        SUITE,
        mirrors.main,
        mirrors.security,
        BASE_PACKAGES,
        SLIM_GLOBS,
        SLIM_KEEP,
        ETC_HOSTS,
        RECOMPILE_PYC,
        DPKG_EXCLUDES,
        WRITER,
        build_base,
        slim_rootfs,
    )
    deps_key = compute_key(
        base_key,
        (ROOT / "constraints.txt").read_bytes(),
        project_dependencies(ROOT / "pyproject.toml"),
        build_deps,
        _finish_venv_layer,
    )
    src_key = compute_key(
        deps_key,
        build_package,
        check_runs,
        *(p.read_bytes() for p in source_files(ROOT)),
        *(str(p.relative_to(ROOT)) for p in source_files(ROOT)),
    )
    return [
        Stage("base", base_key, partial(build_base, mirrors=mirrors)),
        Stage("deps", deps_key, build_deps),
        Stage("src", src_key, build_package),
    ]


def build_images(
    names: Sequence[str],
    *,
    cache: Cache,
    rebuild: set[str],
    cached_only: bool,
) -> dict[str, tuple[Path, str]]:
    """Build (or find) each named image; returns name -> (archive path, reference)."""
    results: dict[str, tuple[Path, str]] = {}
    log = cache.log
    for name in names:
        if name == "pause":
            version = _candidate_version("busybox-static")
            stages = [
                Stage(
                    "pause",
                    compute_key(version, PAUSE_SCRIPT, build_pause, WRITER),
                    lambda work, dest, _, log: build_pause(work, dest, log),
                ),
            ]
            config, reference = pause_config(), PAUSE_REFERENCE
        else:
            if not cached_only:
                _root_needed(f"building the {name} image")
            stages = modelfleet_stages()
            if name == "vllm-sim":
                config, reference = vllm_sim_config(), VLLM_SIM_REFERENCE
            else:
                config, reference = modelfleet_config(), MODELFLEET_REFERENCE
        layers: list[oci.Layer] = []
        for stage in stages:
            force = stage.name in rebuild or "all" in rebuild
            layers.append(cache.layer(stage, layers, rebuild=force, cached_only=cached_only))
        plan = oci.plan_image(layers, config, reference)
        archive = cache.root / f"{name}-{plan.manifest_digest.removeprefix('sha256:')[:16]}.tar"
        if not archive.is_file():
            if cached_only:
                raise BuildError(f"the {name} image is not built: run `hack/images.py build`")
            oci.write_plan(archive, plan)
            log.say(f"wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
        for old in cache.root.glob(f"{name}-*.tar"):
            if old != archive:
                old.unlink()
        cache.prune({s.name for s in stages})
        results[name] = (archive, reference)
    return results


def _candidate_version(package: str) -> str:
    proc = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise BuildError(f"apt knows no {package} package: run `apt-get update`")


def format_results(results: Mapping[str, tuple[Path, str]]) -> list[str]:
    """`name=<archive>` and `name_ref=<reference>` lines, shell-quoted so `eval` can read them."""
    lines = []
    for name, (path, reference) in results.items():
        var = name.replace("-", "_")  # a shell variable name
        lines += [f"{var}={shlex.quote(str(path))}", f"{var}_ref={shlex.quote(reference)}"]
    return lines


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or find in the cache) the images")
    build.add_argument(
        "--image",
        action="append",
        choices=IMAGES,
        help="only this image (repeatable; default: both)",
    )
    build.add_argument(
        "--rebuild",
        action="append",
        default=[],
        choices=["base", "deps", "src", "pause", "all"],
        help="rebuild this layer even if cached (base: pick up Debian updates)",
    )
    build.add_argument(
        "--cached-only",
        action="store_true",
        help="print the archives if they are built, fail otherwise",
    )
    build.add_argument(
        "--copy-to",
        type=Path,
        metavar="DIR",
        help="also copy each archive to DIR/<name>-image.oci.tar",
    )
    sub.add_parser("refs", help="print the image references (name_ref=...)")
    args = parser.parse_args(argv)
    # A signal ends the build through the finally blocks, which unmount what the chroots use.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    if args.command == "refs":
        print(
            f"pause_ref={PAUSE_REFERENCE}\nmodelfleet_ref={MODELFLEET_REFERENCE}\n"
            f"vllm_sim_ref={VLLM_SIM_REFERENCE}"
        )
        return 0
    names = args.image or list(IMAGES)
    root = cache_dir()
    try:
        if "modelfleet" in names and not args.cached_only:
            _root_needed("building the modelfleet image")
        log = Log(root / "logs" / "build.log")
    except (BuildError, OSError) as err:
        print(f"images: error: {err}", file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        results = build_images(
            names,
            cache=Cache(root, log),
            rebuild=set(args.rebuild),
            cached_only=args.cached_only,
        )
    except BuildError as err:
        print(f"images: error: {err}", file=sys.stderr)
        return 1
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for name, (path, reference) in list(results.items()):
            copy = args.copy_to / f"{name}-image.oci.tar"
            tmp = copy.with_name(copy.name + ".partial")
            shutil.copyfile(path, tmp)
            os.replace(tmp, copy)
            results[name] = (copy, reference)
    log.say(f"done in {time.monotonic() - started:.1f} s")
    print("\n".join(format_results(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
