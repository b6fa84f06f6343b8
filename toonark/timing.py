"""Wall-clock medians of a callable, synchronized with the device: what the benchmarks and the
calibration gate's latency line report. Core: torch only when asked to synchronize CUDA."""
from __future__ import annotations

import statistics
import time


def _sync(device: str):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def time_ms(fn, device: str, reps: int, warmup: int) -> dict:
    """Median (and spread) of `reps` calls in ms, after `warmup` calls; synchronized host clock."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3), "min_ms": round(samples[0], 3),
            "max_ms": round(samples[-1], 3), "reps": reps}
