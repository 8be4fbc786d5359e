"""Keep freed memory in the process (glibc malloc) instead of handing it back to the kernel.

A CPU training step allocates and frees the same large activation buffers every step. glibc serves
allocations above its mmap threshold (at most 32 MiB by default; a width-0.5 MobileNet-v2 at batch 128
has FP32 activations of 50 MiB) with fresh ``mmap`` pages and returns them with ``munmap`` on free, so
every step page-faults all of them in again and the kernel zeroes them (the cost, measured by
``bench/allocator.py``: docs/RESULTS.md, training speed).

``keep_freed_memory()`` sets, through ``mallopt``, no mmap for large blocks (``M_MMAP_MAX`` 0) and no
trimming of the heap top (``M_TRIM_THRESHOLD`` at its maximum), unless the user set glibc's own
``MALLOC_*`` variables or ``BITSEARCH_MALLOC=system``. The price: a process keeps the peak of what it
allocated (training: ~2.7 GB at width 0.5) until it exits, and its heap can grow by a few blocks before
freed ones are reused (PyTorch's 64-byte-aligned allocations; bounded, tests/test_allocator.py). Not glibc (macOS, musl, Windows): nothing
happens. Idempotent; the CLI, the trainer and each Tune trial call it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
_TRIM_MAX = 2 ** 31 - 1  # mallopt takes an int

_state: str | None = None
ALLOCATOR_LINES = {"kept": "freed memory kept in the process (glibc mallopt; BITSEARCH_MALLOC=system to leave it)",
                   "system": "glibc defaults (BITSEARCH_MALLOC=system or your MALLOC_* settings)",
                   "unsupported": "the system's (not glibc)"}


def keep_freed_memory() -> str:
    """Apply the allocator settings once per process. Returns what is in effect: ``"kept"`` (applied),
    ``"system"`` (left as is: BITSEARCH_MALLOC=system or the user's own MALLOC_* settings) or
    ``"unsupported"`` (no glibc)."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get("BITSEARCH_MALLOC", "").lower() == "system" or any(
            k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        _state = "system"
        return _state
    _state = "unsupported"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # musl and others without mallopt
            return _state
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        if mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _TRIM_MAX) == 1:
            _state = "kept"
    return _state
