"""What the continual learners' protection costs per update, against plain fine-tuning.

Both sides take the same update on the same mini-batch: forward, cross-entropy, backward,
Adam at 1e-3 (the mode=continual step, runners/continual.py ContinualRun.update).

- ewc_penalty: EWC's update (cross-entropy + its penalty over the Fishers and anchors of
  the earlier tasks: 1 and 4 of them, and online EWC's single term) against FineTune's,
  on the same network (pixel_mlp 312-128 on 28x28 images, a 40-way task head, batches of
  32: experiment=ewc_omniglot_small_alphabets).
- den_step: DEN's update in its selective-retraining phase (the L2 pull toward the task's
  start, then putting back the weights outside the subnetwork and the proximal L1 step) as
  the network grows by expansions of 50 units per hidden layer, against FineTune's update
  on the starting 312-128 network.

The two sides are timed in alternating blocks (benchmarks/timing.py) and the medians are
reported; the ratio is metarun's protected step over the plain one.

Run: python -m benchmarks.bench_continual [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.timing import interleaved
from metarun.algorithms.backbones import pixel_mlp, pixels
from metarun.algorithms.continual import EWC, FineTune
from metarun.algorithms.den import DEN

WAY, BATCH, LR = 40, 32, 1e-3
REPEATS, BLOCK_S = 7, 0.5


def batch(device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, WAY, (BATCH,), generator=g)
    return x.to(device), y.to(device)


def stepper(learner, phase, x, y, task: int):
    """One mode=continual update of `learner` (its phase's weights, Adam)."""
    optimizer = torch.optim.Adam(learner.phase_parameters(phase), lr=LR)

    def step():
        loss = learner.loss(x, y, task, phase)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.after_update(phase, task, LR)

    return step


def plain(device, tasks: int):
    torch.manual_seed(0)
    learner = FineTune(pixel_mlp()).to(device)
    learner.setup("task", [WAY] * tasks)
    return learner


def with_history(learner, tasks: int, x, y):
    """Consolidate `tasks - 1` earlier tasks (EWC: their Fishers and anchors)."""
    for t in range(tasks - 1):
        learner.end_task(t, x, y)
    return learner


def record(name: str, config: str, ours: list[float], base: list[float], **extra) -> dict:
    m, b = statistics.median(ours), statistics.median(base)
    return {
        "benchmark": name,
        "config": config,
        "metarun": m,
        "baseline": b,
        "ratio": m / b,
        "spread": [min(ours) / max(base), max(ours) / min(base)],
        **extra,
    }


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    repeats, block = (2, 0.05) if quick else (REPEATS, BLOCK_S)
    x, y = batch(device)
    records = []
    for tasks, online in ((2, False), (5, False), (5, True)):
        base = plain(device, tasks)
        step_base = stepper(base, base.first_phase(tasks - 1), x, y, tasks - 1)
        torch.manual_seed(0)
        ewc = EWC(pixel_mlp(), lam=1000.0, online=online, fisher_samples=8).to(device)
        ewc.setup("task", [WAY] * tasks)
        with_history(ewc, tasks, x, y)
        step_ewc = stepper(ewc, ewc.first_phase(tasks - 1), x, y, tasks - 1)
        ours, theirs = interleaved(step_ewc, step_base, repeats, block, 2, device)
        kind = "online EWC (1 term)" if online else f"{tasks - 1} earlier task(s)"
        records.append(record("ewc_penalty", f"{kind}, pixel_mlp 312-128", ours, theirs))
    base = plain(device, 2)
    step_base = stepper(base, base.first_phase(1), x, y, 1)
    for grown in (0, 1, 4) if not quick else (0, 1):
        torch.manual_seed(0)
        den = DEN(pixels(1, 28), hidden=(312, 128), k=50, tau=0.0).to(device)
        den.setup("task", [WAY] * (grown + 2))
        finish_first(den, x, y)
        for t in range(1, grown + 1):  # each expansion adds 50 units per layer
            den.first_phase(t)
            den.expand(t)
            den.end_task(t, x, y)
        task = grown + 1
        den.first_phase(task)
        phase = den.begin("retrain", task, den.subnetwork(task))
        step_den = stepper(den, phase, x, y, task)
        ours, theirs = interleaved(step_den, step_base, repeats, block, 2, device)
        sizes = "-".join(map(str, den.sizes()))
        records.append(
            record("den_step", f"retrain phase, {sizes} units", ours, theirs, units=den.sizes())
        )
    return records


def finish_first(den: DEN, x, y) -> None:
    den.first_phase(0)
    den.done()
    den.end_task(0, x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for r in run(args.device, args.quick):
        print(
            f"{r['benchmark']:12s} {r['config']:45s} {r['metarun']:7.2f} ms vs "
            f"{r['baseline']:7.2f} ms: {r['ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()
