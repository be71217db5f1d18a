"""Large CPU buffers kept in the heap between a call's passes and between calls in quick succession (glibc).

glibc's malloc hands a tensor of more than 32 MiB (a batch of activations) to the kernel as its own
mapping, and gets it back on free: every pass then pays a page fault per 4 KiB it touches. During a call
the thresholds are raised so that freed buffers stay in the heap; on exit the process's settings are put
back, and the free memory is handed back to the kernel (``malloc_trim``) once no call has run for
``IDLE_S`` seconds, so that a loop of calls, a widget being explored or a batch reuses it. On this
project's 2-core machine, EfficientNet-Lite0 Integrated Gradients (16 steps, one pass) took 1.25 s
without this, 0.9 s with it, and 1.5 s when every call handed its memory back at once (its first pass
then faults in more than glibc's own reuse would have kept).

Off where it cannot apply or the user chose: not Linux with glibc, thresholds set by the user
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or their ``GLIBC_TUNABLES``), or another malloc
preloaded (jemalloc, tcmalloc). A thread other than the main one allocates from its own glibc arena,
whose heaps hold at most 64 MiB: a larger buffer there is still mapped afresh, so the widget, which
computes in a thread, takes chunks that keep its buffers smaller (``reusable_bytes``).
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # mallopt's parameters (malloc.h)
# glibc's own limits once its sliding threshold has met one large buffer (which any torch workload does):
# a fixed mallopt value cannot be read back, so these are what a call leaves behind
_AFTER = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
# mallopt takes an int; some glibc versions refuse a threshold above half their largest heap (32 MiB), which
# still keeps the buffers up to that size
_MMAP_DURING, _TRIM_DURING = (1 << 30, 32 << 20), (1 << 31) - 1

_lock = threading.Lock()
_depth = 0        # calls in progress, over all threads: the first sets the thresholds, the last restores them
_raised = False   # whether the first one could
_last_end = 0.0   # time.monotonic() when the last call ended
_trimmer: threading.Thread | None = None   # the one thread waiting to trim, if any
IDLE_S = 2.0      # seconds without a call before the free memory goes back to the kernel


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc's malloc that serves this process and nobody tuned it, else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    # the user's own thresholds (environment, tunables) stay theirs, as does another allocator
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    tuned = any(f"MALLOC_{name.upper()}_" in os.environ or f"malloc.{name}" in tunables
                for name in ("mmap_threshold", "trim_threshold"))
    if tuned or "malloc" in os.environ.get("LD_PRELOAD", ""):       # jemalloc, tcmalloc, mimalloc
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def reused_memory(device: torch.device) -> Iterator[None]:
    """Within the block, freed CPU buffers of any size are reused by the next allocation (see the module's
    docstring); nested and concurrent blocks share one setting. Nothing changes for other devices."""
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    global _depth, _raised, _last_end, _trimmer
    with _lock:
        _depth += 1
        if _depth == 1:
            # the trim threshold only with the mmap one: alone it would freeze the sliding mmap threshold
            # where it stands, maybe at 128 KiB, and IG then took twice as long
            _raised = any(libc.mallopt(_M_MMAP_THRESHOLD, v) for v in _MMAP_DURING)
            if _raised:
                libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DURING)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _raised:
                for param, value in _AFTER:
                    libc.mallopt(param, value)
                _last_end = time.monotonic()
                if _trimmer is None:
                    _trimmer = threading.Thread(target=_trim_when_idle, args=(libc,), daemon=True,
                                                name="nbexplain-trim")
                    _trimmer.start()


def reusable_bytes(device: torch.device) -> int | None:
    """The largest CPU buffer that freed memory can serve again in this thread, or None for no limit (the
    main thread, another device or allocator). Another thread's glibc arena grows in heaps of 64 MiB, so a
    larger buffer is mapped afresh and faulted in at every pass, as are heaps that a free leaves empty.
    Measured (Integrated Gradients, 48 steps, CPU, one thread): EfficientNet-Lite0 in the widget's thread took
    1.35-1.45x as long as on the main thread in chunks of 16 images, whose largest activation is 77 MB; in
    chunks of 8 or 10, 1.06x; of 12 (58 MB), 1.1x. resnet50's 51 MB in chunks of 16 cost 1.04x."""
    if device.type != "cpu" or _glibc() is None or threading.current_thread() is threading.main_thread():
        return None
    return 56 << 20


def _trim_when_idle(libc: ctypes.CDLL) -> None:
    """Hands the free memory back once no call has run for ``IDLE_S`` seconds, then ends (one such thread
    at a time: a loop of short calls must not leave a sleeping thread per call). The trim (tens of ms on a
    GB of free heap) runs outside the lock, so a call starting meanwhile is not held up."""
    global _trimmer
    while True:
        with _lock:
            wait = IDLE_S if _depth else _last_end + IDLE_S - time.monotonic()
            if wait <= 0:
                _trimmer = None
                break
        time.sleep(wait)
    libc.malloc_trim(0)
