"""The C heap, set for CPU tensor work: big blocks come from the reused heap, not from fresh mmap'd pages.

glibc serves an allocation above its mmap threshold (128 KiB at start, rising to at most 32 MiB) with fresh
pages from the kernel and gives them back when it is freed. A CPU forward or backward pass allocates and frees
tens of megabytes per operation (a 32 x 360 x 1536 fp32 activation is 70 MB), so every operation first takes a
page fault per 4 KiB to get zeroed pages, then returns them: that kernel work was a third of the CPU time of
`vlsafe bench train` and a tenth of an evaluation's. `tune` turns mmap off for the heap (M_MMAP_MAX = 0) and stops it
from trimming its free top (M_TRIM_THRESHOLD), so freed blocks are reused by the next operation.

Measured on 2 cores (SmolLM2-135M + EfficientNet-Lite0, bf16, `vlsafe bench train --steps 6`, runs alternating
with `VLSAFE_MALLOC=system`): vlsafe 315 / 326 -> 425 / 363 tokens/s, `transformers.Trainer` 280 / 262 -> 386 /
344 (both sides run in the same process, so the ratio between them hardly moves); one evaluation of the study
suite spent 14 s in the kernel instead of 5. The cost is memory: the heap keeps what it has held and its free
blocks fragment, so a process settles at about 1.3x the peak it would otherwise have (a feed-forward block of 70 MB
activations: 1.1 GB instead of 0.86 GB), then stops growing and stops faulting (tests/test_allocator.py).
It is applied to CPU runs only (a GPU run's host memory is mostly loading, which it would keep), once per process,
on Linux with glibc; `VLSAFE_MALLOC=system` leaves the allocator as it is (`heap`, the default, sets it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from vlsafe.errors import VlsafeError

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_state: dict = {"applied": None}


def tune(device: str = "cpu") -> str:
    """Sets the heap for CPU tensor work (see the module's text); returns what the allocator is now, for the
    run's records: "heap (no mmap, no trim)", or "system" where it was left alone and why not."""
    if _state["applied"] is not None:
        return _state["applied"]
    if device != "cpu":
        return "system"  # not remembered: a later CPU run in the same process may still tune
    _state["applied"] = _apply()
    return _state["applied"]


def _apply() -> str:
    wanted = os.environ.get("VLSAFE_MALLOC", "heap") or "heap"
    if wanted not in ("heap", "system"):
        raise VlsafeError(f"VLSAFE_MALLOC={wanted!r}: 'heap' (the default) or 'system'")
    if wanted == "system":
        return "system (VLSAFE_MALLOC=system)"
    if not sys.platform.startswith("linux"):
        return "system"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        gnu_libc_version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # musl and others: no glibc parameters to set
        return "system"
    gnu_libc_version.restype = ctypes.c_char_p
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return f"heap (no mmap, no trim; glibc {gnu_libc_version().decode()})" if ok else "system (mallopt failed)"


def state() -> str:
    """What `tune` did in this process ("system" when it has not run)."""
    return _state["applied"] or "system"
