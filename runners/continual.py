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

A learner may train a task in several phases (algorithms/continual.py, Phase: DEN's
selective retraining, expansion and split), each with a fresh optimizer over the weights
it trains; after each phase the learner names the next one.

Written per run: results.json (average accuracy, backward and forward transfer, the
accuracy curve, R), continual.csv (R), metrics.jsonl (one row per task), and
checkpoints/last.pt and task-<t>.pt after every task. Inside a task last.pt is also written
every `continual.ckpt_every` updates and when SIGTERM or SIGINT arrives (after the update in
progress; a second signal: at once, at the last whole update), holding where the task's
training is (Cursor: phase, epoch, update, the optimizer's state). resume=PATH (a run
folder or a .pt file) or resume=auto continues from it and ends bit-identically to the
uninterrupted run: every mini-batch order is drawn from its (seed, task, epoch, phase), not
from a running generator. Every change of state happens in a block that signals wait for
(scoring every task after a task included, seconds on the small data sets), so a stop
always finds a state it can continue from; kill -9 loses the updates since the last
checkpoint.
"""

from __future__ import annotations

import logging
import math
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms.continual import ContinualLearner, Phase
from metarun.data.images import to_float
from metarun.data.sequences import ContinualTask, TaskSequence, class_sequence, domain_sequence
from metarun.errors import CheckpointError, ConfigError, StoppedError
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
from metarun.runners.stopping import Interrupted, stop_signals
from metarun.runners.trainer import check_compatible, resume_command

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
        source = getattr(self.learner, "representation", None)
        if source:  # a learner on a trained network (algo=oml): that checkpoint's backbone
            trust = bool(cfg.get("trust_checkpoint", False))
            self.learner.adopt(checkpoint.load_learner(source, trust=trust).backbone)
        self.scenario = cfg.continual.scenario
        self.learner.setup(self.scenario, [t.way for t in self.sequence.tasks])
        self.learner.to(device)
        self.matrix = AccuracyMatrix(len(self.sequence))
        self.next_task, self.elapsed = 0, 0.0
        # inside a task: where its training is (see Cursor); None between tasks
        self.cursor: Cursor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.updates = 0  # every update of the run, for continual.ckpt_every
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        inside = self.cursor is not None
        return {
            "model": self.learner.state_dict(),
            "matrix": self.matrix.state_dict(),
            "next_task": self.next_task,
            "cursor": self.cursor.state() if inside else None,
            "optimizer": self.optimizer.state_dict() if inside and self.optimizer else None,
            "updates": self.updates,
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
        self.learner.load_state_dict(state["model"])  # a growing learner takes its shapes
        self.learner.to(self.device)
        self.matrix = AccuracyMatrix.from_state(state["matrix"])
        self.next_task, self.elapsed = state["next_task"], state["elapsed"]
        self.updates = state.get("updates", 0)
        self.cursor = Cursor.from_state(state.get("cursor"))
        if self.cursor is not None and self.cursor.phase is not None:
            self.optimizer = self.make_optimizer(self.cursor.phase)
            if state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"])

    def save(self, *names: str) -> Path:
        """The run as it is now, in checkpoints/<name> (signals wait until written)."""
        with stop_signals() as signals, signals.shielded():
            state = self.state()
            for name in names:
                checkpoint.save_atomic(state, self.ckpt_dir / name)
        return self.ckpt_dir / names[0]

    def where(self) -> str:
        t = f"task {self.next_task + 1} of {len(self.sequence)}"
        c = self.cursor
        if c is None or c.phase is None:
            return t if c is None else f"{t} (trained, not yet scored)"
        return f"{t}, phase {c.phase.name}, epoch {c.epoch + 1}, update {c.batch}"

    def stop(self, signum: int, at_once: bool) -> None:
        path = self.save("last.pt")
        how = "stopped at once by a second signal" if at_once else "interrupted by"
        raise StoppedError(
            f"{how} {signal.Signals(signum).name} at {self.where()}; checkpoint written to "
            f"{path}. Resume with:\n  {resume_command(self.run_dir)}",
            exit_code=128 + signum,
        )

    # -- training ------------------------------------------------------------------------
    def make_optimizer(self, phase: Phase) -> torch.optim.Optimizer:
        """A fresh optimizer per task and phase: no moment estimate carries one task's
        gradients into the next."""
        params = list(self.learner.phase_parameters(phase))
        return instantiate_clean(self.cfg.optimizer)(params)

    def batches(self, tasks: list[ContinualTask], epoch: int, phase: Phase) -> list:
        """The epoch's mini-batches (task, indices), drawn from (seed, task, epoch, phase)
        alone, so that a resumed run draws the same ones."""
        c = self.cfg.continual
        salt = phase_salt(phase.name)
        out = []
        for task in tasks:
            g = torch.Generator().manual_seed(
                ((self.cfg.seed * 1009 + task.index) * 1009 + epoch) * 1009 + salt
            )
            order = torch.randperm(len(task.train_y), generator=g)
            out += [(task, idx) for idx in order.split(c.batch)]
        if len(tasks) > 1:  # interleave the tasks' batches in a seeded order
            g = torch.Generator().manual_seed(
                ((self.cfg.seed * 1009 + 999_983) * 1009 + epoch) * 1009 + salt
            )
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return out

    def update(self, task: ContinualTask, idx: torch.Tensor, phase: Phase) -> None:
        learner, c = self.learner, self.cursor
        x = to_float(task.train_x[idx].to(self.device))
        y = head_labels(task, task.train_y[idx], self.scenario).to(self.device)
        loss = learner.loss(x, y, task.index, phase)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at {self.where()}; lower trainer.lr (or the optimizer's "
                "settings) and run again"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        learner.after_update(phase, task.index, self.optimizer.param_groups[0]["lr"])
        c.loss_sum = c.loss_sum + loss.detach().double().cpu()
        c.count += 1
        c.batch += 1
        self.updates += 1

    def run_task(self, t: int, group: list[ContinualTask], signals) -> float:
        """Train on `group` (task t; a joint learner: every task), phase after phase, from
        where the cursor is. Every change of state happens inside a shielded block, so a
        signal finds the run at a point it can be resumed from."""
        learner, c = self.learner, self.cfg.continual
        last = group[-1]
        if self.cursor is None:
            with signals.shielded():
                learner.train()
                phase = learner.first_phase(t)
                self.cursor = Cursor(phase)
                self.optimizer = self.make_optimizer(phase)
        while self.cursor.phase is not None:
            cur, phase = self.cursor, self.cursor.phase
            epochs = c.epochs if phase.epochs is None else phase.epochs
            learner.train()
            while cur.epoch < epochs:
                batches = self.batches(group, cur.epoch, phase)
                for task, idx in batches[cur.batch :]:
                    with signals.shielded():
                        self.update(task, idx, phase)
                        if c.ckpt_every and self.updates % c.ckpt_every == 0:
                            self.save("last.pt")
                    self.check_signal(signals)
                with signals.shielded():
                    cur.epoch, cur.batch = cur.epoch + 1, 0
            with signals.shielded():  # the phase is over: the learner says what comes next
                loss = float(cur.loss_sum / cur.count) if cur.count else float("nan")
                x = to_float(last.train_x.to(self.device))
                y = head_labels(last, last.train_y, self.scenario).to(self.device)
                after = learner.next_phase(phase, t, x, y, loss)
                cur.losses.append(loss)
                self.cursor = Cursor(after, losses=cur.losses)
                self.optimizer = self.make_optimizer(after) if after is not None else None
            self.check_signal(signals)
        losses = self.cursor.losses  # every finished phase's mean loss; the last is the task's
        return losses[-1] if losses else float("nan")

    def check_signal(self, signals) -> None:
        signum = signals.requested()
        if signum is not None:
            self.stop(signum, at_once=False)

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
            with stop_signals() as signals, signals.training():
                try:
                    self.run_tasks(tasks, logger, signals)
                except Interrupted as stop:  # a second signal: the state is a whole one
                    self.stop(stop.signum, at_once=True)
            return self.finish(logger)
        finally:
            logger.finish()

    def run_tasks(self, tasks: list[ContinualTask], logger, signals) -> None:
        if self.next_task == 0 and any(math.isnan(a) for a in self.matrix.initial):
            with signals.shielded():  # the untrained network: forward transfer's reference
                for task in tasks:
                    acc = task_accuracy(self.learner, task, self.scenario, self.device)
                    self.matrix.record(-1, task.index, acc)
        joint = getattr(self.learner, "joint", False)
        while self.next_task < len(tasks):
            t = self.next_task
            if joint and t < len(tasks) - 1:
                self.next_task += 1  # joint training happens once, on every task
                continue
            group = tasks if joint else [tasks[t]]
            start = time.perf_counter()
            loss = self.run_task(t, group, signals)
            with signals.shielded():  # end of the task: consolidate, score, checkpoint
                for task in group:
                    self.learner.end_task(
                        task.index,
                        to_float(task.train_x.to(self.device)),
                        head_labels(task, task.train_y, self.scenario).to(self.device),
                    )
                for task in tasks:
                    acc = task_accuracy(self.learner, task, self.scenario, self.device)
                    self.matrix.record(t, task.index, acc)
                self.elapsed += time.perf_counter() - start
                self.next_task, self.cursor, self.optimizer = t + 1, None, None
                row = {
                    "loss": loss,
                    "average_accuracy": self.matrix.average_accuracy(t),
                    **{f"acc_task{i}": self.matrix.r[t][i] for i in range(len(tasks))},
                    **self.learner.describe(),
                }
                logger.log(t + 1, row)
                log.info(
                    "task %d/%d: average accuracy %.2f%% on tasks 0..%d",
                    t + 1,
                    len(tasks),
                    100 * row["average_accuracy"],
                    t,
                )
                self.save("last.pt", f"task-{t}.pt")  # task-N.pt: the run after task N
            self.check_signal(signals)

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
        # the dashboard: R as a table (row -1: the untrained network) and the three figures
        tasks = range(self.matrix.tasks)
        rows = [[-1, *results["initial"]], *([t, *row] for t, row in zip(tasks, results["R"]))]
        logger.table("continual/R", ["after_task", *(f"task_{i}" for i in tasks)], rows)
        logger.summary(
            {
                f"continual/{k}": results[k]
                for k in ("average_accuracy", "backward_transfer", "forward_transfer")
            }
        )
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


def phase_salt(name: str) -> int:
    """A phase's own number for its batch orders (stable across processes, unlike hash)."""
    return zlib.crc32(name.encode()) % 1_000_003


@dataclass
class Cursor:
    """Where the current task's training is: its phase (None: trained, end of task still to
    do), the epoch and the updates done in it, the phase's summed loss, and the mean loss
    of every phase finished so far."""

    phase: Phase | None
    epoch: int = 0
    batch: int = 0
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    count: int = 0
    losses: list[float] = field(default_factory=list)

    def state(self) -> dict:
        phase = (
            None if self.phase is None else {"name": self.phase.name, "epochs": self.phase.epochs}
        )
        return {
            "phase": phase,
            "epoch": self.epoch,
            "batch": self.batch,
            "loss_sum": self.loss_sum,
            "count": self.count,
            "losses": list(self.losses),
        }

    @classmethod
    def from_state(cls, state: dict | None) -> Cursor | None:
        if state is None:
            return None
        phase = None if state["phase"] is None else Phase(**state["phase"])
        return cls(
            phase,
            state["epoch"],
            state["batch"],
            state["loss_sum"],
            state["count"],
            list(state["losses"]),
        )
