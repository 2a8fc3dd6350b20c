"""Reptile and iMAML on the CPU's cores: the tasks of a meta-batch in groups on worker
threads (batched="threads", one intra-op thread each) against the same learner running
them one after another (batched="loop", every op on all intra-op threads), same run.

Settings of the omniglot_small presets (strided conv4, 28x28 random episodes):
- reptile step: 5-way 10-shot, meta-batch 5, 5 inner SGD steps of 10 images
  (experiment=reptile_omniglot_small_5w1s); reptile predict: 5-way 1-shot 15-query tasks,
  10 fine-tuning steps, 8 tasks per call (its evaluation);
- imaml step: 5-way 1-shot 5-query, meta-batch 4, 8 inner steps, 3 CG steps
  (experiment=imaml_omniglot_small_5w1s); imaml predict: 5-way 1-shot 15-query, 16 inner
  steps, 8 tasks per call.

imaml_step_kernels: the imaml step with worker threads on both sides, metarun's fused
second-order kernels (algorithms/second_order.py) against PyTorch's own second
derivatives, for iMAML's Hessian-vector products.

Both sides start from the same weights; the record holds the largest relative
difference of the weights after one step (or of the predictions), which float rounding
alone explains (one intra-op thread against several per op); for the steps also the same
difference with both sides in float64, where rounding is out of the way (in float32
iMAML's conjugate gradient amplifies it to a few percent of the step).

Run: python -m benchmarks.bench_threads [--quick]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics

import torch

from benchmarks.bench_maml import as_dtype, episodes, strided_conv4
from benchmarks.timing import interleaved
from metarun.algorithms import IMAML, Reptile, second_order

REPEATS, BLOCK_S = 7, 1.0


def pair(make) -> tuple:
    torch.manual_seed(0)
    loop = make("loop")
    threads = copy.deepcopy(loop)
    threads.batched = "threads"
    for learner in (loop, threads):
        lr = 1.0 if isinstance(learner, Reptile) else 1e-3
        learner.configure_optimizer(functools.partial(torch.optim.SGD, lr=lr))
    return loop, threads


def step(learner, ep):
    def call():
        torch.manual_seed(0)  # Reptile's minibatch orders: the same on both sides
        learner.meta_train_step(ep)

    return call


def predict(learner, ep):
    def call():
        with torch.no_grad():
            learner.eval().predict(ep.support_x, ep.support_y, ep.query_x)

    return call


def difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b))


def after_one_step(loop, threads, ep, wrap=lambda call: call, dtype=torch.float32) -> float:
    """Largest relative difference of the weights after one step, computed in `dtype`;
    `wrap` wraps the first (loop) side's step."""
    ep = as_dtype(ep, dtype)
    out = []
    for learner, w in ((copy.deepcopy(loop), wrap), (copy.deepcopy(threads), lambda c: c)):
        learner.to(dtype)
        learner.optimizer = type(learner.optimizer)(
            learner.parameters(), **learner.optimizer.defaults
        )
        w(step(learner, ep))()
        out.append([p.detach() for p in learner.parameters()])
    return difference(*out)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device != "cpu":
        return []  # worker threads are a CPU formulation
    repeats, block = (2, 0.05) if quick else (REPEATS, BLOCK_S)
    dev = torch.device(device)

    def reptile(batched: str) -> Reptile:
        return Reptile(
            strided_conv4(), 5, inner_steps=5, inner_lr=0.1, inner_optimizer="sgd",
            inner_batch=10, test_inner_steps=10, batched=batched,
        )  # fmt: skip

    def imaml(batched: str) -> IMAML:
        return IMAML(
            strided_conv4(), 5, lam=0.25, inner_steps=8, inner_lr=0.1,
            test_inner_steps=16, cg_steps=3, batched=batched,
        )  # fmt: skip

    cases = (
        ("reptile_step", "5w10s, meta-batch 5, 5 SGD steps of 10", reptile, episodes(5, 10, 1, 5, "cpu"), "step"),
        ("reptile_predict", "5w1s 15q, 8 tasks, 10 steps", reptile, episodes(5, 1, 15, 8, "cpu"), "predict"),
        ("imaml_step", "5w1s 5q, meta-batch 4, 8 steps, 3 CG", imaml, episodes(5, 1, 5, 4, "cpu"), "step"),
        ("imaml_predict", "5w1s 15q, 8 tasks, 16 steps", imaml, episodes(5, 1, 15, 8, "cpu"), "predict"),
        ("imaml_step_kernels", "imaml step; fused kernels vs PyTorch's", imaml, episodes(5, 1, 5, 4, "cpu"), "kernels"),
    )  # fmt: skip
    records = []
    for name, config, make, ep, kind in cases:
        loop, threads = pair(make)
        if kind == "kernels":  # both threaded: metarun's fused kernels against PyTorch's
            loop.batched = "threads"
            unfused = second_order.turned_off()  # as a decorator: PyTorch's derivatives
            a, b = step(threads, ep), unfused(step(loop, ep))
            diff = after_one_step(loop, threads, ep, unfused)
            diff64 = after_one_step(loop, threads, ep, unfused, torch.float64)
        elif kind == "step":
            a, b = step(threads, ep), step(loop, ep)
            diff = after_one_step(loop, threads, ep)
            diff64 = after_one_step(loop, threads, ep, dtype=torch.float64)
        else:
            a, b = predict(threads, ep), predict(loop, ep)
            with torch.no_grad():
                out = [
                    m.eval().predict(ep.support_x, ep.support_y, ep.query_x)
                    for m in (loop, threads)
                ]
            diff = difference([out[1]], [out[0]])
            diff64 = None
        ours, base = interleaved(a, b, repeats, block, 1, dev)
        m, loop_ms = statistics.median(ours), statistics.median(base)
        records.append(
            {
                "benchmark": name,
                "config": config,
                "metarun": m,
                "baseline": loop_ms,
                "ratio": loop_ms / m,  # speed-up: loop time over threads time
                "spread": [min(base) / max(ours), max(base) / min(ours)],
                "threads": torch.get_num_threads(),
                "rel_diff_vs_loop": diff,
                "rel_diff_vs_loop_float64": diff64,
            }
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for r in run("cpu", args.quick):
        print(
            f"{r['benchmark']:16s} {r['config']:40s} threads {r['metarun']:8.1f} ms, loop "
            f"{r['baseline']:8.1f} ms: {r['ratio']:.2f}x (blocks {r['spread'][0]:.2f}-"
            f"{r['spread'][1]:.2f}x), {r['threads']} threads, rel. diff {r['rel_diff_vs_loop']:.1e}"
            + (
                f" (float64 {r['rel_diff_vs_loop_float64']:.1e})"
                if r["rel_diff_vs_loop_float64"] is not None
                else ""
            )
        )


if __name__ == "__main__":
    main()
