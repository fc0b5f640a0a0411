"""`modelfleet sim-gpu-plugin`: the fake GPU driver's kubelet device plugin, until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from modelfleet.fakegpu.driverdir import DriverDir, DriverDirError
from modelfleet.fakegpu.plugin import DEFAULT_RESOURCE, GpuDevicePlugin


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", required=True, help="the node's fake GPU driver directory (see sim-gpu-driver)"
    )
    parser.add_argument(
        "--plugin-dir",
        required=True,
        metavar="PDIR",
        help="the kubelet's device-plugin directory (holds kubelet.sock), usually "
        "/var/lib/kubelet/device-plugins",
    )
    parser.add_argument(
        "--resource",
        default=DEFAULT_RESOURCE,
        help=f"extended resource to advertise (default {DEFAULT_RESOURCE})",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    plugin = GpuDevicePlugin(DriverDir(args.dir), args.plugin_dir, resource=args.resource)
    try:
        plugin.refresh_blocking()
    except DriverDirError as exc:
        sys.stderr.write(f"modelfleet sim-gpu-plugin: {exc}\n")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        plugin.run(stop)
    finally:
        plugin.close()
    logging.getLogger(__name__).info("device plugin stopped")
    return 0
