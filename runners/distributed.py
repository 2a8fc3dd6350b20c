"""Data-parallel meta-training over several processes, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 -m metarun algo=maml trainer.meta_batch=32

Every process (rank) builds the same learner from the same seed and draws the same
meta-batch from the same sampler; rank r keeps tasks [r*B/N, (r+1)*B/N) of it. Before
each outer update the gradients (for Reptile and iMAML: the update directions they
write into .grad) are averaged over the ranks, as DistributedDataParallel does, so
every rank applies the same update and the weights stay identical. Because each
learner's loss is a mean over its tasks, the averaged gradient is the gradient of the
mean over all B tasks: the run follows one process with meta-batch B, up to float
rounding, whenever a task's computation does not depend on the other tasks of the
batch. Where it does, it follows DistributedDataParallel's semantics instead: batch
norm with batch statistics over a whole meta-batch (ProtoNet, Matching and Relation
Networks with the default conv4) normalises over each rank's tasks, and its running
statistics are rank 0's (broadcast after every update); random pairs (Siamese) and
augmentations are drawn per rank.

Rank 0 alone validates, logs (metrics.jsonl, wandb, console) and writes checkpoints
and results; all ranks use rank 0's run directory, so `resume=` works as in one process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from metarun.errors import ConfigError

# rank 0 may validate or test while the others wait at the next collective
TIMEOUT = datetime.timedelta(hours=6)


def world() -> tuple[int, int]:
    """(rank, world size) of this process: from torchrun's environment, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched() -> bool:
    """True in a process started by torchrun with more than one process."""
    return world()[1] > 1


def is_main() -> bool:
    return world()[0] == 0


def init(device: torch.device) -> torch.device:
    """Join the process group (gloo on the CPU, nccl on CUDA); returns this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return device


def close(wait: bool = True) -> None:
    """Leave the process group; wait=True first waits for every rank (a normal end)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def local_tasks(meta_batch: int) -> slice:
    """This rank's share of a meta-batch of `meta_batch` tasks."""
    rank, size = world()
    if meta_batch % size:
        raise ConfigError(
            f"trainer.meta_batch={meta_batch} cannot be split evenly over {size} processes; "
            f"use a multiple of {size} (e.g. trainer.meta_batch={size * max(1, meta_batch // size)})"
        )
    share = meta_batch // size
    return slice(rank * share, (rank + 1) * share)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average .grad over the ranks in one all-reduce (a missing gradient counts as zero)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def average(values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (for logged metrics)."""
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, 0)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) to every rank."""
    for t in module.buffers():
        dist.broadcast(t.data, 0)


def from_main(obj):
    """Rank 0's value of a picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def max_over_ranks(value: int) -> int:
    """The largest of an integer over the ranks (e.g. "did any rank get a signal?")."""
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
