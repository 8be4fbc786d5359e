"""System metrics of a trial, sampled where the trial runs (on its Ray worker).

MLflow's own monitors (mlflow.system_metrics: CPU and memory through psutil; every GPU's utilisation,
memory and power through NVML where one exists) are sampled by a background thread; ``take()`` returns
the means since its last call, named ``system/...`` as MLflow's system metrics are, plus this trial
process's own CPU and memory. The trial reports them with each epoch, and the driver logs them to the
trial's run, where the MLflow UI shows them on the run's "System metrics" tab: whether trials sharing a
GPU (or the cores) keep it busy. Workers still need no MLflow server.
"""
from __future__ import annotations

import threading
from collections import defaultdict

PREFIX = "system/"


class SystemSampler:
    def __init__(self, interval_s: float = 1.0):
        import psutil
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        self.interval_s = interval_s
        self.monitors = [CPUMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
            self.monitors.append(GPUMonitor())
        except Exception:  # noqa: BLE001 - no NVML library or no NVIDIA GPU: CPU metrics only
            pass
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
