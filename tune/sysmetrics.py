"""System metrics of a trial, sampled where the trial runs (on its Ray worker).

A background thread samples what MLflow's own system-metrics monitors record, under their names
(``mlflow.system_metrics``: CPU utilisation and system memory as its CPUMonitor reads them through
psutil; for a trial that computes on a GPU, every GPU's utilisation, memory and power through MLflow's
GPUMonitor and its own GPU's through NVML), plus this trial process's own CPU and memory. ``take()`` returns the means since its last call, named
``system/...`` as MLflow's system metrics are; the trial reports them with each epoch, and the driver
logs them to the trial's run, where the MLflow UI shows them on the run's "System metrics" tab: whether
trials sharing a GPU (or the cores) keep it busy. Workers still need no MLflow server, and on a CPU-only
worker not even the mlflow package (importing it would slow every worker's first trial).
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict

import psutil
import pynvml

from mlflow_server.monitors import gpu_monitor

PREFIX = "system/"


def _trial_gpu_monitor() -> "TrialGPUMonitor | None":
    try:
        return TrialGPUMonitor(visible_gpu())
    except Exception:  # noqa: BLE001 - no NVML library or no such device: the trial's GPU metrics are left out
        return None


class CPUMonitor:
    """The readings and names of MLflow's ``CPUMonitor`` (mlflow/system_metrics/metrics/cpu_monitor.py:
    psutil's CPU percentage and system memory; tested against it), with its collect / aggregate / clear
    interface, without importing mlflow."""

    def __init__(self):
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def collect_metrics(self) -> None:
        self.metrics["cpu_utilization_percentage"].append(psutil.cpu_percent())
        mem = psutil.virtual_memory()
        self.metrics["system_memory_usage_megabytes"].append(mem.used / 1e6)
        self.metrics["system_memory_usage_percentage"].append(mem.used / mem.total * 100)

    def aggregate_metrics(self) -> dict[str, float]:
        return {k: round(sum(v) / len(v), 1) for k, v in self.metrics.items()}

    def clear_metrics(self) -> None:
        self.metrics.clear()


def visible_gpu(env: dict[str, str] | None = None) -> str:
    """The physical GPU that is cuda:0 in this process: the first of CUDA_VISIBLE_DEVICES (Ray sets it to the
    GPUs it assigned the trial), an index or a UUID; "0" when it is unset."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[0].strip() if visible else "0"


class TrialGPUMonitor:
    """The trial's own GPU (its share of it, when trials share one): utilisation and memory in use, read
    through NVML, named ``trial_gpu_*`` beside MLflow's whole-machine ``gpu_*`` metrics."""

    def __init__(self, which: str):
        pynvml.nvmlInit()
        self.handle = (pynvml.nvmlDeviceGetHandleByIndex(int(which)) if which.isdigit()
                       else pynvml.nvmlDeviceGetHandleByUUID(which))
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def collect_metrics(self) -> None:
        self.metrics["trial_gpu_utilization_percentage"].append(pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        self.metrics["trial_gpu_memory_usage_megabytes"].append(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / 1e6)

    def aggregate_metrics(self) -> dict[str, float]:
        return {k: round(sum(v) / len(v), 1) for k, v in self.metrics.items()}

    def clear_metrics(self) -> None:
        self.metrics.clear()


class SystemSampler:
    """``gpu``: the trial computes on a GPU; its metrics then include that GPU's and (MLflow's monitor) every
    GPU's of the machine. A CPU trial never touches CUDA or NVML."""

    def __init__(self, interval_s: float = 1.0, gpu: bool = False):
        self.interval_s = interval_s
        self.monitors = [CPUMonitor()]
        if gpu:
            self.monitors += [m for m in (gpu_monitor(), _trial_gpu_monitor()) if m is not None]
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # the first reading starts the interval
        self.own: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bitsearch-system-metrics", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with self._lock:
            for m in self.monitors:
                m.collect_metrics()
            self.own["process_cpu_utilization_percentage"].append(self.proc.cpu_percent(None))
            self.own["process_memory_usage_megabytes"].append(self.proc.memory_info().rss / 1e6)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a failed reading is skipped, the trial goes on
                pass

    def take(self) -> dict[str, float]:
        """Mean of every metric since the last call (at least one fresh sample), as ``system/NAME``."""
        if not self.own:
            self._sample()
        with self._lock:
            out: dict[str, float] = {}
            for m in self.monitors:
                if m.metrics:
                    out.update(m.aggregate_metrics())
                m.clear_metrics()
            out.update({k: round(sum(v) / len(v), 1) for k, v in self.own.items() if v})
            self.own.clear()
        return {PREFIX + k: float(v) for k, v in out.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s)
