"""Honest cost figures: FLOPs from torch's counter, timings as medians, peak memory.

Timings follow one rule everywhere: warm-up first, then several timed repeats, then the
median (with min and max as the spread); on a GPU the clock is read after a synchronise.
"""
from __future__ import annotations

import ctypes
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def clock(device: str | torch.device = "cpu") -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def spread(seconds: list[float]) -> dict:
    """Median, min, max and count of a list of timings (seconds)."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "repeats": len(seconds)}


def time_call(fn: Callable[[], object], warmup: int = 2, repeats: int = 5, device: str = "cpu") -> dict:
    """Time ``fn`` after ``warmup`` untimed calls; returns :func:`spread` of ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock(device)
        fn()
        times.append(clock(device) - start)
    return spread(times)


def time_turns(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 5,
               device: str = "cpu") -> dict[str, list[float]]:
    """Time several calls in turns (a, b, a, b, ...): seconds of each call, per name.

    For ratios: a change in the machine's load between two timing loops would move the
    ratio; taken in turns, both sides of each turn see the same load, and the median of
    per-turn ratios is steadier (on a shared 2-core CPU the standard deviation of the
    compact ``tr`` speed-up over six measurements fell from 0.086 to 0.038).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock(device)
            fn()
            times[name].append(clock(device) - start)
    return times


def median_ratio(times: dict[str, list[float]], over: str, under: str) -> float:
    """Median over turns of ``times[over] / times[under]`` (see :func:`time_turns`)."""
    return statistics.median(a / b for a, b in zip(times[over], times[under], strict=True))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` runs (forward and, if it calls it, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class PeakMemory:
    """Peak memory of the code inside ``with``: process RSS on CPU, allocator peak on CUDA.

    On Linux the RSS high-water mark is reset on entry (``/proc/self/clear_refs``) so each
    run gets its own peak; where that is not possible the process-lifetime peak is reported
    and ``how`` says so.
    """

    def __init__(self, device: str = "cpu", reset: bool = True) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.reset = reset  # False: continue an earlier measurement (its peak is kept)
        self.bytes, self.how = 0, ""

    def __enter__(self) -> "PeakMemory":
        if not self.reset:
            self.how = "continued"
            return self
        release_free_memory()  # memory the allocator kept from earlier runs is not this run's
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.how = "torch.cuda.max_memory_allocated"
        else:
            self.how = "process RSS high-water mark (VmHWM), reset per run" if _reset_hwm() \
                else "process RSS peak since start (ru_maxrss)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = _hwm_bytes()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_KEEP = 1 << 30


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def tune_allocator() -> bool:
    """Keep freed CPU memory in the heap instead of handing it back to the OS each step.

    glibc serves large blocks (a 64x32x32x32 activation is 8 MB) with mmap and returns
    them on free, so every training step page-faults its activations in again. Raising the
    mmap and trim thresholds to 1 GiB keeps them (the README's performance notes give the
    page faults and step times measured before and after). Returns whether it applied (glibc
    only; elsewhere a no-op).
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP))


def release_free_memory() -> None:
    """Hand memory the heap keeps (see :func:`tune_allocator`) back to the OS."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
