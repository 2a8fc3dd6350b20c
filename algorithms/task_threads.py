"""The tasks of a meta-batch on CPU worker threads, one intra-op thread each.

A MAML step on small convolutional networks is thousands of small operators, which
PyTorch's intra-op threads split poorly: on a 2-core machine two threads ran a strided
conv4 task 1.4x as fast as one. Giving each worker thread its own group of tasks and one
intra-op thread keeps both cores busy on whole tasks instead (benchmarks/bench_maml.py).

Rules the callers keep:
- workers never share a module they write to: torch.func.functional_call swaps
  tensors into the module it is given, so each group works on its own `replica`;
- each group's results (here: logits, losses, gradients) are combined in group order by
  the calling thread, so a run gives the same numbers every time for a given number of
  intra-op threads;
- the work is deterministic apart from float rounding: no random operators (dropout)
  run inside, since the global random generator would be drawn in thread order.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")
_POOLS: dict[int, ThreadPoolExecutor] = {}
# a forked child has none of its parent's threads: it makes its own pools
os.register_at_fork(after_in_child=_POOLS.clear)


def pool(workers: int) -> ThreadPoolExecutor:
    """One process-wide pool per worker count, made on first use."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="metarun-task")
    return _POOLS[workers]


def groups(count: int, workers: int) -> list[range]:
    """`count` tasks in at most `workers` contiguous groups whose sizes differ by <= 1."""
    workers = max(1, min(workers, count))
    bounds = [count * k // workers for k in range(workers + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def replica(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor but owns
    its dictionaries of them, so functional_call on it leaves the original untouched."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {n: None if m is None else replica(m) for n, m in module._modules.items()}
    return new


def run(work: Callable[[range], T], parts: Sequence[range]) -> list[T]:
    """work(part) for every part, each on a worker thread with one intra-op thread; the
    results in the order of `parts`. The process's intra-op thread count is restored
    afterwards, also when a part raises (its exception is raised here)."""
    threads = torch.get_num_threads()

    def one(part: range) -> T:
        torch.set_num_threads(1)  # this worker's ops; the count is restored below
        return work(part)

    try:
        futures = [pool(len(parts)).submit(one, part) for part in parts]
        wait(futures)
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def usable(device: torch.device, tasks: int) -> bool:
    """Whether worker threads can share out `tasks` tasks: CPU tensors, two tasks or more,
    and two intra-op threads or more to give one each."""
    return device.type == "cpu" and tasks >= 2 and torch.get_num_threads() >= 2


def map_tasks(module: nn.Module, count: int, per_task: Callable, threaded: bool) -> list:
    """[per_task(m, i) for i in range(count)], m the module: in task order on the calling
    thread, or with the tasks in groups on worker threads (one intra-op thread each, each
    group on its own `replica`), the results still in task order. per_task must set its
    own grad mode: a worker thread starts with gradients on whatever the caller's is."""
    if not threaded:
        return [per_task(module, i) for i in range(count)]

    def work(part: range) -> list:
        own = replica(module)
        return [per_task(own, i) for i in part]

    return [r for group in run(work, groups(count, torch.get_num_threads())) for r in group]


def has_conv(module: nn.Module) -> bool:
    """Whether the network has convolutions: the networks worker threads were measured to
    speed up (benchmarks/bench_maml.py, bench_threads.py); a small MLP's ops are too short
    for the threads to pay."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
