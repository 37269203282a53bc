"""Keep the C allocator from handing big buffers back to the kernel between messages.

A push or pull moves the model in 2 MiB frames. With glibc's defaults every frame buffer (gRPC's
receive slices, the ``bytes`` Python copies them into, the frames ranger-ps encodes, temporaries of
the update rule) is either mapped fresh with ``mmap`` or carved from a heap top that ``free`` trims
back, so the next buffer of the same size faults its pages in again. On the VMs this project is
measured on a page fault costs so much that this alone halved push and pull throughput (see
docs/benchmarks.md, "The allocator"). Raising the mmap and trim thresholds makes glibc reuse freed
memory: the process keeps its high-water mark instead of returning it, which for a parameter server
(that holds the whole model anyway) is the right trade.

Only glibc is tuned (``mallopt`` through ctypes); elsewhere, or with ``RANGER_PS_TUNE_MALLOC=0``, it
does nothing. Explicit ``MALLOC_*_`` environment variables win: they are read by glibc at start-up
and this module then leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
"""Allocations below this come from the heap, not fresh mmaps (glibc's maximum on 64-bit)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap top is returned to the kernel only beyond this."""
TOP_PAD = 64 << 20
"""Extra heap obtained per growth, so growth happens rarely."""

_ENV_OPT_OUT = "RANGER_PS_TUNE_MALLOC"
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Tune glibc malloc for large, repeated message buffers, once per process.

    Returns:
        Whether the allocator was tuned (False on other C libraries, when opted out with
        ``RANGER_PS_TUNE_MALLOC=0``, or when ``MALLOC_*_`` variables already set it).
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(_ENV_OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(name in os.environ for name in _GLIBC_VARIABLES):
        return False
    try:
        # The C library this process already runs on (find_library would start ldconfig to look).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    results = [
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        mallopt(_M_TOP_PAD, TOP_PAD),
    ]
    _tuned = all(r == 1 for r in results)
    log.debug("malloc tuned for large buffers: %s", _tuned)
    return _tuned
