"""What a search asks of the Ray cluster, checked against what the cluster has, before any trial starts.

A request no node can meet would leave Ray's trials pending forever (Ray only warns): a GPU search on
a cluster without GPUs, or more CPUs per trial than the largest node has, is refused at once, unless the
cluster autoscales (``wait_for_resources``). The default concurrency is what fits at once.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from tune.settings import SearchConfigError, SearchSettings


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What a Ray cluster offers: total CPUs and GPUs, and each alive node's."""
    address: str
    cpus: float
    gpus: float
    nodes: tuple[dict[str, float], ...]   # {"CPU": n, "GPU": m} per alive node

    @classmethod
    def of(cls, address: str, resources: dict[str, Any], nodes: list[dict[str, Any]]) -> "Cluster":
        """From ``ray.cluster_resources()`` and ``ray.nodes()``."""
        alive = tuple({"CPU": float(n.get("Resources", {}).get("CPU", 0)), "GPU": float(n.get("Resources", {}).get("GPU", 0))}
                      for n in nodes if n.get("Alive", True))
        return cls(address, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), alive)

    def describe(self) -> str:
        gpus = f"{self.gpus:g} GPU" + ("s" if self.gpus != 1 else "") if self.gpus else "no GPU"
        return f"{gpus}, {self.cpus:g} CPUs on {len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}"


def trials_that_fit(s: SearchSettings, c: Cluster) -> int:
    """How many trials of ``s`` run at once on ``c``: per node, as many as its CPUs and GPUs hold."""
    total = 0
    for n in c.nodes:
        k = math.floor(n["CPU"] / s.cpus_per_trial + 1e-9)
        if s.gpus_per_trial > 0:
            k = min(k, math.floor(n["GPU"] / s.gpus_per_trial + 1e-9))
        total += k
    return total


def fit_to_cluster(s: SearchSettings, c: Cluster) -> tuple[SearchSettings, str]:
    """The settings to run with on ``c`` (max_concurrent resolved) and a line saying what runs at once.
    SearchConfigError (one line naming what is missing) when no node can run one trial, unless
    ``wait_for_resources``."""
    fit = trials_that_fit(s, c)
    if fit == 0 and not s.wait_for_resources:
        raise SearchConfigError(_refusal(s, c))
    n = s.max_concurrent or max(1, fit)
    asked = f"{s.cpus_per_trial:g} CPU" + (f" + {s.gpus_per_trial:g} GPU" if s.gpus_per_trial else "")
    if fit == 0:
        line = f"waiting for resources: no node of the Ray cluster at {c.address} ({c.describe()}) fits {asked} yet"
    else:
        line = (f"{n} trial(s) at once ({asked} each; {fit} fit on the Ray cluster at {c.address}: "
                f"{c.describe()})")
    return dataclasses.replace(s, max_concurrent=n), line


def _refusal(s: SearchSettings, c: Cluster) -> str:
    if s.gpus_per_trial > 0 and c.gpus == 0:
        return (f"--gpus-per-trial {s.gpus_per_trial:g} but the Ray cluster at {c.address} has no GPU "
                f"({c.cpus:g} CPUs): use --gpus-per-trial 0, or --wait-for-resources on an autoscaling cluster")
    if s.gpus_per_trial > 0 and not any(n["GPU"] >= s.gpus_per_trial for n in c.nodes):
        return (f"--gpus-per-trial {s.gpus_per_trial:g} but no node of the Ray cluster at {c.address} has that many "
                f"GPUs (largest: {max(n['GPU'] for n in c.nodes):g})")
    largest = max((n["CPU"] for n in c.nodes if n["GPU"] >= s.gpus_per_trial), default=0)
    return (f"--cpus-per-trial {s.cpus_per_trial:g} but the largest node of the Ray cluster at {c.address} has "
            f"{largest:g} CPUs{' beside a GPU' if s.gpus_per_trial else ''}: ask for at most {largest:g}")
