"""Host memory settings that make CPU training fast.

glibc's malloc serves large blocks (over 32 MB at most, often far less) with fresh mmap'd pages and returns them
to the kernel on free. A training step allocates and frees its logits, activations and gradients every time, so
each step faults its working memory in afresh: the first 480-step default run spent 184 s in the kernel and took
78 M page faults. Keeping freed memory in the process removes that cost (the default model trains 28% faster,
median of three runs each, docs/benchmarks.md); the price is that resident memory stays at its peak until the
process ends, which a training process reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc malloc to reuse freed memory instead of unmapping it. Returns whether it was applied.

    A no-op off Linux/glibc, and when the environment sets LMFORGE_MALLOC_TUNING=0. Safe to call repeatedly.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LMFORGE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    _applied = ok
    logger.debug("malloc tuned to keep freed memory: %s", ok)
    return ok
