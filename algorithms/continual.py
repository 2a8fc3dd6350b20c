"""Continual learners: one network trained on tasks one after another (data/sequences.py).

Unlike the meta-learners (base.MetaLearner: adapt to a support set, score its queries), a
continual learner is a classifier whose heads are fixed by the sequence before training:

- scenario "task" (task-incremental): one linear head per task, chosen by the task id, which
  is given at test time too; labels are the task's own, 0..way-1.
- scenario "class" (class-incremental): one head over every class of the sequence, no task
  id; a task's labels follow those of the tasks before it.
- scenario "domain" (domain-incremental): one head over the classes every task shares.

`FineTune` trains on each task in turn with nothing to protect what it learned before: the
forgetting to beat. `EWC` adds Kirkpatrick et al.'s (PNAS 2017) quadratic penalty.

`Joint` trains on every task at once: the reference above. The runner is
runners/continual.py (mode=continual); DEN is in den.py, OML in oml.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from metarun.data.params import NonNegativeFloat, Probability
from metarun.errors import ConfigError

from .base import feature_shape

SCENARIOS = ("task", "class", "domain")


@dataclass(frozen=True)
class Phase:
    """One stage of training on a task: mode=continual makes a fresh optimizer over
    phase_parameters(phase) and passes `epochs` times over the task's training images
    (None: continual.epochs). Most learners have one phase, "train"; DEN has several."""

    name: str = "train"
    epochs: int | None = None


class ContinualLearner(nn.Module):
    """A backbone and the heads its scenario needs (see the module docstring)."""

    title = "this learner"
    continual = True  # trained on a task sequence by mode=continual (runners/continual.py)
    scenarios: tuple[str, ...] = SCENARIOS
    refusal = ""  # why a scenario outside `scenarios` cannot be served

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList()
        self.scenario: str | None = None

    def setup(self, scenario: str, ways: list[int]) -> None:
        """Make the heads for a sequence whose tasks have `ways` classes each (call once,
        before training; the optimizer is made after it)."""
        if scenario not in SCENARIOS:
            raise ConfigError(f"scenario={scenario!r}; choose one of {', '.join(SCENARIOS)}")
        if scenario not in self.scenarios:
            raise ConfigError(
                f"{self.title} cannot serve the {scenario}-incremental scenario: {self.refusal}"
            )
        check_task_heads(scenario, ways)
        dim = math.prod(feature_shape(self.backbone, f"{self.title}'s heads"))
        if scenario == "task":
            sizes = list(ways)
        elif scenario == "class":
            sizes = [sum(ways)]
        else:
            if len(set(ways)) != 1:
                raise ConfigError(
                    f"a domain sequence has the same classes in every task, got {ways}"
                )
            sizes = [ways[0]]
        self.scenario = scenario
        self.heads = nn.ModuleList(nn.Linear(dim, n) for n in sizes)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits [n, outputs] of images x [n, C, H, W]; `task` picks the head of a
        task-incremental learner (and is ignored otherwise)."""
        z = self.backbone(x).flatten(1)
        if self.scenario == "task":
            if task is None:
                raise ConfigError("a task-incremental learner needs the task id to predict")
            return self.heads[task](z)
        return self.heads[0](z)

    # -- how mode=continual trains a task (runners/continual.py) ---------------------------
    def first_phase(self, task: int) -> Phase:
        """The first stage of training on task `task`."""
        return Phase()

    def next_phase(
        self, phase: Phase, task: int, x: torch.Tensor, y: torch.Tensor, loss: float
    ) -> Phase | None:
        """After `phase` (mean training loss `loss`; x, y the task's training images and
        labels): the next phase, or None when the task's training is done. May change the
        network (DEN grows and splits units here)."""
        return None

    def phase_parameters(self, phase: Phase):
        """The weights the phase's optimizer updates."""
        return self.parameters()

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, task: int, phase: Phase | None = None
    ) -> torch.Tensor:
        """The training loss on a mini-batch of task `task`: cross-entropy plus penalty()."""
        return F.cross_entropy(self(x, task), y) + self.penalty()

    def after_update(self, phase: Phase, task: int, lr: float) -> None:
        """Called after every optimizer step, whose learning rate was `lr` (DEN puts the
        weights the phase does not train back, and takes its proximal steps)."""

    def describe(self) -> dict:
        """Figures about the learner logged after every task (e.g. DEN's network size)."""
        return {}

    def penalty(self) -> torch.Tensor:
        """What protects earlier tasks (none for plain fine-tuning)."""
        return torch.zeros((), device=next(self.parameters()).device)

    def end_task(self, task: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called after training on task `task` with its training images x and labels y."""


class FineTune(ContinualLearner):
    """Plain sequential training: each task's data in turn, no protection of the others."""

    title = "fine-tuning"


class Joint(ContinualLearner):
    """Every task's training images at once (interleaved mini-batches): not continual, the
    reference that sequential learners are measured against. mode=continual trains it once,
    after the last task arrives, so only R's last row exists."""

    title = "joint training"
    joint = True


class EWC(ContinualLearner):
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

    After task k, the weights theta*_k and the diagonal of the Fisher information F_k of the
    model at theta*_k on task k's training images are kept. Training on a later task adds

        penalty(theta) = lambda / 2 * sum_k sum_j F_k,j (theta_j - theta*_k,j)^2   (paper eq. 3,
                                                                           one term per task)

    online=True keeps one running Fisher and one anchor instead (Schwarz et al., "Progress &
    Compress", ICML 2018): F <- gamma F + F_k, theta* <- theta*_k, so memory does not grow
    with the number of tasks.

    The Fisher is the true Fisher, computed exactly: for each training image x,
    E_{y ~ p_theta(y|x)} [(d log p_theta(y|x) / d theta)^2] = sum_y p(y|x) (d log p(y|x))^2,
    averaged over the images (the model's own predictive distribution, not the labels: the
    empirical Fisher would use the true label only). Per-example gradients come from
    torch.func (vmap of jacrev), `fisher_batch` images at a time, in eval mode (batch norm
    on its running statistics: one image has no batch statistics). Only the weights shared
    by every task (all but the heads of other tasks) carry the penalty: a task-incremental
    head is trained on its own task only.
    """

    title = "EWC"

    def __init__(
        self,
        backbone: nn.Module,
        lam: NonNegativeFloat = 100.0,
        online: bool = False,
        gamma: Probability = 1.0,
        fisher_samples: int | None = 1000,
        fisher_batch: int = 16,
    ):
        super().__init__(backbone)
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not lam >= 0:
            raise ConfigError(f"algo.lam (EWC's strength lambda) must be >= 0, got {lam!r}")
        if not 0 <= gamma <= 1:
            raise ConfigError(
                f"algo.gamma (online EWC's Fisher decay) must be in [0, 1], got {gamma!r}"
            )
        if fisher_samples is not None and fisher_samples < 1:
            raise ConfigError(
                f"algo.fisher_samples must be positive or null, got {fisher_samples!r}"
            )
        self.lam, self.online, self.gamma = float(lam), bool(online), float(gamma)
        self.fisher_samples, self.fisher_batch = fisher_samples, int(fisher_batch)
        # one (Fisher, anchor) pair per finished task (online: at most one), name -> tensor
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []

    def penalized(self) -> dict[str, nn.Parameter]:
        """The weights the penalty covers: every weight but the task heads (task scenario)."""
        return {
            n: p
            for n, p in self.named_parameters()
            if p.requires_grad and not (self.scenario == "task" and n.startswith("heads."))
        }

    def penalty(self) -> torch.Tensor:
        params = self.penalized()
        total = torch.zeros((), device=next(self.parameters()).device)
        for fisher, anchor in zip(self.fishers, self.anchors):
            for n, f in fisher.items():
                total = total + (f * (params[n] - anchor[n]).pow(2)).sum()
        return 0.5 * self.lam * total

    def fisher(self, x: torch.Tensor, task: int) -> dict[str, torch.Tensor]:
        """The diagonal true Fisher of the penalized weights on images x (see the class)."""
        params = {n: p.detach() for n, p in self.penalized().items()}
        frozen = {n: p.detach() for n, p in self.named_parameters() if n not in params}
        buffers = dict(self.named_buffers())

        def log_probs(p, xi):
            out = functional_call(self, {**frozen, **p, **buffers}, (xi[None], task))
            return F.log_softmax(out.float(), -1)[0]  # [outputs]

        per_example = vmap(jacrev(log_probs), in_dims=(None, 0))
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for chunk in x.split(self.fisher_batch):
                probs = log_probs_of(self, chunk, task).exp()  # [b, outputs]
                jac = per_example(params, chunk)  # name -> [b, outputs, *shape]
                for n, j in jac.items():
                    w = probs.view(*probs.shape, *([1] * (j.dim() - 2)))
                    total[n] += (w * j.pow(2)).sum((0, 1))
        self.train(was_training)
        return {n: t / len(x) for n, t in total.items()}

    def end_task(self, task: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.fisher_samples is not None and len(x) > self.fisher_samples:
            g = torch.Generator().manual_seed(task)  # the same images on a resumed run
            x = x[torch.randperm(len(x), generator=g)[: self.fisher_samples].to(x.device)]
        fisher = self.fisher(x, task)
        anchor = {n: p.detach().clone() for n, p in self.penalized().items()}
        if self.online and self.fishers:
            fisher = {n: self.gamma * self.fishers[0][n] + f for n, f in fisher.items()}
            self.fishers, self.anchors = [fisher], [anchor]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)

    # the Fishers and anchors travel in the state dict (tensors only: weights_only loads)
    def get_extra_state(self) -> dict:
        return {"fishers": self.fishers, "anchors": self.anchors}

    def set_extra_state(self, state: dict) -> None:
        device = next(self.parameters()).device  # a checkpoint loads onto the CPU
        self.fishers = [{n: v.to(device) for n, v in f.items()} for f in state["fishers"]]
        self.anchors = [{n: v.to(device) for n, v in a.items()} for a in state["anchors"]]


def check_task_heads(scenario: str, ways: list[int]) -> None:
    """A task head over one class is always right: refuse it rather than report 100%."""
    if scenario == "task" and min(ways) < 2:
        raise ConfigError(
            "a task-incremental task of one class is trivially right (its head has one "
            "output): use continual.classes_per_task >= 2, or continual.scenario=class for a "
            "stream of single classes"
        )


def log_probs_of(model: nn.Module, x: torch.Tensor, task: int) -> torch.Tensor:
    return F.log_softmax(model(x, task).float(), -1)
