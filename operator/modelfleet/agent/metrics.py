"""The agent's Prometheus metrics: dcgm-exporter's GPU series plus `modelfleet_agent_*`.

GPU series use dcgm-exporter's metric names, types, units and label names (etc/default-counters.csv
upstream), so dashboards built for dcgm-exporter work unchanged. They are produced by a custom
collector that reads the latest sample at scrape time: a scrape never touches the GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from modelfleet.api.gpustats import GpuStats

if TYPE_CHECKING:
    from modelfleet.agent.state import Sample

DCGM_LABELS = ("gpu", "UUID", "device", "modelName", "Hostname", "container", "namespace", "pod")

# name -> (help as dcgm-exporter writes it, how to read the value from one GPU)
DCGM_GAUGES: dict[str, tuple[str, Callable[[GpuStats], float | None]]] = {
    "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", lambda g: g.memory_used_mib),
    "DCGM_FI_DEV_FB_FREE": ("Framebuffer memory free (in MiB).", lambda g: g.memory_free_mib),
    "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", lambda g: g.utilization_percent),
    "DCGM_FI_DEV_GPU_TEMP": ("GPU temperature (in C).", lambda g: g.temperature_c),
    "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", lambda g: g.power_w),
    # dcgm-exporter exports the last XID code as a gauge (0: none seen).
    "DCGM_FI_DEV_XID_ERRORS": (
        "Value of the last XID error encountered.",
        lambda g: float(g.health.last_xid or 0),
    ),
}

POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def build_dcgm_label_sets(gpu: GpuStats, hostname: str) -> list[tuple[str, ...]]:
    """One label set per pod on the GPU (as dcgm-exporter does), or one with empty pod labels."""
    base = (str(gpu.index), gpu.uuid, f"nvidia{gpu.index}", gpu.product, hostname)
    if not gpu.pods:
        return [(*base, "", "", "")]
    return [(*base, pod.container, pod.namespace, pod.name) for pod in gpu.pods]


class SampleCollector(Collector):
    """Reads the latest sample at scrape time and yields the dcgm and per-GPU agent series."""

    def __init__(self, latest: Callable[[], Sample | None]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sample = self._latest()
        gpus = sample.report.gpus if sample else []
        hostname = sample.report.node if sample else ""
        for name, (help_text, read) in DCGM_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=DCGM_LABELS)
            for gpu in gpus:
                value = read(gpu)
                if value is None:
                    continue
                for labels in build_dcgm_label_sets(gpu, hostname):
                    family.add_metric(labels, float(value))
            yield family

        yield GaugeMetricFamily(
            "modelfleet_agent_gpus", "GPUs in the latest sample.", value=len(gpus)
        )
        healthy = GaugeMetricFamily(
            "modelfleet_agent_gpu_healthy",
            "1 when the GPU can take work, 0 when it is unhealthy.",
            labels=("gpu", "UUID"),
        )
        stale = GaugeMetricFamily(
            "modelfleet_agent_gpu_stale",
            "1 when the GPU's identity or memory could not be read in the latest sample (no "
            "placement on it; not unhealthy for that), else 0.",
            labels=("gpu", "UUID"),
        )
        xids = CounterMetricFamily(
            "modelfleet_agent_xid_events",
            "Critical XID events seen since the agent started.",
            labels=("gpu", "UUID"),
        )
        for gpu in gpus:
            healthy.add_metric((str(gpu.index), gpu.uuid), 1.0 if gpu.health.healthy else 0.0)
            stale.add_metric((str(gpu.index), gpu.uuid), 1.0 if gpu.stale else 0.0)
            xids.add_metric((str(gpu.index), gpu.uuid), float(gpu.health.xid_errors))
        yield healthy
        yield stale
        yield xids
        if sample is not None:
            yield GaugeMetricFamily(
                "modelfleet_agent_ready",
                "1 while the agent can read its GPUs, 0 while NVML as a whole does not answer.",
                value=1.0 if sample.report.ready else 0.0,
            )
            yield GaugeMetricFamily(
                "modelfleet_agent_last_sample_timestamp_seconds",
                "Unix time of the latest successful sample.",
                value=sample.report.sampled_at.timestamp(),
            )
            yield GaugeMetricFamily(
                "modelfleet_agent_sample_age_seconds",
                "Seconds since the latest successful sample.",
                value=max(0.0, time.monotonic() - sample.monotonic),
            )


class AgentMetrics:
    """One registry per agent (not the global one), so tests and benchmarks stay independent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.poll_duration = Histogram(
            "modelfleet_agent_poll_duration_seconds",
            "Time to take one sample of every GPU.",
            buckets=POLL_BUCKETS,
            registry=self.registry,
        )
        self.poll_errors = Counter(
            "modelfleet_agent_poll_errors",
            "Polls that failed as a whole; the previous sample is kept.",
            registry=self.registry,
        )
        self.gpu_errors = Counter(
            "modelfleet_agent_gpu_read_errors",
            "Reads of one GPU's identity or memory that failed, or that found it gone: the GPU "
            "is reported stale, or unhealthy when NVML says it is lost.",
            registry=self.registry,
        )
        self.nvml_field_errors = Counter(
            "modelfleet_agent_nvml_field_errors",
            "Sensor readings NVML could not give (reported null, the GPU stays healthy), by "
            "field and NVML error; NOT_SUPPORTED counts once per GPU and field.",
            labelnames=("field", "error"),
            registry=self.registry,
        )
        self.nvml_reinits = Counter(
            "modelfleet_agent_nvml_reinits",
            "NVML re-initialisations tried while NVML as a whole did not answer, by outcome.",
            labelnames=("outcome",),
            registry=self.registry,
        )
        self.pod_resources_errors = Counter(
            "modelfleet_agent_pod_resources_errors",
            "kubelet pod-resources List calls that failed; pod lists stay empty meanwhile.",
            registry=self.registry,
        )

    def count_field_error(self, field: str, error: str) -> None:
        self.nvml_field_errors.labels(field=field, error=error).inc()

    def count_reinit(self, ok: bool) -> None:
        self.nvml_reinits.labels(outcome="ok" if ok else "failed").inc()

    def attach(self, latest: Callable[[], Sample | None]) -> None:
        """Register the collector that reads the latest sample."""
        self.registry.register(SampleCollector(latest))
