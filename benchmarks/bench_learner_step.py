"""Milliseconds per ProtoNet meta-training step against the bare backbone's step.

Both sides see the same images and do the same optimizer work, so the ratio
is ProtoNet's own overhead (prototypes, distances, cross-entropy, accuracy,
Python around them):

metarun:  `ProtoNet(conv4()).meta_train_step(episodes)` after `configure_optimizer(1e-3)`.
baseline: a second `conv4()` with the same initial weights, one forward of the
          support and query images already concatenated into one batch
          [B*(ns+nq), 1, 28, 28] (done once, before timing), loss = output.sum(),
          backward, and Adam(lr=1e-3) with `zero_grad(set_to_none=True)` and `step()`.

The two are timed in alternating blocks (A B, B A, A B, ...) and each side's
median is reported, so slow drift on a busy machine hits both alike.
Episodes come from the synthetic set: only their shapes matter here.

Run: python -m benchmarks.bench_protonet_step [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from benchmarks.timing import interleaved
from metarun.algorithms import ProtoNet, conv4
from metarun.data import Episodes, EpisodeSampler
from metarun.data.synthetic import synthetic

CONFIGS = ((5, 1, 15), (20, 1, 5))  # (way, shot, query)
META_BATCH = 4
LR = 1e-3
REPEATS = 9  # timed blocks per side; the medians over these are reported
BLOCK_S = 0.6  # seconds per block (at least one step): long enough to beat timer noise
TARGET_OVERHEAD = 0.10  # the target: ProtoNet at most 10% slower than the bare step
BASELINE_DESCRIPTION = (
    "conv4 forward on torch.cat(support, query) (concatenated before timing), "
    "loss = output.sum(), backward, Adam zero_grad(set_to_none=True) + step"
)


def protonet_step(episodes: Episodes, device: torch.device) -> Callable[[], object]:
    torch.manual_seed(0)  # same initial weights as the baseline
    learner = ProtoNet(conv4()).to(device)
    learner.configure_optimizer(LR)
    return lambda: learner.meta_train_step(episodes)


def bare_step(episodes: Episodes, device: torch.device) -> Callable[[], object]:
    torch.manual_seed(0)
    net = conv4().to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    # [B*(ns+nq), C, H, W]: the batch ProtoNet builds inside its step, built once here
    x = torch.cat([episodes.support_x.flatten(0, 1), episodes.query_x.flatten(0, 1)])

    def step():
        optimizer.zero_grad(set_to_none=True)
        net(x).sum().backward()
        optimizer.step()

    return step


def measure(way: int, shot: int, query: int, device, quick: bool) -> dict:
    store = synthetic(split="train")
    episodes = EpisodeSampler(store, way, shot, query, device=device, seed=0).sample(META_BATCH)
    # quick: a smoke test of the code path, not a measurement
    repeats, block_s, warmup = (2, 0.05, 1) if quick else (REPEATS, BLOCK_S, 2)
    ours, base = interleaved(
        protonet_step(episodes, device),
        bare_step(episodes, device),
        repeats,
        block_s,
        warmup,
        device,
    )
    ours_ms, base_ms = statistics.median(ours), statistics.median(base)
    paired = [o / b - 1 for o, b in zip(ours, base)]  # per block pair: shows the noise
    return {
        "benchmark": "protonet_step",
        "config": f"{way}-way {shot}-shot {query}-query, meta-batch {META_BATCH}, 28x28x1",
        "unit": "ms/step",
        "metarun": ours_ms,
        "baseline": base_ms,
        "ratio": ours_ms / base_ms,
        "overhead": ours_ms / base_ms - 1,
        "met_target": ours_ms / base_ms - 1 <= TARGET_OVERHEAD,
        "baseline_includes": BASELINE_DESCRIPTION,
        "images_per_step": META_BATCH * way * (shot + query),
        "repeats": repeats,
        "paired_overhead_range": [min(paired), max(paired)],
        "samples_ms": {"metarun": ours, "baseline": base},
    }


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Measure every config; print a few lines per config and return one record each."""
    device = torch.device(device)
    print(f"protonet step on {device}, torch threads {torch.get_num_threads()}")
    print(f"  baseline: {BASELINE_DESCRIPTION}")
    records = []
    for way, shot, query in CONFIGS:
        record = measure(way, shot, query, device, quick)
        record["device"] = str(device)
        print_record(record)
        records.append(record)
    return records


def print_record(r: dict) -> None:
    met = "met" if r["met_target"] else "MISSED"
    low, high = r["paired_overhead_range"]
    print(f"  {r['config']} ({r['images_per_step']} images/step):")
    print(f"    metarun   {r['metarun']:8.2f} ms/step (median of {r['repeats']})")
    print(f"    baseline  {r['baseline']:8.2f} ms/step")
    print(
        f"    overhead  {r['overhead']:+8.1%} (block pairs {low:+.1%} .. {high:+.1%}); "
        f"target <= {TARGET_OVERHEAD:+.0%}: {met}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true", help="short timings, for a smoke test")
    args = parser.parse_args()
    run(args.device, args.quick)


if __name__ == "__main__":
    main()
