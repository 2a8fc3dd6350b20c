"""Timing helpers shared by the benchmarks: paired, interleaved blocks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA work is queued; wait for it so the clock sees it
        torch.cuda.synchronize(device)


def ms_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000 / calls


def interleaved(
    a: Callable[[], object],
    b: Callable[[], object],
    repeats: int,
    block_s: float,
    warmup: int,
    device,
) -> tuple[list[float], list[float]]:
    """ms per call of `a` and `b`, each timed in `repeats` blocks of about `block_s` seconds.

    Blocks alternate A B, B A, A B, ... so drift and bursts of load from other
    processes hit both sides alike, and neither always runs right after the other.
    """
    calls = []
    for fn in (a, b):
        ms_per_call(fn, warmup, device)  # first calls allocate, pick kernels, fill caches
        calls.append(max(1, round(block_s * 1000 / ms_per_call(fn, 1, device))))
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            times[side].append(ms_per_call((a, b)[side], calls[side], device))
    return times
