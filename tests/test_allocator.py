"""trainer.allocator: with its settings, freeing and re-allocating a large tensor costs no page faults;
with glibc's defaults (BITSEARCH_MALLOC=system) each allocation is mapped and faulted in again."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from trainer.allocator import keep_freed_memory
state = keep_freed_memory()
import torch
torch.set_num_threads(1)
for _ in range(12):  # warm-up: the heap grows to hold the block (aligned allocations take a few rounds)
    torch.empty(64 * 2**20 // 4).fill_(1.0)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
print(json.dumps({"state": state, "again": keep_freed_memory(),
                  "faults_per_alloc": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10}))
"""


# Only which settings apply, in a process without torch: trainer/allocator.py loaded on its own
STATE_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[1] + "/trainer/allocator.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(json.dumps({"state": mod.keep_freed_memory()}))
"""


def _probe(script: str = PROBE, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "BITSEARCH_MALLOC"))} | env
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=e, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_is_not_faulted_in_again_and_system_opts_out():
    kept, system = _probe(), _probe(BITSEARCH_MALLOC="system")
    assert kept["state"] == kept["again"] == "kept" and system["state"] == "system"
    pages = 64 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    assert system["faults_per_alloc"] > 0.5 * pages  # glibc maps each 64 MiB block afresh
    assert kept["faults_per_alloc"] < 0.05 * pages   # reused from the heap
    # only the mmap / trim settings are the user's own
    assert _probe(STATE_PROBE, MALLOC_ARENA_MAX="2")["state"] == "kept"
    assert _probe(STATE_PROBE, MALLOC_TRIM_THRESHOLD_="1000000")["state"] == "system"
