"""Real kubelet nodes for the local control plane: kubelet, containerd and a fake NVIDIA driver.

Beside the kwok nodes of hack/cluster.sh, each real node is an upstream kubelet with its own
containerd, state directories, cgroup root and device-plugin directory, a `system:node:<name>`
identity signed by the cluster CA, and the project's GPU device plugin over a per-node GPU
inventory (`modelfleet sim-gpu-plugin`). Nothing is installed on the machine beyond the Debian
packages of hack/install-node-deps.sh; everything else lives under .cluster/real/ and in
namespaces this script creates:

- one network namespace (`ip netns`) per cluster holds the node and pod addresses (10.<o>.0.0/17,
  a bridge, pods wired by the Debian CNI bridge plugin). Traffic from the machine reaches them
  through a veth pair; nothing routes on to any other address. The kubelets reach the API server
  (which listens on 127.0.0.1 of the machine) through a forwarder that listens inside the
  namespace, on 127.0.0.1 with the API server's port and on the `kubernetes` Service address;
- one mount namespace per node (held by a small holder process) gives the node private /run,
  /var/lib and /var/log tmpfs mounts: /var/lib/kubelet (the kubelet's hard-coded device-plugin
  directory included) is the node's own directory, and what containerd mounts (shim sockets,
  pod network namespaces, container root filesystems) disappears with the namespace;
- containers that name GPUs in NVIDIA_VISIBLE_DEVICES get the node's fake driver directory
  mounted, as the NVIDIA container runtime injects the driver (hack/fake_nvidia_runtime.py).

    python hack/realnodes.py up --nodes hack/real-nodes.yaml ...   (hack/cluster.sh calls it)
    python hack/realnodes.py down|status
    python hack/realnodes.py restart-kubelet NODE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLONE_NEWNET = 0x40000000
# The `kubernetes` Service address pods dial (the first of the service range). It exists only on
# the loopback of the real nodes' own network namespace, where the API forwarder listens on it.
KUBERNETES_SERVICE_IP = "10.0.0.1"
FAKE_DRIVER_PATH = "/var/lib/modelfleet/fake-gpu"  # inside a node's mount namespace
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"  # inside a node's mount namespace
NODE_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
REAL_NODE_LABEL = "modelfleet.io/test-node"
CNI_BRIDGE = "mfbr0"
NETNS_UPLINK = "uplink"


def log(msg: str) -> None:
    print(f"[real-nodes] {msg}", file=sys.stderr, flush=True)


class RealNodeError(RuntimeError):
    """A real node cannot start; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: int
    product: str
    memory_mib: int


@dataclass(frozen=True)
class Layout:
    """Names and addresses of one cluster's real nodes, all derived from the cluster name."""

    root: Path  # .cluster/real
    cluster: str  # mf-<hash>
    octet: int

    @property
    def netns(self) -> str:
        return self.cluster

    @property
    def veth(self) -> str:
        return self.cluster[:15]

    @property
    def net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{self.octet}.0.0/16")

    @property
    def bridge_ip(self) -> str:
        return f"10.{self.octet}.0.1"

    @property
    def host_link_ip(self) -> str:
        return f"10.{self.octet}.255.1"

    @property
    def ns_link_ip(self) -> str:
        return f"10.{self.octet}.255.2"

    def node_ip(self, i: int) -> str:
        return f"10.{self.octet}.0.{10 + i}"

    def node_dir(self, name: str) -> Path:
        return self.root / name

    def cgroup_root(self, name: str) -> str:
        return f"/modelfleet-{self.cluster}-{name}"


def load_nodes(path: Path) -> list[NodeSpec]:
    doc = yaml.safe_load(path.read_text()) or {}
    nodes: list[NodeSpec] = []
    for i, raw in enumerate(doc.get("nodes") or []):
        try:
            nodes.append(
                NodeSpec(
                    name=str(raw["name"]),
                    gpus=int(raw["gpus"]),
                    product=str(raw.get("product", "NVIDIA-L4")),
                    memory_mib=int(raw.get("memoryMiB", 23034)),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RealNodeError(f"{path}: nodes[{i}]: {exc!r}; each needs name and gpus") from None
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise RealNodeError(f"{path}: node names repeat: {names}")
    if len(nodes) > 200:
        raise RealNodeError(f"{path}: at most 200 real nodes")
    return nodes


# ---------------------------------------------------------------------------------------------
# Small helpers


def run(*cmd: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RealNodeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    if not quiet and proc.returncode != 0:
        log(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def wait_until(what: str, check: Any, timeout: float, *, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = ""
    if log_file is not None and log_file.exists():
        tail = "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
    raise RealNodeError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def spawn(
    cmd: Sequence[str], log_file: Path, pid_file: Path, env: dict[str, str] | None = None
) -> int:
    """Start a daemon in its own session; its output goes to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def stop_pids(pids: Sequence[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions `text` (a directory of ours): never anyone else's."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def processes_in_mount_ns_of(pid: int) -> list[int]:
    """Processes that share `pid`'s mount namespace (a node's: its holder, daemons and shims)."""
    try:
        target = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == target:
                    found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------------------------------
# cgroups


def cgroup_mounts() -> list[tuple[Path, bool]]:
    """(mount point, is cgroup v2) of every cgroup hierarchy of this machine."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype in ("cgroup", "cgroup2"):
            mounts.append((Path(left.split()[4]), fstype == "cgroup2"))
    return mounts


def create_cgroup_root(name: str) -> None:
    for mount, v2 in cgroup_mounts():
        path = mount / name.lstrip("/")
        path.mkdir(exist_ok=True)
        if v2:
            wanted = (mount / "cgroup.subtree_control").read_text().split()
            with contextlib.suppress(OSError):
                (path / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))


def cgroup_procs(name: str) -> set[int]:
    pids: set[int] = set()
    for mount, _ in cgroup_mounts():
        base = mount / name.lstrip("/")
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def remove_cgroup_root(name: str) -> list[str]:
    """Kill what runs in the node's cgroups and remove them, deepest first; what is left."""
    for _ in range(50):
        pids = cgroup_procs(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    left = []
    for mount, _ in cgroup_mounts():
        base = mount / name.lstrip("/")
        if not base.is_dir():
            continue
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, base]:
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.1)
        if base.exists():
            left.append(str(base))
    return left


# ---------------------------------------------------------------------------------------------
# The network namespace


def netns_exists(layout: Layout) -> bool:
    return Path("/run/netns", layout.netns).exists()


def check_address_range(layout: Layout) -> None:
    """Refuse a range that this machine already routes: its traffic must stay ours."""
    out = run("ip", "-4", "-o", "route", "show").stdout + run("ip", "-4", "-o", "addr").stdout
    for token in out.split():
        with contextlib.suppress(ValueError):
            other = ipaddress.IPv4Network(token, strict=False)
            if other.prefixlen > 0 and other.overlaps(layout.net):
                raise RealNodeError(
                    f"{layout.net} overlaps {other}, which this machine already uses; the "
                    "real nodes' range derives from the checkout path (hack/cluster.sh OCTET)"
                )


def create_netns(layout: Layout, nodes: list[NodeSpec]) -> None:
    ns = layout.netns
    check_address_range(layout)
    run("ip", "netns", "add", ns)
    try:
        nx = ("ip", "-n", ns)
        run(*nx, "link", "set", "lo", "up")
        run(*nx, "addr", "add", f"{KUBERNETES_SERVICE_IP}/32", "dev", "lo")
        run(*nx, "link", "add", CNI_BRIDGE, "type", "bridge")
        run(*nx, "addr", "add", f"{layout.bridge_ip}/17", "dev", CNI_BRIDGE)
        for i, _ in enumerate(nodes):
            run(*nx, "addr", "add", f"{layout.node_ip(i)}/32", "dev", CNI_BRIDGE)
        run(*nx, "link", "set", CNI_BRIDGE, "up")
        run(
            "ip",
            "link",
            "add",
            layout.veth,
            "type",
            "veth",
            "peer",
            "name",
            NETNS_UPLINK,
            "netns",
            ns,
        )
        run("ip", "addr", "add", f"{layout.host_link_ip}/30", "dev", layout.veth)
        run("ip", "link", "set", layout.veth, "up")
        run(*nx, "addr", "add", f"{layout.ns_link_ip}/30", "dev", NETNS_UPLINK)
        run(*nx, "link", "set", NETNS_UPLINK, "up")
        # The machine reaches node and pod addresses through the veth; the namespace routes
        # nothing further (no default route): pods reach only each other, the nodes and the
        # forwarded API server.
        run(
            "ip",
            "route",
            "add",
            f"10.{layout.octet}.0.0/17",
            "via",
            layout.ns_link_ip,
            "dev",
            layout.veth,
            "src",
            layout.host_link_ip,
        )
        run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    except Exception:
        delete_netns(layout)
        raise


def delete_netns(layout: Layout) -> None:
    if netns_exists(layout):
        run("ip", "netns", "delete", layout.netns, check=False)
    run("ip", "link", "delete", layout.veth, check=False, quiet=True)


# ---------------------------------------------------------------------------------------------
# The API server forwarder (runs as its own process: `realnodes.py _forward`)


def listen_in_netns(netns: str, host: str, port: int) -> socket.socket:
    """A listening socket in another network namespace (sockets keep the namespace they were
    made in, so the rest of this process stays in the machine's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            sock = socket.create_server((host, port), backlog=512)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
    sock.setblocking(False)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def forward(
    netns: str,
    listen: list[tuple[str, int]],
    target: tuple[str, int],
    service: tuple[str, int] | None = None,
    tls: tuple[Path, Path, Path] | None = None,
) -> None:
    """Pipe connections made inside `netns` to `target` in the machine's namespace.

    `listen` addresses pass bytes through (the kubelets speak TLS end to end with the API
    server). `service` is the `kubernetes` Service address that pods dial: the API server's
    certificate does not name it, so there this forwarder terminates TLS with a certificate of
    the cluster CA that does (`tls`: cert, key, CA) and opens TLS to the API server with the ALPN
    protocol the pod chose. Pods authenticate with bearer tokens, which pass through unchanged.
    """

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    servers = [
        await asyncio.start_server(plain, sock=listen_in_netns(netns, host, port))
        for host, port in listen
    ]
    if service is not None and tls is not None:
        cert, key, ca = tls
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        server_ctx.set_alpn_protocols(["h2", "http/1.1"])

        async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ssl_object = writer.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
            client_ctx = ssl.create_default_context(cafile=str(ca))
            if alpn:
                client_ctx.set_alpn_protocols([alpn])
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    *target, ssl=client_ctx, server_hostname=target[0]
                )
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        sock = listen_in_netns(netns, *service)
        servers.append(await asyncio.start_server(terminate, sock=sock, ssl=server_ctx))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def write_service_certificate(root: Path, pki: Path) -> tuple[Path, Path]:
    """A serving certificate of the cluster CA for the `kubernetes` Service address."""
    key, csr, crt, ext = (root / f"service.{s}" for s in ("key", "csr", "crt", "ext"))
    names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    sans = ",".join([f"IP:{KUBERNETES_SERVICE_IP}", *(f"DNS:{n}" for n in names)])
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    run("openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/CN=kubernetes")
    run(
        "openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"),
        "-CAkey", str(pki / "ca.key"), "-CAserial", str(root / "ca.srl"), "-CAcreateserial",
        "-days", "30", "-extfile", str(ext), "-out", str(crt),
    )  # fmt: skip
    return crt, key


# ---------------------------------------------------------------------------------------------
# A node's mount namespace holder (runs as `realnodes.py _holder`, inside the netns)


def holder(node_dir: Path) -> None:
    """Private /run, /var/lib and /var/log for the node, then wait for SIGTERM."""
    mounts = [
        ("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run"),
        ("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/var/lib"),
        ("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/var/log"),
    ]
    subprocess.run(["mount", "--make-rslave", "/"], check=True)
    for m in mounts:
        subprocess.run(["mount", *m], check=True)
    kubelet_dir = Path("/var/lib/kubelet")
    driver = Path(FAKE_DRIVER_PATH)
    kubelet_dir.mkdir(parents=True)
    driver.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(node_dir / "kubelet"), str(kubelet_dir)], check=True)
    # The kubelet wants its root directory on a shared mount (mount propagation of volumes).
    subprocess.run(["mount", "--make-rshared", str(kubelet_dir)], check=True)
    subprocess.run(["mount", "--bind", str(node_dir / "gpu"), str(driver)], check=True)
    (node_dir / "holder.ready").write_text("ok\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


# ---------------------------------------------------------------------------------------------
# Node files


def kubeconfig_server(kubeconfig: Path) -> tuple[str, int, str]:
    """(host, port, CA data) of the cluster's API server, from the admin kubeconfig."""
    doc = yaml.safe_load(kubeconfig.read_text())
    cluster = doc["clusters"][0]["cluster"]
    server = cluster["server"]
    hostport = server.split("://", 1)[1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), cluster.get("certificate-authority-data", "")


def write_node_identity(d: Path, name: str, pki: Path, server: str) -> None:
    """A client certificate for system:node:<name>, signed by the cluster CA, and its kubeconfig."""
    out = d / "pki"
    out.mkdir(parents=True, exist_ok=True)
    key, csr, crt = out / "node.key", out / "node.csr", out / "node.crt"
    if not crt.exists():
        run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
        subject = f"/O=system:nodes/CN=system:node:{name}"
        run("openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject)
        run(
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(pki / "ca.crt"),
            "-CAkey",
            str(pki / "ca.key"),
            "-CAserial",
            str(out / "ca.srl"),
            "-CAcreateserial",
            "-days",
            "30",
            "-out",
            str(crt),
        )
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [{"name": name, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
        "contexts": [{"name": "node", "context": {"cluster": "local", "user": name}}],
        "current-context": "node",
    }
    (d / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))


def write_containerd_config(d: Path, pause_image: str) -> Path:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    text = f"""# Written by hack/realnodes.py for this node only.
version = 2
root = "{d}/containerd/root"
# The node's own /run (a tmpfs of its mount namespace): short socket paths, gone with the node.
state = "/run/containerd/state"
[grpc]
  address = "{CONTAINERD_SOCKET}"
[ttrpc]
  address = "{CONTAINERD_SOCKET}.ttrpc"
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{pause_image}"
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Without CAP_SYS_RESOURCE here, runc cannot lower oom_score_adj below its parent's.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "/run/containerd/runc"
        # runc behind the fake NVIDIA runtime hook (hack/fake_nvidia_runtime.py).
        BinaryName = "{d}/nvidia-runtime"
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
"""
    path = d / "containerd" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_cni_config(d: Path, layout: Layout, i: int) -> None:
    o = layout.octet
    conf = {
        "cniVersion": "0.4.0",
        "name": "modelfleet-real-nodes",
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(d / "cni" / "ipam"),
                    "ranges": [
                        [
                            {
                                "subnet": f"10.{o}.0.0/17",
                                "rangeStart": f"10.{o}.{i + 1}.2",
                                "rangeEnd": f"10.{o}.{i + 1}.254",
                                "gateway": layout.bridge_ip,
                            }
                        ]
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }
    net_d = d / "cni" / "net.d"
    net_d.mkdir(parents=True, exist_ok=True)
    (net_d / "10-modelfleet.conflist").write_text(json.dumps(conf, indent=2))


def write_runtime_wrapper(d: Path) -> None:
    """runc for containerd: `create` goes through the fake NVIDIA runtime hook first."""
    runc = shutil.which("runc") or "/usr/sbin/runc"
    hook = ROOT / "hack" / "fake_nvidia_runtime.py"
    script = f"""#!/bin/sh
# Written by hack/realnodes.py: runc, with the fake NVIDIA runtime's hook on `create`.
for a in "$@"; do
  if [ "$a" = create ]; then
    exec "{sys.executable}" "{hook}" --driver-dir "{FAKE_DRIVER_PATH}" --runc "{runc}" -- "$@"
  fi
done
exec "{runc}" "$@"
"""
    path = d / "nvidia-runtime"
    path.write_text(script)
    path.chmod(0o755)


def write_kubelet_config(d: Path, layout: Layout, i: int, node: NodeSpec, pki: Path) -> Path:
    ip = layout.node_ip(i)
    sock = f"unix://{CONTAINERD_SOCKET}"
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": ip,
        "healthzPort": 10248,
        "containerRuntimeEndpoint": sock,
        "imageServiceEndpoint": sock,
        # This machine: cgroup v1, not booted by systemd.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupRoot": layout.cgroup_root(node.name),
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        "staticPodPath": str(d / "manifests"),
        "podLogsDir": str(d / "logs" / "pods"),
        "resolvConf": "",
        # Only the API server (the cluster CA's admin certificate) may call this kubelet.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},
        # One small disk shared by every node of the machine: evict only when it is truly full.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # Allocatable GPUs and conditions reach the Node within seconds, not the default 10 s.
        "nodeStatusUpdateFrequency": "2s",
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "serializeImagePulls": False,
        "registerWithTaints": [NODE_TAINT],
        "maxPods": 110,
    }
    (d / "manifests").mkdir(parents=True, exist_ok=True)
    path = d / "kubelet-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def node_labels(node: NodeSpec) -> str:
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": node.product,
        "nvidia.com/gpu.count": str(node.gpus),
        "nvidia.com/gpu.memory": str(node.memory_mib),
        REAL_NODE_LABEL: "real",
    }
    return ",".join(f"{k}={v}" for k, v in labels.items())


# ---------------------------------------------------------------------------------------------
# Up, down, status


@dataclass(frozen=True)
class Context:
    layout: Layout
    nodes: list[NodeSpec]
    bin_dir: Path
    kubeconfig: Path
    pki: Path
    images: list[Path]
    pause_image: str
    record: dict[str, Any]  # what `up` leaves for the other commands (context.json)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            str(self.bin_dir / "kubectl"),
            "--kubeconfig",
            str(self.kubeconfig),
            "--request-timeout=10s",
            *args,
            check=check,
            quiet=not check,
        )


def modelfleet_cli() -> str:
    return str(Path(sys.executable).with_name("modelfleet"))


def in_node(d: Path, *cmd: str) -> list[str]:
    holder_pid = read_pid(d / "pids" / "holder.pid")
    if holder_pid is None:
        raise RealNodeError(f"node {d.name}: its namespace holder is not running")
    return ["nsenter", "-t", str(holder_pid), "-m", "-n", "--", *cmd]


def kubelet_command(ctx: Context, d: Path, i: int, node: NodeSpec) -> list[str]:
    return in_node(
        d,
        str(ctx.bin_dir / "kubelet"),
        f"--config={d / 'kubelet-config.yaml'}",
        f"--kubeconfig={d / 'kubeconfig'}",
        "--root-dir=/var/lib/kubelet",
        f"--hostname-override={node.name}",
        f"--node-ip={ctx.layout.node_ip(i)}",
        f"--node-labels={node_labels(node)}",
        "--v=1",
    )


def start_node(ctx: Context, i: int, node: NodeSpec, server: str) -> None:
    layout = ctx.layout
    d = layout.node_dir(node.name)
    started = time.monotonic()
    for sub in ("kubelet", "gpu", "logs", "pids", "runc"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    write_node_identity(d, node.name, ctx.pki, server)
    write_containerd_config(d, ctx.pause_image)
    write_cni_config(d, layout, i)
    write_runtime_wrapper(d)
    write_kubelet_config(d, layout, i, node, ctx.pki)
    run(
        modelfleet_cli(),
        "sim-gpu-driver",
        "init",
        "--dir",
        str(d / "gpu"),
        "--node",
        node.name,
        "--count",
        str(node.gpus),
        "--memory-mib",
        str(node.memory_mib),
        "--product",
        node.product,
    )
    create_cgroup_root(layout.cgroup_root(node.name))
    logs = d / "logs"
    (d / "holder.ready").unlink(missing_ok=True)
    spawn(
        [
            "nsenter",
            f"--net=/run/netns/{layout.netns}",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            __file__,
            "_holder",
            "--node-dir",
            str(d),
        ],
        logs / "holder.log",
        d / "pids" / "holder.pid",
    )
    wait_until(
        f"node {node.name}'s namespaces",
        (d / "holder.ready").exists,
        10,
        log_file=logs / "holder.log",
    )
    sock = node_path(d, CONTAINERD_SOCKET)
    spawn(
        in_node(d, "containerd", "--config", str(d / "containerd" / "config.toml")),
        logs / "containerd.log",
        d / "pids" / "containerd.pid",
    )
    wait_until(f"containerd of {node.name}", sock.exists, 20, log_file=logs / "containerd.log")
    import_images(ctx, d)
    spawn(
        in_node(
            d,
            modelfleet_cli(),
            "sim-gpu-plugin",
            "--dir",
            FAKE_DRIVER_PATH,
            "--plugin-dir",
            "/var/lib/kubelet/device-plugins",
        ),
        logs / "gpu-plugin.log",
        d / "pids" / "gpu-plugin.pid",
    )
    spawn(kubelet_command(ctx, d, i, node), logs / "kubelet.log", d / "pids" / "kubelet.pid")
    wait_until(
        f"node {node.name} Ready with {node.gpus} allocatable nvidia.com/gpu",
        lambda: node_ready(ctx, node),
        60,
        log_file=logs / "kubelet.log",
    )
    log(
        f"node {node.name} Ready in {time.monotonic() - started:.1f}s "
        f"({node.gpus} GPUs, IP {layout.node_ip(i)})"
    )


def node_path(d: Path, path: str) -> Path:
    """`path` inside the node's mount namespace, as this process can open it (sockets too)."""
    holder_pid = read_pid(d / "pids" / "holder.pid")
    if holder_pid is None:
        raise RealNodeError(f"node {d.name}: its namespace holder is not running")
    return Path(f"/proc/{holder_pid}/root{path}")


def import_images(ctx: Context, d: Path) -> None:
    sock = node_path(d, CONTAINERD_SOCKET)
    for image in ctx.images:
        run(
            "ctr",
            "-a",
            str(sock),
            "-n",
            "k8s.io",
            "images",
            "import",
            "--platform",
            "linux/amd64",
            str(image),
        )


def node_ready(ctx: Context, node: NodeSpec) -> bool:
    out = ctx.kubectl("get", "node", node.name, "-o", "json", check=False)
    if out.returncode != 0:
        return False
    obj = json.loads(out.stdout)
    ready = any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in obj.get("status", {}).get("conditions", [])
    )
    gpus = obj.get("status", {}).get("allocatable", {}).get("nvidia.com/gpu", "0")
    return ready and str(gpus) == str(node.gpus)


def preflight(ctx: Context) -> None:
    if os.geteuid() != 0:
        raise RealNodeError(
            "real nodes need root (a kubelet, containerd, network and mount namespaces); run as "
            "root or without real nodes (REAL_NODES=0)"
        )
    if not (ctx.bin_dir / "kubelet").exists():
        raise RealNodeError(f"no kubelet in {ctx.bin_dir}: run hack/build-control-plane.sh")
    missing = [
        t
        for t in ("containerd", "ctr", "runc", "ip", "nsenter", "unshare", "openssl")
        if shutil.which(t) is None
    ]
    if missing:
        raise RealNodeError(f"missing {missing}: run hack/install-node-deps.sh")
    if not Path(modelfleet_cli()).exists():
        raise RealNodeError(f"no modelfleet CLI beside {sys.executable}: run `make install`")


def cmd_up(ctx: Context) -> None:
    started = time.monotonic()
    preflight(ctx)
    layout = ctx.layout
    if is_up(ctx):
        # The images may have been rebuilt since (a source change): new containers get them.
        for node in ctx.nodes:
            import_images(ctx, ctx.layout.node_dir(node.name))
        log(f"{len(ctx.nodes)} real nodes already up")
        return
    cmd_down(ctx, quiet=True)
    layout.root.mkdir(parents=True, exist_ok=True)
    (layout.root / "nodes.json").write_text(json.dumps([n.name for n in ctx.nodes]))
    (layout.root / "context.json").write_text(json.dumps(ctx.record, indent=2))
    create_netns(layout, ctx.nodes)
    host, port, _ = kubeconfig_server(ctx.kubeconfig)
    cert, key = write_service_certificate(layout.root, ctx.pki)
    spawn(
        [
            sys.executable,
            __file__,
            "_forward",
            "--netns",
            layout.netns,
            "--listen",
            f"127.0.0.1:{port}",
            "--service",
            f"{KUBERNETES_SERVICE_IP}:443",
            "--tls",
            f"{cert},{key},{ctx.pki / 'ca.crt'}",
            "--to",
            f"{host}:{port}",
        ],
        layout.root / "forwarder.log",
        layout.root / "forwarder.pid",
    )
    try:
        # The nodes start side by side: most of a start is waiting (image import, registration).
        with ThreadPoolExecutor(max_workers=max(len(ctx.nodes), 1)) as pool:
            starts = [
                pool.submit(start_node, ctx, i, node, f"https://127.0.0.1:{port}")
                for i, node in enumerate(ctx.nodes)
            ]
            for start in starts:
                start.result()
    except BaseException:
        # Nothing half-started stays behind but the logs, kept beside the node directory.
        kept = layout.root.with_name(layout.root.name + "-failed-logs")
        shutil.rmtree(kept, ignore_errors=True)
        for node in ctx.nodes:
            with contextlib.suppress(OSError):
                shutil.copytree(layout.node_dir(node.name) / "logs", kept / node.name)
        log(f"a real node did not start; stopping what did (logs kept in {kept})")
        cmd_down(ctx, quiet=True)
        raise
    log(f"{len(ctx.nodes)} real nodes up in {time.monotonic() - started:.1f}s")


def is_up(ctx: Context) -> bool:
    if not netns_exists(ctx.layout) or read_pid(ctx.layout.root / "forwarder.pid") is None:
        return False
    for node in ctx.nodes:
        d = ctx.layout.node_dir(node.name)
        for proc in ("holder", "containerd", "gpu-plugin", "kubelet"):
            if read_pid(d / "pids" / f"{proc}.pid") is None:
                return False
        if not node_ready(ctx, node):
            return False
    return True


def stop_node(layout: Layout, name: str) -> list[str]:
    d = layout.node_dir(name)
    pids = d / "pids"
    for proc in ("kubelet", "gpu-plugin", "containerd"):
        pid = read_pid(pids / f"{proc}.pid")
        if pid is not None:
            stop_pids([pid])
    # containerd's shims (they outlive containerd) and anything else of the node: every process
    # in its mount namespace, and any started from its directory.
    holder_pid = read_pid(pids / "holder.pid")
    rest = processes_mentioning(str(d) + "/")
    if holder_pid is not None:
        rest += [p for p in processes_in_mount_ns_of(holder_pid) if p != holder_pid]
    stop_pids(sorted(set(rest)), timeout=5)
    left = remove_cgroup_root(layout.cgroup_root(name))
    if holder_pid is not None:
        stop_pids([holder_pid])
    return left


def cmd_down(ctx: Context, *, quiet: bool = False) -> None:
    layout = ctx.layout
    names = {n.name for n in ctx.nodes}
    with contextlib.suppress(OSError, ValueError):
        names.update(json.loads((layout.root / "nodes.json").read_text()))
    if layout.root.is_dir():
        names.update(p.name for p in layout.root.iterdir() if (p / "pids").is_dir())
    left: list[str] = []
    for name in sorted(names):
        left += stop_node(layout, name)
    # Cgroups of nodes whose directory is gone already (a run killed half-way).
    prefix = layout.cgroup_root("")
    for mount, _ in cgroup_mounts():
        for path in mount.glob(prefix.lstrip("/") + "*"):
            left += remove_cgroup_root("/" + path.name)
    pid = read_pid(layout.root / "forwarder.pid")
    if pid is not None:
        stop_pids([pid])
    stop_pids(processes_mentioning(str(layout.root) + "/"), timeout=5)
    delete_netns(layout)
    if ctx.kubeconfig.is_file() and (ctx.bin_dir / "kubectl").is_file() and names:
        ctx.kubectl(
            "delete", "node", "--ignore-not-found", "--wait=false", *sorted(names), check=False
        )
    shutil.rmtree(layout.root, ignore_errors=True)
    leftovers = [*left, *leaks(layout)]
    if leftovers:
        raise RealNodeError(f"left behind after stopping the real nodes: {leftovers}")
    if not quiet:
        log(f"real nodes down ({', '.join(sorted(names)) or 'none were up'})")


def leaks(layout: Layout) -> list[str]:
    """What of this cluster's real nodes is still on the machine: processes, mounts, cgroups,
    network namespace and link, files."""
    found = [f"process {p}" for p in processes_mentioning(str(layout.root) + "/")]
    mountinfo = Path("/proc/self/mountinfo").read_text()
    found += [
        f"mount {line.split()[4]}" for line in mountinfo.splitlines() if str(layout.root) in line
    ]
    for mount, _ in cgroup_mounts():
        found += [f"cgroup {p}" for p in mount.glob(f"modelfleet-{layout.cluster}-*")]
    if netns_exists(layout):
        found.append(f"network namespace {layout.netns}")
    if Path("/sys/class/net", layout.veth).exists():
        found.append(f"link {layout.veth}")
    if layout.root.exists():
        found.append(f"directory {layout.root}")
    return found


def cmd_status(ctx: Context) -> int:
    if not netns_exists(ctx.layout):
        log("real nodes are down")
        return 1
    ok = True
    for node in ctx.nodes:
        d = ctx.layout.node_dir(node.name)
        states = {
            proc: "running" if read_pid(d / "pids" / f"{proc}.pid") else "stopped"
            for proc in ("holder", "containerd", "gpu-plugin", "kubelet")
        }
        ready = node_ready(ctx, node)
        ok = ok and ready and all(s == "running" for s in states.values())
        shown = " ".join(f"{k}={v}" for k, v in states.items())
        log(f"{node.name}: {'Ready' if ready else 'NotReady'} {shown} (logs: {d / 'logs'})")
    return 0 if ok else 1


def cmd_restart_kubelet(ctx: Context, name: str) -> None:
    """Stop the node's kubelet and start it again, as `systemctl restart kubelet` would."""
    index = {n.name: i for i, n in enumerate(ctx.nodes)}
    if name not in index:
        raise RealNodeError(f"no real node {name!r}; real nodes: {sorted(index)}")
    d = ctx.layout.node_dir(name)
    pid = read_pid(d / "pids" / "kubelet.pid")
    if pid is not None:
        stop_pids([pid])
    spawn(
        kubelet_command(ctx, d, index[name], ctx.nodes[index[name]]),
        d / "logs" / "kubelet.log",
        d / "pids" / "kubelet.pid",
    )
    log(f"kubelet of {name} restarted")


# ---------------------------------------------------------------------------------------------
# CLI


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status", "restart-kubelet"):
        p = sub.add_parser(name)
        p.add_argument("--root", type=Path, default=ROOT / ".cluster" / "real")
        # Only `up` needs them all; the other commands read what `up` recorded.
        p.add_argument("--cluster", help="cluster name (mf-<hash>)")
        p.add_argument("--octet", type=int, help="10.<octet>.0.0/16 for node and pod addresses")
        p.add_argument("--nodes", type=Path, help="nodes file (hack/real-nodes.yaml)")
        p.add_argument("--bin-dir", type=Path, help="kubelet and kubectl (build-control-plane.sh)")
        p.add_argument("--kubeconfig", type=Path, help="the cluster's admin kubeconfig")
        p.add_argument("--pki", type=Path, help="the cluster CA's directory")
        p.add_argument("--image", type=Path, action="append", help="an OCI archive to import")
        p.add_argument("--pause-image", help="containerd's sandbox image reference")
        if name == "restart-kubelet":
            p.add_argument("node")
    fwd = sub.add_parser("_forward")
    fwd.add_argument("--netns", required=True)
    fwd.add_argument("--listen", action="append", type=parse_hostport, required=True)
    fwd.add_argument("--to", type=parse_hostport, required=True)
    fwd.add_argument("--service", type=parse_hostport)
    fwd.add_argument("--tls", type=lambda v: tuple(Path(p) for p in v.split(",")))
    hold = sub.add_parser("_holder")
    hold.add_argument("--node-dir", type=Path, required=True)
    return parser


CONTEXT_FIELDS = (
    "cluster",
    "octet",
    "nodes",
    "bin_dir",
    "kubeconfig",
    "pki",
    "image",
    "pause_image",
)


def build_context(args: argparse.Namespace) -> Context:
    """The command line's settings, completed by what `up` recorded under --root."""
    root = args.root.resolve()
    saved: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((root / "context.json").read_text())
    values: dict[str, Any] = {
        k: getattr(args, k) if getattr(args, k) is not None else saved.get(k)
        for k in CONTEXT_FIELDS
    }
    missing = [k for k in ("cluster", "octet") if values[k] is None]
    if args.command == "up":
        missing += [
            k for k in ("nodes", "bin_dir", "kubeconfig", "pki", "pause_image") if values[k] is None
        ]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise RealNodeError(f"{root} records no real nodes: pass {flags}")
    record = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    record["image"] = [str(i) for i in values["image"] or []]
    return Context(
        layout=Layout(root=root, cluster=str(values["cluster"]), octet=int(values["octet"])),
        nodes=load_nodes(Path(values["nodes"])) if values["nodes"] else [],
        bin_dir=Path(values["bin_dir"] or ""),
        kubeconfig=Path(values["kubeconfig"] or ""),
        pki=Path(values["pki"] or ""),
        images=[Path(i) for i in values["image"] or []],
        pause_image=str(values["pause_image"] or ""),
        record=record,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "_forward":
        asyncio.run(forward(args.netns, args.listen, args.to, args.service, args.tls))
        return 0
    if args.command == "_holder":
        holder(args.node_dir)
        return 0
    try:
        ctx = build_context(args)
        if args.command == "up":
            cmd_up(ctx)
        elif args.command == "down":
            cmd_down(ctx)
        elif args.command == "status":
            return cmd_status(ctx)
        elif args.command == "restart-kubelet":
            cmd_restart_kubelet(ctx, args.node)
    except RealNodeError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
