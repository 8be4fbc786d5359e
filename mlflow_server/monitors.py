"""MLflow's own system-metrics monitors, for samplers that run outside an MLflow run (a search's trial
workers: tune/sysmetrics.py). mlflow is slow to import, so that happens only where a
monitor is asked for (a GPU worker), inside the function."""
from __future__ import annotations


def gpu_monitor():
    """MLflow's GPUMonitor (every GPU's utilisation, memory and power through NVML), or None where there is
    no NVML library or no NVIDIA GPU."""
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        return GPUMonitor()
    except Exception:  # noqa: BLE001 - no NVML library or no NVIDIA GPU: CPU metrics only
        return None
