"""MAML meta-iterations per second: metarun against the real learn2learn, in one process.

Runs inside the side environment that `make bench-env` builds (.venv-l2l: the newest torch
pip has here, learn2learn 0.2.0 built from source, metarun editable):

    .venv-l2l/bin/python -m benchmarks.bench_l2l [--device cpu] [--quick] [--json PATH]
    .venv-l2l/bin/python -m benchmarks.bench_l2l --scaling   # each side at 1 and all threads

The configs, episodes and inner step size are bench_maml's (second-order MAML, 28x28x1
random images, the same episodes for both sides):
  (a) 5-way 1-shot, 5 queries per class, meta-batch 32, 1 inner step
  (b) 20-way 1-shot, 5 queries per class, meta-batch 16, 5 inner steps
Sides, each a full meta-training step, timed in interleaved blocks (benchmarks/timing.py):
  metarun     MAML(strided_conv4(), way, inner_steps, inner_lr=0.4, batched="auto"), the
              network conf/backbone/conv4_strided.yaml gives `metarun algo=maml`
              with configure_optimizer(partial(torch.optim.Adam, lr=1e-3)), then
              meta_train_step(episodes) (which also returns the loss and per-task accuracy)
  learn2learn l2l.algorithms.MAML(l2l.vision.models.OmniglotCNN(way), lr=0.4,
              first_order=False) and Adam(lr=1e-3) on its parameters, the loop of
              learn2learn's examples/vision/maml_omniglot.py: zero_grad; per task clone(),
              adapt() on the support loss for each inner step, the query loss's backward()
              plus its loss and accuracy as Python floats; the gradients divided by the
              meta-batch size; Adam's step
Reported: meta-iterations/s of each side (median over blocks), their ratio metarun /
learn2learn, and the spread: the lowest and highest ratio of paired blocks (a block of
each side, run one right after the other).

The two networks. Layer for layer the same shapes and parameters (checked at the start:
equal parameter counts and shapes, then equal logits and meta-gradients once metarun's
model is given learn2learn's weights): 4 x (3x3 convolution, 64 channels, stride 2,
padding 1, with bias; batch norm, affine; ReLU), the mean over the remaining 2x2
positions, a linear head of 64 -> way. What differs, none of it in what a training step
computes:
  - batch norm: both normalise with the statistics of the current batch in training. learn2learn's
    is a plain nn.BatchNorm2d that also updates running statistics (momentum 0.1, the
    buffers shared by every clone) at each forward pass and never uses them in training;
    metarun's (batch_norm="transductive", BatchStatisticsNorm) keeps none.
  - initial weights: learn2learn's Xavier-uniform convolutions with zero biases, batch
    norm scales uniform in [0, 1), a head with N(0, 1) weights and zero biases; metarun's
    PyTorch defaults. For the timings metarun starts from learn2learn's weights.
  - formulation: learn2learn runs task after task with torch's intra-op threads; metarun's
    batched="auto" picks worker threads on a multi-core CPU (see MAML.formulation), the
    loop on one core, vmap on CUDA. Both run NCHW (conv4_strided.yaml's layout).
  - ReLU: metarun's works in place, learn2learn's does not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_maml import CONFIGS, INNER_LR, as_dtype, episodes, strided_conv4
from benchmarks.timing import interleaved, ms_per_call
from metarun.algorithms import MAML, second_order
from metarun.data import Episodes

REPO = Path(__file__).resolve().parents[1]
SIDE_ENV = REPO / ".venv-l2l"
SOURCE = "learn2learn 0.2.0 (real, side env)"
META_LR = 1e-3
# config: (blocks per side, seconds per block); a learn2learn step takes about 0.8 s at
# (a) and 2 s at (b) on a 2-core CPU, so the whole run stays near 5 minutes there
TIMING = {"a": (10, 5.0), "b": (8, 8.0)}
WARMUP = 2


# -- the side environment ---------------------------------------------------------------


def available(env: Path = SIDE_ENV) -> Path | None:
    """The side environment's Python when it exists and imports learn2learn, else None."""
    python = env / "bin" / "python"
    if not python.is_file():
        return None
    try:
        subprocess.run(
            [str(python), "-c", "import learn2learn"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return python


def run_in_side_env(device: str = "cpu", quick: bool = False) -> list[dict] | None:
    """Run this benchmark in the side environment and return its records, or None when
    there is no usable side environment (`make bench-env` builds it). Its table and
    progress go to this process's stdout as they come."""
    python = available()
    if python is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench_l2l.json"
        cmd = [str(python), "-m", "benchmarks.bench_l2l", "--device", device, "--json", str(out)]
        subprocess.run(cmd + (["--quick"] if quick else []), check=True, cwd=REPO)
        return json.loads(out.read_text())


def import_learn2learn():
    """learn2learn, imported without the notice that gym 0.26 prints on import (learn2learn
    imports gym for its reinforcement-learning module; nothing here uses it)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            import learn2learn
    finally:
        text = err.getvalue()
        if text and "Gym has been unmaintained" not in text:
            sys.stderr.write(text)
    return learn2learn


# -- the two sides -----------------------------------------------------------------------


def l2l_step(maml, optimizer, ep: Episodes, steps: int) -> None:
    """One meta-training step as learn2learn's examples/vision/maml_omniglot.py makes it."""
    optimizer.zero_grad()
    error = accuracy = 0.0
    for sx, sy, qx, qy in zip(ep.support_x, ep.support_y, ep.query_x, ep.query_y):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        logits = learner(qx)
        loss = F.cross_entropy(logits, qy)
        loss.backward()
        error += loss.item()
        accuracy += (logits.argmax(1) == qy).float().mean().item()
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / ep.batch_size)
    optimizer.step()


def layer_pairs(l2l_model: nn.Module, learner: MAML) -> list[tuple[nn.Module, nn.Module]]:
    """(learn2learn module, metarun module) for each convolution, batch norm and the head,
    in network order (learn2learn's ConvBlock registers its batch norm before its
    convolution, so the parameter lists are not in the same order)."""
    ours = [m for m in learner.backbone if isinstance(m, nn.Sequential)]
    pairs = []
    for theirs, block in zip(l2l_model.base, ours, strict=True):
        pairs += [(theirs.conv, block[0]), (theirs.normalize, block[1])]
    return pairs + [(l2l_model.classifier, learner.head)]


def check_same_network(l2l_model: nn.Module, learner: MAML) -> dict:
    """Parameter counts and shapes, layer by layer; raises if they differ."""
    count = {
        "learn2learn": sum(p.numel() for p in l2l_model.parameters()),
        "metarun": sum(p.numel() for p in learner.parameters()),
    }
    for theirs, ours in layer_pairs(l2l_model, learner):
        for name in ("weight", "bias"):
            a, b = getattr(theirs, name), getattr(ours, name)
            if a.shape != b.shape:
                raise AssertionError(f"{name} of {theirs} {tuple(a.shape)} vs {tuple(b.shape)}")
    if count["learn2learn"] != count["metarun"]:
        raise AssertionError(f"parameter counts differ: {count}")
    return count


def copy_weights(l2l_model: nn.Module, learner: MAML) -> None:
    with torch.no_grad():
        for theirs, ours in layer_pairs(l2l_model, learner):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)


def make_sides(way: int, steps: int, device: torch.device):
    """(learn2learn MAML, its Adam), metarun MAML: the same initial weights."""
    l2l = import_learn2learn()
    torch.manual_seed(0)
    model = l2l.vision.models.OmniglotCNN(way)
    learner = MAML(strided_conv4(), way, steps, inner_lr=INNER_LR, batched="auto")
    check_same_network(model, learner)
    copy_weights(model, learner)
    maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=False).to(device)
    optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR)
    learner.to(device).configure_optimizer(functools.partial(torch.optim.Adam, lr=META_LR))
    return maml, optimizer, learner


def agreement(way: int, steps: int, ep: Episodes) -> dict:
    """Fresh sides from the same weights on the first 2 tasks of `ep` (on the CPU, in
    float64, where rounding is out of the way): the largest difference of the training
    logits before any step, relative to their size, and the relative difference of the
    meta-gradients (metarun's through meta_train_step with a zero learning rate)."""
    maml, _, learner = make_sides(way, steps, torch.device("cpu"))
    maml, learner = maml.double(), learner.double()
    ep = as_dtype(ep[:2].to("cpu"), torch.float64)
    maml.train()
    learner.train()
    x = ep.query_x[0]
    with torch.no_grad():
        a, b = maml(x), learner(x)
    logits = float((a - b).abs().max() / a.abs().max())
    l2l_step(maml, torch.optim.SGD(maml.parameters(), lr=0.0), ep, steps)
    learner.optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    learner.meta_train_step(ep)
    theirs, ours = [], []
    for t, o in layer_pairs(maml.module, learner):
        for name in ("weight", "bias"):
            theirs.append(getattr(t, name).grad.flatten())
            ours.append(getattr(o, name).grad.flatten())
    a, b = torch.cat(theirs), torch.cat(ours)
    return {"logits_float64": logits, "meta_gradient_float64": float((a - b).norm() / a.norm())}


# -- timing ------------------------------------------------------------------------------


def measure(name: str, device: torch.device, quick: bool) -> dict:
    way, shot, query, batch, steps, _ = CONFIGS[name]
    if quick:  # a smoke test of the code paths, not a measurement
        batch = 2
    ep = episodes(way, shot, query, batch, device)
    same = agreement(way, steps, ep)
    maml, optimizer, learner = make_sides(way, steps, device)
    repeats, block_s = (2, 0.0) if quick else TIMING[name]
    ms_ours, ms_theirs = interleaved(
        lambda: learner.meta_train_step(ep),
        lambda: l2l_step(maml, optimizer, ep, steps),
        repeats,
        block_s,
        1 if quick else WARMUP,
        device,
    )
    ours = 1000 / statistics.median(ms_ours)
    theirs = 1000 / statistics.median(ms_theirs)
    paired = [t / o for o, t in zip(ms_ours, ms_theirs)]  # metarun / learn2learn, per block
    return {
        "benchmark": f"maml_vs_l2l_{name}",
        "config": f"({name}) {way}-way {shot}-shot {query}-query, meta-batch {batch}, "
        f"{steps} inner step{'s' if steps > 1 else ''}, second order",
        "unit": "meta-iterations/s",
        "metarun": ours,
        "auto_picks": learner.formulation(device, batch),
        "baseline": theirs,
        "ratio": ours / theirs,
        "spread": [min(paired), max(paired)],
        "source": SOURCE,
        "fused_kernels": second_order.extension() is not None,
        "parameters": sum(p.numel() for p in learner.parameters()),
        "same_network": same,
        "blocks": repeats,
        "block_s": block_s,
        "samples_ms": {"metarun": ms_ours, "learn2learn": ms_theirs},
    }


def scaling(name: str, rounds: int = 4) -> dict:
    """How each side uses the CPU's cores (--scaling): meta-iterations/s of learn2learn and
    of metarun's loop with one torch thread, then with all of them, plus metarun's `auto`
    (worker threads) with all; the sides take turns, one step each, `rounds` times, medians
    reported. With one thread both run the same kernels task after task, so their ratio is
    the learner code's own; the rest is how well each turns more threads into speed."""
    way, shot, query, batch, steps, _ = CONFIGS[name]
    device = torch.device("cpu")
    ep = episodes(way, shot, query, batch, device)
    maml, optimizer, learner = make_sides(way, steps, device)
    loop = copy.deepcopy(learner)
    loop.batched = "loop"
    loop.configure_optimizer(functools.partial(torch.optim.Adam, lr=META_LR))
    unfused = second_order.turned_off()(loop.meta_train_step)  # PyTorch's derivatives
    threads = torch.get_num_threads()
    out = {"benchmark": f"maml_scaling_{name}", "threads": threads, "unit": "meta-iterations/s"}
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            sides = {
                f"learn2learn@{n}": lambda: l2l_step(maml, optimizer, ep, steps),
                f"metarun_loop@{n}": lambda: loop.meta_train_step(ep),
            }
            if n == 1:  # what metarun's fused second-order kernels bring, one thread
                sides["metarun_loop_unfused@1"] = lambda: unfused(ep)
            if n > 1:
                sides[f"metarun_auto@{n}"] = lambda: learner.meta_train_step(ep)
            for step in sides.values():  # warm-up
                ms_per_call(step, 1, device)
            ms = {k: [] for k in sides}
            for _ in range(rounds):
                for k, step in sides.items():
                    ms[k].append(ms_per_call(step, 1, device))
            out |= {k: 1000 / statistics.median(v) for k, v in ms.items()}
    finally:
        torch.set_num_threads(threads)
    return out


def print_scaling(r: dict) -> None:
    n = r["threads"]
    l1, o1 = r["learn2learn@1"], r["metarun_loop@1"]
    ln, on, an = r[f"learn2learn@{n}"], r[f"metarun_loop@{n}"], r[f"metarun_auto@{n}"]
    print(
        f"  {r['benchmark']}: 1 thread: learn2learn {l1:.3f}, metarun loop {o1:.3f} it/s "
        f"({o1 / l1:.2f}x); {n} threads: learn2learn {ln:.3f} ({ln / l1:.2f}x its 1-thread "
        f"speed), metarun loop {on:.3f} ({on / o1:.2f}x), metarun auto {an:.3f} "
        f"({an / o1:.2f}x the 1-thread loop; {an / ln:.2f}x learn2learn)"
    )
    u1 = r["metarun_loop_unfused@1"]
    print(
        f"    metarun loop with PyTorch's own second derivatives, 1 thread: {u1:.3f} it/s "
        f"({u1 / l1:.2f}x learn2learn; the fused kernels {o1 / u1:.2f}x)"
    )


def machine(device: torch.device) -> dict:
    l2l = import_learn2learn()
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    info = {
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "learn2learn": l2l.__version__,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_seconds() -> dict | None:
    """CPU seconds so far: the whole machine's busy time and steal time (/proc/stat) and
    this process's own (all its threads); None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _, _, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return {
        "busy": (user + nice + system + irq + softirq) / tick,
        "steal": steal / tick,
        "own": own.user + own.system,
    }


def others_cpu(before: dict | None, after: dict | None) -> dict:
    """How much CPU other processes (and the hypervisor, as steal) took during the run."""
    if before is None or after is None:
        return {}
    busy = after["busy"] - before["busy"]
    own = after["own"] - before["own"]
    return {
        "cpu_s_this_process": round(own, 1),
        "cpu_s_other_processes": round(max(0.0, busy - own), 1),
        "cpu_s_steal": round(after["steal"] - before["steal"], 1),
    }


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    info = machine(device)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    print(
        f"MAML: metarun against learn2learn {info['learn2learn']} on {device} ({info['cpu']}, "
        f"{info['cpu_count']} CPUs), torch {info['torch']}, {info['torch_threads']} threads, "
        f"load {info['load_avg_1m']}"
    )
    records = []
    for name in CONFIGS:
        r = measure(name, device, quick)
        print_record(r)
        records.append(r)
    after = {
        "load_avg_1m_after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "seconds": round(time.perf_counter() - start, 1),
    } | others_cpu(cpu_start, cpu_seconds())
    for r in records:
        r["machine"] = info | after
    print(
        f"  {after['seconds']:.0f} s; load {info['load_avg_1m']} at the start, "
        f"{after['load_avg_1m_after']} at the end"
        + (
            f"; CPU seconds: this process {after['cpu_s_this_process']}, other processes "
            f"{after['cpu_s_other_processes']}, steal {after['cpu_s_steal']}"
            if "cpu_s_this_process" in after
            else ""
        )
    )
    print()
    print(table(records))
    if quick:
        print("(--quick: a smoke test of the code paths; the figures mean nothing)")
    return records


def row_values(r: dict) -> tuple[str, str, str, str]:
    """metarun, baseline, ratio and target cells of a record, for run_all's table."""
    low, high = r["spread"]
    return (
        f"{r['metarun']:.2f} it/s ({r['auto_picks']})",
        f"{r['baseline']:.2f} it/s ({r['source']})",
        f"{r['ratio']:.2f}x (blocks {low:.2f}-{high:.2f}x)",
        "no target (issue 23 asks for the figure)",
    )


def table(records: list[dict]) -> str:
    rows = ["| benchmark | config | metarun | learn2learn | ratio |", "|---|---|---|---|---|"]
    for r in records:
        ours, theirs, ratio, _ = row_values(r)
        rows.append(f"| {r['benchmark']} | {r['config']} | {ours} | {theirs} | {ratio} |")
    return "\n".join(rows)


def print_record(r: dict) -> None:
    same = r["same_network"]
    print(f"  {r['config']}:")
    print(
        f"    metarun ({r['auto_picks']}) {r['metarun']:.2f} it/s, learn2learn "
        f"{r['baseline']:.2f} it/s: {r['ratio']:.2f}x (paired blocks "
        f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}x, {r['blocks']} blocks of ~{r['block_s']:.0f} s)"
    )
    print(
        "    metarun's fused second-order kernels: "
        + ("on" if r["fused_kernels"] else "NOT BUILT (PyTorch's own second derivatives)")
    )
    print(
        f"    same network: {r['parameters']:,} parameters each; with learn2learn's weights, "
        f"float64 relative difference of the logits {same['logits_float64']:.1e}, of the "
        f"meta-gradients {same['meta_gradient_float64']:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true", help="short timings, for a smoke test")
    parser.add_argument("--json", type=Path, help="also write the records to this file")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead: each side at 1 torch thread and at all of them (CPU)",
    )
    args = parser.parse_args()
    try:
        import_learn2learn()
    except ImportError as e:
        sys.exit(
            f"bench_l2l: learn2learn does not import here ({e}); run it in the side "
            f"environment: make bench-env, then .venv-l2l/bin/python -m benchmarks.bench_l2l"
        )
    if args.scaling:
        records = [scaling(name, 2 if args.quick else 4) for name in CONFIGS]
        for r in records:
            r["machine"] = machine(torch.device("cpu"))
            print_scaling(r)
    else:
        records = run(args.device, args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
