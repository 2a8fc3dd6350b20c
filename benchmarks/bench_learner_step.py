"""Meta-training steps per second of each learner, against the bare networks' step.

Both sides see the same images and do the same optimizer work, so the ratio
is the learner's own overhead (pairing, prototypes, attention, distances,
loss, accuracy, Python around them):

metarun:  `Learner(backbone).meta_train_step(episodes)` after an Adam optimizer at 1e-3,
          with the learner's default settings (conf/algo/<name>.yaml).
baseline: a second copy of the backbone with the same initial weights, one
          forward of the images the learner's step puts through it, already
          stacked into one batch before timing (support and query images),
          loss = output.sum(), backward, and Adam(lr=1e-3) with
          `zero_grad(set_to_none=True)` and `step()`.

Relation Network has a second network, the relation module, which runs on
every (query, class) pair, so against the backbone alone it cannot come near
the target. It gets a second line, `relation_networks`: the baseline then also
runs a copy of the relation module forward and backward on a fixed tensor of
the pair shape [B*nq*way, 2C, h, w] that requires grad (so its backward
computes the input gradient, as in training): the straightforward way to run
the paper's two networks. The learner splits the first relation convolution
into a class part and a query part instead of building that tensor, so it can
be faster than this baseline.

The two sides are timed in alternating blocks (A B, B A, A B, ...) and each
side's median is reported, so slow drift on a busy machine hits both alike.
Episodes come from the synthetic set: only their shapes matter here.

Run: python -m benchmarks.bench_learner_step [--device cpu] [--quick] [--learners protonet,...]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.timing import interleaved
from metarun.algorithms import MatchingNet, ProtoNet, RelationNet, Siamese, conv4
from metarun.data import Episodes, EpisodeSampler
from metarun.data.synthetic import synthetic

CONFIGS = ((5, 1, 15), (20, 1, 5))  # (way, shot, query)
META_BATCH = 4
LR = 1e-3
REPEATS = 9  # timed blocks per side; the medians over these are reported
BLOCK_S = 0.6  # seconds per block (at least one step): long enough to beat timer noise
TARGETS = {"protonet": 0.10}  # issue 2 asked ProtoNet for 10%; issue 3 the others for 15%
DEFAULT_TARGET = 0.15


@dataclass(frozen=True)
class Spec:
    """How to build a learner and the inputs of its bare baseline."""

    build: Callable[[nn.Module], nn.Module]
    backbone: Callable[[], nn.Module]
    baseline: str


def relation_backbone() -> nn.Module:
    return conv4(pooled_blocks=2, flatten=False)  # backbone=conv4_relation


SUPPORT_QUERY = "backbone on torch.cat(support, query)"
SPECS = {
    "protonet": Spec(ProtoNet, conv4, SUPPORT_QUERY),
    "siamese": Spec(Siamese, conv4, SUPPORT_QUERY),
    "matching": Spec(MatchingNet, conv4, SUPPORT_QUERY),
    "relation": Spec(RelationNet, relation_backbone, SUPPORT_QUERY + " (embedding module only)"),
    "relation_networks": Spec(
        RelationNet,
        relation_backbone,
        SUPPORT_QUERY + " + relation module on a fixed pair tensor",
    ),
}
BASELINE_DESCRIPTION = "forward, loss = output.sum(), backward, Adam zero_grad + step"


def make_learner(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the baseline copies these initial weights
    spec = SPECS[name]
    learner = spec.build(spec.backbone()).to(device)
    learner.configure_optimizer(functools.partial(torch.optim.Adam, lr=LR))
    return learner


def learner_step(learner: nn.Module, episodes: Episodes) -> Callable[[], object]:
    return lambda: learner.meta_train_step(episodes)


def bare_step(name: str, learner: nn.Module, episodes: Episodes) -> Callable[[], object]:
    """The baseline: the learner's networks alone on tensors stacked before timing."""
    x = torch.cat([episodes.support_x.flatten(0, 1), episodes.query_x.flatten(0, 1)])
    nets = [copy.deepcopy(learner.backbone).train()]
    inputs = [x]
    if name == "relation_networks":
        c, h, w = learner.backbone.feature_shape
        pairs = META_BATCH * episodes.query_x.shape[1] * episodes.way
        nets.append(copy.deepcopy(learner.relation).train())
        # requires grad, as the learner's pairs do: the module's backward then also computes
        # the gradient with respect to its input, which the embedding module needs
        inputs.append(torch.randn(pairs, 2 * c, h, w, device=x.device, requires_grad=True))
    params = [p for net in nets for p in net.parameters()]
    optimizer = torch.optim.Adam(params, lr=LR)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for inp in inputs:
            inp.grad = None
        sum(net(inp).sum() for net, inp in zip(nets, inputs)).backward()
        optimizer.step()

    return step


def measure(name: str, way: int, shot: int, query: int, device, quick: bool) -> dict:
    store = synthetic(split="train")
    episodes = EpisodeSampler(store, way, shot, query, device=device, seed=0).sample(META_BATCH)
    learner = make_learner(name, device)
    bare = bare_step(name, learner, episodes)
    # quick: a smoke test of the code path, not a measurement
    repeats, block_s, warmup = (2, 0.05, 1) if quick else (REPEATS, BLOCK_S, 2)
    ours, base = interleaved(
        learner_step(learner, episodes), bare, repeats, block_s, warmup, device
    )
    ours_ms, base_ms = statistics.median(ours), statistics.median(base)
    paired = [o / b - 1 for o, b in zip(ours, base)]  # per block pair: shows the noise
    target = TARGETS.get(name, DEFAULT_TARGET)
    return {
        "benchmark": f"{name}_step",
        "learner": name,
        "config": f"{way}-way {shot}-shot {query}-query, meta-batch {META_BATCH}, 28x28x1",
        "unit": "ms/step",
        "metarun": ours_ms,
        "baseline": base_ms,
        "steps_per_s": 1000 / ours_ms,
        "ratio": ours_ms / base_ms,
        "overhead": ours_ms / base_ms - 1,
        "target_overhead": target,
        "met_target": ours_ms / base_ms - 1 <= target,
        "baseline_includes": f"{SPECS[name].baseline}: {BASELINE_DESCRIPTION}",
        "repeats": repeats,
        "paired_overhead_range": [min(paired), max(paired)],
        "samples_ms": {"metarun": ours, "baseline": base},
    }


def run(device: str = "cpu", quick: bool = False, learners=tuple(SPECS)) -> list[dict]:
    """Measure every learner and config; print a few lines each and return one record each."""
    device = torch.device(device)
    print(f"learner steps on {device}, torch threads {torch.get_num_threads()}")
    print(f"  baseline: {BASELINE_DESCRIPTION}")
    records = []
    for name in learners:
        for way, shot, query in CONFIGS:
            record = measure(name, way, shot, query, device, quick)
            record["device"] = str(device)
            print_record(record)
            records.append(record)
    return records


def print_record(r: dict) -> None:
    met = "met" if r["met_target"] else "MISSED"
    low, high = r["paired_overhead_range"]
    print(f"  {r['learner']}, {r['config']}; baseline {r['baseline_includes']}:")
    print(
        f"    metarun   {r['metarun']:8.2f} ms/step = {r['steps_per_s']:.2f} steps/s "
        f"(median of {r['repeats']})"
    )
    print(f"    baseline  {r['baseline']:8.2f} ms/step")
    print(
        f"    overhead  {r['overhead']:+8.1%} (block pairs {low:+.1%} .. {high:+.1%}); "
        f"target <= {r['target_overhead']:+.0%}: {met}"
    )


def parse_learners(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise SystemExit(f"unknown learner(s) {unknown}; choose from {', '.join(SPECS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true", help="short timings, for a smoke test")
    parser.add_argument("--learners", default=",".join(SPECS), type=parse_learners)
    args = parser.parse_args()
    run(args.device, args.quick, args.learners)


if __name__ == "__main__":
    main()
