"""MAML meta-iterations per second, and the peak memory of MAML against iMAML.

Speed, two configs (second-order MAML, the strided conv4 of learn2learn's OmniglotCNN:
4 x (3x3 stride-2 conv, batch norm, ReLU), spatial mean, linear head; 28x28x1 inputs):
  (a) 5-way 1-shot, 5 queries per class, meta-batch 32, 1 inner step
  (b) 20-way 1-shot, 5 queries per class, meta-batch 16, 5 inner steps
Sides, each a full meta-training step (inner loop, query loss, backward, Adam step):
  metarun  MAML(batched="auto") as the runner uses it, and its three formulations,
           batched="loop" (task after task), batched="vmap" (torch.func.vmap over tasks)
           and batched="threads" (groups of tasks on worker threads, one intra-op thread
           each; the CPU's choice for convolutional networks); and `auto` again with
           PyTorch's own second derivatives instead of metarun's fused kernels
           (algorithms/second_order.py), to show what those bring
  baseline the learn2learn way, written here since learn2learn does not install beside this
           torch: per task, clone the module (parameters cloned, differentiable), adapt by
           writing p - lr * grad (create_graph=True) into the clone's parameters, then the
           query loss; NCHW layout and nn.BatchNorm2d(track_running_stats=False), as in
           learn2learn's OmniglotCNN
Reference (not measured here; given with the issue): learn2learn 0.2.0 on a 2-core machine,
1.30 meta-iterations/s at (a) and 0.48 at (b); the target is 1.5x those. All sides start
from the same weights, and their meta-gradients are compared (max relative difference).

Memory: the growth in peak memory during one meta-training step of MAML (second order,
loop) and of iMAML at 1, 5, 10 and 20 inner steps, 5-way 1-shot, 5 queries, meta-batch 8.
On the CPU each measurement runs in a fresh process that reads its resident set size
(/proc/self/statm) after every torch call of the step (the peak of those samples minus the
size before the step; the backward pass itself runs in C++ and is not sampled inside);
on CUDA, torch.cuda.max_memory_allocated.

Run: python -m benchmarks.bench_maml [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode

from benchmarks.timing import ms_per_call, synchronize
from metarun.algorithms import IMAML, MAML, conv4, second_order
from metarun.data import Episodes

# name: (way, shot, query per class, meta-batch, inner steps, learn2learn reference it/s)
CONFIGS = {"a": (5, 1, 5, 32, 1, 1.30), "b": (20, 1, 5, 16, 5, 0.48)}
TARGET_X = 1.5  # at least 1.5 times the learn2learn reference
INNER_LR = 0.4
REPEATS = 5  # timed calls per side, interleaved; medians reported
MEMORY_STEPS = (1, 5, 10, 20)
MEMORY_SHAPE = (5, 1, 5, 8)  # way, shot, query, meta-batch


def strided_conv4() -> nn.Sequential:
    """The strided conv4 as `metarun algo=maml` (and reptile, imaml) builds it for 28x28x1
    images: conf/backbone/conv4_strided.yaml's layers and memory layout, so the benchmarks
    time the network users get."""
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/backbone/conv4_strided.yaml")
    return conv4(variant=cfg.variant, hidden=cfg.hidden, channels_last=cfg.channels_last)


def as_dtype(ep: Episodes, dtype: torch.dtype) -> Episodes:
    """The same episodes with their images in `dtype` (labels unchanged)."""
    return Episodes(
        ep.support_x.to(dtype), ep.support_y, ep.query_x.to(dtype), ep.query_y, ep.classes
    )


def episodes(way, shot, query, batch, device, seed=0) -> Episodes:
    """Random images in the episode shape: only shapes matter for speed."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(way)
    return Episodes(
        torch.rand(batch, way * shot, 1, 28, 28, generator=g),
        labels.repeat_interleave(shot).expand(batch, -1).contiguous(),
        torch.rand(batch, way * query, 1, 28, 28, generator=g),
        labels.repeat_interleave(query).expand(batch, -1).contiguous(),
        labels.expand(batch, -1).contiguous(),
    ).to(device)


# -- the learn2learn-style baseline ------------------------------------------------------


class Model(nn.Module):
    def __init__(self, way: int):
        super().__init__()
        self.backbone = conv4(variant="strided", channels_last=False)
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        self.head = nn.Linear(64, way)

    def forward(self, x):
        return self.head(self.backbone(x))


def clone_module(module: nn.Module) -> nn.Module:
    """A shallow copy of the module tree whose parameters are differentiable clones."""
    new = copy.copy(module)
    new._parameters = {n: None if p is None else p.clone() for n, p in module._parameters.items()}
    new._buffers = dict(module._buffers)
    new._modules = {n: clone_module(m) for n, m in module._modules.items()}
    return new


def adapt(module: nn.Module, loss: torch.Tensor, lr: float) -> None:
    """One SGD step written into the clone's parameters, keeping the graph."""
    owners = [(m, n) for m in module.modules() for n, p in m._parameters.items() if p is not None]
    grads = torch.autograd.grad(loss, [m._parameters[n] for m, n in owners], create_graph=True)
    for (m, n), g in zip(owners, grads):
        m._parameters[n] = m._parameters[n] - lr * g


def baseline_step(model: Model, optimizer, ep: Episodes, steps: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    for sx, sy, qx, qy in zip(ep.support_x, ep.support_y, ep.query_x, ep.query_y):
        learner = clone_module(model)
        for _ in range(steps):
            adapt(learner, F.cross_entropy(learner(sx), sy), INNER_LR)
        (F.cross_entropy(learner(qx), qy) / ep.batch_size).backward()
    optimizer.step()


# -- speed -------------------------------------------------------------------------------


def sides(way, steps, device):
    """name -> (module, step function) for every side, all from the same initial weights."""
    torch.manual_seed(0)
    reference = MAML(strided_conv4(), way, inner_steps=steps, inner_lr=INNER_LR)
    out = {}
    for batched in ("auto", "loop", "vmap", "threads"):
        learner = copy.deepcopy(reference)
        learner.batched = batched
        learner.to(device).configure_optimizer(functools.partial(torch.optim.Adam, lr=1e-3))
        out[batched] = (learner, lambda ep, m=learner: m.meta_train_step(ep))
    unfused = copy.deepcopy(reference)  # auto with PyTorch's own second derivatives
    unfused.to(device).configure_optimizer(functools.partial(torch.optim.Adam, lr=1e-3))
    out["unfused"] = (unfused, second_order.turned_off()(unfused.meta_train_step))
    model = Model(way)
    with torch.no_grad():  # the same weights; module indices differ (no ChannelsLast layer)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.copy_(q)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out["baseline"] = (model, lambda ep: baseline_step(model, opt, ep, steps))
    return out


def meta_gradients(
    module: nn.Module, ep: Episodes, steps: int, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """The meta-gradient of the mean query loss with respect to the initial weights."""
    module = copy.deepcopy(module).to(dtype)
    module.zero_grad(set_to_none=True)
    if isinstance(module, MAML):  # the timed code path: meta_train_step, with no update
        module.optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
        module.meta_train_step(ep)
    else:
        baseline_step(module, torch.optim.SGD(module.parameters(), lr=0.0), ep, steps)
    return [p.grad.detach().flatten() for p in module.parameters() if p.grad is not None]


def gradient_agreement(runs: dict, ep: Episodes, steps: int) -> dict:
    """Relative difference of each metarun side's meta-gradient from the baseline's, in
    float32 as timed and in float64 on the same tasks (where rounding is out of the way)."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        e = as_dtype(ep, dtype)
        grads = {k: meta_gradients(m, e, steps, dtype) for k, (m, _) in runs.items()}
        with second_order.turned_off():
            grads["unfused"] = meta_gradients(runs["unfused"][0], e, steps, dtype)
        key = "float32" if dtype == torch.float32 else "float64"
        out[key] = {
            k: max_relative_difference(grads[k], grads["baseline"])
            for k in ("loop", "vmap", "threads", "unfused")
        }
    return out


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat(a).double(), torch.cat(b).double()
    return float((a - b).norm() / b.norm())


def measure_speed(name: str, device: torch.device, quick: bool) -> dict:
    way, shot, query, batch, steps, reference = CONFIGS[name]
    if quick:  # a smoke test of the code paths, not a measurement
        batch = 2
    ep = episodes(way, shot, query, batch, device)
    runs = sides(way, steps, device)
    agreement = gradient_agreement(runs, ep[:2], steps)
    repeats = 1 if quick else REPEATS
    times = {k: [] for k in runs}
    for _, fn in runs.values():
        fn(ep)  # warm-up: allocations, kernel choice
    for i in range(repeats):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for k in order:
            times[k].append(ms_per_call(lambda k=k: runs[k][1](ep), 1, device))
    its = {k: 1000 / statistics.median(v) for k, v in times.items()}
    chosen = runs["auto"][0].formulation(device, batch)
    return {
        "benchmark": f"maml_{name}",
        "config": f"({name}) {way}-way {shot}-shot {query}-query, meta-batch {batch}, "
        f"{steps} inner step{'s' if steps > 1 else ''}, second order",
        "unit": "meta-iterations/s",
        "metarun": its["auto"],
        "auto_picks": chosen,
        "loop": its["loop"],
        "vmap": its["vmap"],
        "threads": its["threads"],
        "unfused": its["unfused"],
        "fused_kernels": second_order.extension() is not None,
        "fused_x": its["auto"] / its["unfused"],
        "baseline": its["baseline"],
        "ratio": its["auto"] / its["baseline"],
        "l2l_reference": reference,
        "x_vs_l2l_reference": its["auto"] / reference,
        "target_x": TARGET_X,
        "met_target": its["auto"] >= TARGET_X * reference,
        "meta_gradient_rel_diff_vs_baseline": agreement["float32"],
        "meta_gradient_rel_diff_vs_baseline_float64": agreement["float64"],
        "repeats": repeats,
        "samples_ms": times,
    }


# -- memory ------------------------------------------------------------------------------


def memory_probe(algo: str, steps: int, device: torch.device) -> float:
    """MB by which one meta-training step raises the peak memory (fresh process on CPU)."""
    way, shot, query, batch = MEMORY_SHAPE
    torch.manual_seed(0)
    if algo == "maml":
        learner = MAML(strided_conv4(), way, inner_steps=steps, batched="loop")
    else:
        learner = IMAML(strided_conv4(), way, inner_steps=steps, cg_steps=5)
    learner.to(device).configure_optimizer(functools.partial(torch.optim.Adam, lr=1e-3))
    ep = episodes(way, shot, query, batch, device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
        learner.meta_train_step(ep)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = rss_bytes()
    with RssPeak() as peak:
        learner.meta_train_step(ep)
    return (max(peak.bytes, rss_bytes()) - before) / 2**20


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssPeak(TorchFunctionMode):
    """Samples the resident set size after every torch function call; keeps the peak."""

    bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.bytes = max(self.bytes, rss_bytes())
        return out


def measure_memory(device: torch.device, quick: bool) -> dict:
    steps_list = MEMORY_STEPS[:2] if quick else MEMORY_STEPS
    mb = {"maml": [], "imaml": []}
    for steps in steps_list:
        for algo in mb:
            if device.type == "cuda":
                mb[algo].append(memory_probe(algo, steps, device))
                continue
            cmd = [sys.executable, "-m", "benchmarks.bench_maml", "--probe", f"{algo}:{steps}"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            mb[algo].append(json.loads(out.strip().splitlines()[-1])["mb"])
    way, shot, query, batch = MEMORY_SHAPE
    return {
        "benchmark": "maml_imaml_memory",
        "config": f"{way}-way {shot}-shot {query}-query, meta-batch {batch}",
        "unit": "MB peak growth in one step",
        "inner_steps": list(steps_list),
        "maml_mb": mb["maml"],
        "imaml_mb": mb["imaml"],
        # iMAML's memory must not grow with the inner steps; MAML's does
        "met_target": max(mb["imaml"]) <= 1.5 * min(mb["imaml"]) + 16,
    }


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    print(f"MAML meta-iterations on {device}, torch threads {torch.get_num_threads()}")
    records = []
    for name in CONFIGS:
        r = measure_speed(name, device, quick)
        r["device"] = str(device)
        print_speed(r)
        records.append(r)
    r = measure_memory(device, quick)
    r["device"] = str(device)
    print_memory(r)
    records.append(r)
    return records


def print_speed(r: dict) -> None:
    met = "met" if r["met_target"] else "MISSED"
    diff = r["meta_gradient_rel_diff_vs_baseline"]
    d64 = r["meta_gradient_rel_diff_vs_baseline_float64"]
    print(f"  {r['config']}:")
    print(
        f"    metarun (auto = {r['auto_picks']}) {r['metarun']:.2f} it/s; loop {r['loop']:.2f}, "
        f"vmap {r['vmap']:.2f}, threads {r['threads']:.2f}; learn2learn-style baseline "
        f"{r['baseline']:.2f} it/s"
    )
    kernels = "fused second-order kernels" if r["fused_kernels"] else "fused kernels NOT BUILT"
    print(
        f"    auto with PyTorch's own second derivatives {r['unfused']:.2f} it/s: "
        f"{kernels} {r['fused_x']:.2f}x"
    )
    print(
        f"    {r['ratio']:.2f}x the baseline; {r['x_vs_l2l_reference']:.2f}x the learn2learn "
        f"reference {r['l2l_reference']} it/s (target {r['target_x']}x): {met}"
    )
    print(
        "    meta-gradients vs baseline, relative difference: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diff.items())
        + "; in float64: "
        + ", ".join(f"{k} {v:.1e}" for k, v in d64.items())
    )


def print_memory(r: dict) -> None:
    print(f"  peak memory growth of one step, {r['config']} (MB):")
    for steps, a, b in zip(r["inner_steps"], r["maml_mb"], r["imaml_mb"]):
        print(f"    {steps:2d} inner steps: MAML {a:8.1f}   iMAML {b:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true", help="short timings, for a smoke test")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # algo:steps, one memory probe
    args = parser.parse_args()
    if args.probe:
        algo, steps = args.probe.split(":")
        print(json.dumps({"mb": memory_probe(algo, int(steps), torch.device(args.device))}))
        return
    run(args.device, args.quick)


if __name__ == "__main__":
    main()
