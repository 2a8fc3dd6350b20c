"""mode=continual: train one learner on a sequence of tasks, one after another, and after
each task score it on every task of the sequence (the accuracy matrix R of
runners/continual_metrics.py).

    metarun mode=continual algo=ewc continual.scenario=task continual.tasks=5

The sequence comes from the `continual` settings (data/sequences.py), the learner from
`algo` (a ContinualLearner, e.g. algo=finetune or ewc), the optimizer from `optimizer` (made
afresh for every task, so no moment estimate carries one task's gradients into the next).
Per task: `continual.epochs` passes over its training images in mini-batches of
`continual.batch`, in an order drawn from (seed, task, epoch); then the learner's end_task
(EWC: the Fisher and the anchor); then R[task, i] for every task i on its test images.
Before any training, row -1 holds the untrained network's accuracies (forward transfer's
reference). A learner with `joint = True` trains once on every task's images, interleaved,
and has R's last row only.

Written per run: results.json (average accuracy, backward and forward transfer, the
accuracy curve, R), continual.csv (R), metrics.jsonl (one row per task), and
checkpoints/last.pt and task-<t>.pt after every task, from which resume=PATH continues with
the next task and ends as the uninterrupted run would (the order of every mini-batch is drawn from its
seed, not from a running generator). Status (issue 22): a stop in the middle of a task loses
that task's progress (it is trained again on resume); DEN and OML are not written yet.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms.continual import ContinualLearner
from metarun.data.images import to_float
from metarun.data.sequences import ContinualTask, TaskSequence, class_sequence, domain_sequence
from metarun.errors import CheckpointError, ConfigError
from metarun.runners import checkpoint
from metarun.runners.build import (
    build_learner,
    build_store,
    choice,
    instantiate_clean,
    learners_that,
)
from metarun.runners.continual_metrics import AccuracyMatrix
from metarun.runners.files import write_text_atomic
from metarun.runners.logging import RunLogger
from metarun.runners.results import write_results
from metarun.runners.trainer import check_compatible

log = logging.getLogger("metarun")


def make_sequence(cfg: DictConfig) -> TaskSequence:
    c = cfg.continual
    store = build_store(cfg.data, c.split)
    if c.scenario == "domain":
        return domain_sequence(
            store, c.tasks, cfg.seed, c.transform, c.classes, test_fraction=c.test_fraction
        )
    return class_sequence(
        store, c.tasks, cfg.seed, c.grouping, c.classes_per_task, test_fraction=c.test_fraction
    )


def head_labels(task: ContinualTask, y: torch.Tensor, scenario: str) -> torch.Tensor:
    """Labels as the scenario's heads number them: a task head counts from 0."""
    return y - task.offset if scenario == "task" else y


@torch.no_grad()
def task_accuracy(learner: ContinualLearner, task: ContinualTask, scenario: str, device) -> float:
    learner.eval()
    correct = 0
    for x, y in zip(task.test_x.split(256), task.test_y.split(256)):
        logits = learner(to_float(x.to(device)), task.index)
        correct += int((logits.argmax(-1).cpu() == head_labels(task, y, scenario)).sum())
    return correct / len(task.test_y)


class ContinualRun:
    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.sequence = make_sequence(cfg)
        torch.manual_seed(cfg.seed)
        self.learner = build_learner(cfg)
        if not isinstance(self.learner, ContinualLearner):
            raise ConfigError(
                f"mode=continual needs a continual learner; algo={choice(cfg, 'algo')} is a "
                f"meta-learner (use algo={'|'.join(learners_that('continual'))})"
            )
        self.scenario = cfg.continual.scenario
        self.learner.setup(self.scenario, [t.way for t in self.sequence.tasks])
        self.learner.to(device)
        self.matrix = AccuracyMatrix(len(self.sequence))
        self.next_task, self.elapsed = 0, 0.0

    def state(self) -> dict:
        return {
            "model": self.learner.state_dict(),
            "matrix": self.matrix.state_dict(),
            "next_task": self.next_task,
            "elapsed": self.elapsed,
            "rng": checkpoint.rng_state(),
            "step": self.next_task,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def restore(self, path: str | Path) -> None:
        state = checkpoint.load(path, trust=bool(self.cfg.get("trust_checkpoint", False)))
        if "next_task" not in state:
            raise CheckpointError(f"{path} is not a mode=continual checkpoint")
        # the trainer's rule: every setting outside RESUME_MAY_CHANGE as the checkpoint's
        # (step 0: trainer.steps does not bound a continual run)
        check_compatible(self.cfg, OmegaConf.create(state["config"]), str(path), 0)
        self.learner.load_state_dict(state["model"])
        self.matrix = AccuracyMatrix.from_state(state["matrix"])
        self.next_task, self.elapsed = state["next_task"], state["elapsed"]
        checkpoint.set_rng_state(state["rng"])

    def train_task(self, tasks: list[ContinualTask], index: int) -> float:
        """Train on `tasks`' images (one task; a joint learner: all of them, interleaved);
        returns the mean training loss."""
        c = self.cfg.continual
        learner = self.learner
        learner.train()
        optimizer = instantiate_clean(self.cfg.optimizer)(learner.parameters())
        losses = []
        for epoch in range(c.epochs):
            batches = []
            for task in tasks:
                g = torch.Generator().manual_seed(
                    (self.cfg.seed * 1009 + task.index) * 1009 + epoch
                )
                order = torch.randperm(len(task.train_y), generator=g)
                batches += [(task, idx) for idx in order.split(c.batch)]
            if len(tasks) > 1:  # interleave the tasks' batches in a seeded order
                g = torch.Generator().manual_seed((self.cfg.seed * 1009 + 999_983) * 1009 + epoch)
                batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
            for task, idx in batches:
                x = to_float(task.train_x[idx].to(self.device))
                y = head_labels(task, task.train_y[idx], self.scenario).to(self.device)
                loss = learner.loss(x, y, task.index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss on task {index}; lower trainer.lr (or the optimizer's "
                        "settings) and run again"
                    )
                optimizer.step()
                losses.append(loss.detach())
        return float(torch.stack(losses).mean()) if losses else float("nan")

    def run(self, resume_from: str | Path | None = None) -> dict:
        if resume_from:
            self.restore(resume_from)
        tasks = self.sequence.tasks
        logger = RunLogger(
            self.run_dir,
            self.cfg,
            resume_step=self.next_task if resume_from else None,
            job_type="continual",
        )
        try:
            if self.next_task == 0:
                for task in tasks:  # the untrained network: forward transfer's reference
                    self.matrix.record(
                        -1,
                        task.index,
                        task_accuracy(self.learner, task, self.scenario, self.device),
                    )
            joint = getattr(self.learner, "joint", False)
            while self.next_task < len(tasks):
                t = self.next_task
                start = time.perf_counter()
                if joint and t < len(tasks) - 1:
                    self.next_task += 1  # joint training happens once, on every task
                    continue
                group = tasks if joint else [tasks[t]]
                loss = self.train_task(group, t)
                for task in group:
                    self.learner.end_task(
                        task.index,
                        to_float(task.train_x.to(self.device)),
                        head_labels(task, task.train_y, self.scenario),
                    )
                for task in tasks:
                    self.matrix.record(
                        t, task.index, task_accuracy(self.learner, task, self.scenario, self.device)
                    )
                self.elapsed += time.perf_counter() - start
                self.next_task = t + 1
                row = {
                    "loss": loss,
                    "average_accuracy": self.matrix.average_accuracy(t),
                    **{f"acc_task{i}": self.matrix.r[t][i] for i in range(len(tasks))},
                }
                logger.log(t + 1, row)
                log.info(
                    "task %d/%d: average accuracy %.2f%% on tasks 0..%d",
                    t + 1,
                    len(tasks),
                    100 * row["average_accuracy"],
                    t,
                )
                state = self.state()
                for name in ("last.pt", f"task-{t}.pt"):  # task-N.pt: the run after task N
                    checkpoint.save_atomic(state, self.run_dir / "checkpoints" / name)
            return self.finish(logger)
        finally:
            logger.finish()

    def finish(self, logger) -> dict:
        summary = self.matrix.summary()
        results = {
            "mode": "continual",
            "algo": choice(self.cfg, "algo"),
            "data": choice(self.cfg, "data"),
            "scenario": self.scenario,
            **summary,
            "seconds": self.elapsed,
            "sequence": [
                {
                    "task": t.index,
                    "classes": t.classes,
                    "train_images": len(t.train_y),
                    "test_images": len(t.test_y),
                }
                for t in self.sequence.tasks
            ],
        }
        results = without_nan(results)  # JSON has no NaN: an undefined figure is null
        write_text_atomic(self.run_dir / "continual.csv", self.matrix.csv(), "accuracy matrix")
        write_results(self.run_dir, results)
        return results


def without_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value
