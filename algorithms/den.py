"""Dynamically Expandable Networks (Yoon, Yang, Lee & Hwang, "Lifelong Learning with
Dynamically Expandable Networks", ICLR 2018), for mode=continual.

A fully connected network on the backbone's features (backbone=pixels: the raw pixels, as
in the paper) whose hidden units carry timestamps, and one output head per task. Task t
(t = 0, 1, ...) is trained in the paper's stages, each a Phase of runners/continual.py:

- task 0, phase "sparse" (paper Eq. 2): every weight, with an L1 penalty mu_1 ||W||_1.
- task t > 0:
  1. "head" (selective retraining, first half, Alg. 2): only the new head, with L1.
     The subnetwork S is then found by a breadth-first search from the head down: a top
     unit is in S when a non-zero head weight leaves it, a unit below when a non-zero
     weight leads from it into a unit of S.
  2. "retrain" (selective retraining, Eq. 3): only the weights between units of S (and
     from every input into S's first layer), their biases and the head, with L1 and an
     L2 pull `pull` * ||W_S - W_S^{t-1}||^2. Everything else is put back after every update.
  3. "expand" (dynamic expansion, Alg. 3), only when the task's training loss after (2)
     is above tau: k new units per hidden layer, timestamp t; only their weights (in and
     out) and the head train, with L1 and the group-sparse penalty
     gamma sum_g ||W_g||_2, a group being a new unit's incoming weights (Eq. 5). Units whose
     group is then zero are removed: the network keeps only the units the task needed.
  4. split/duplication (Alg. 4): for every unit older than t, the drift
     rho_i = ||w_i^t - w_i^{t-1}||_2 of its incoming weights. A unit with rho_i > sigma is
     duplicated: the copy (timestamp t) takes the drifted weights, the original gets its
     weights of task t-1 back. Then phase "split" retrains the copies' weights and the head.
- Timestamped inference: for task t, units with a timestamp above t are masked (output
  zero), so units added later never change an earlier task's output; an original restored
  by a split serves the earlier tasks as they were.

The sparse penalties are applied as proximal steps after each optimizer update, with the
optimizer's learning rate as step size: soft-thresholding for L1, group soft-thresholding
for the group lasso. They set weights (and groups) exactly to zero, which the subnetwork
search and the pruning need; for SGD this is proximal gradient descent, for Adam (the
default optimizer) an approximation of it.

Simplifications, against the paper:
- The paper's selective retraining uses an L2 penalty on W_S and, before the split, trains
  once more with the pull toward W^{t-1} (its Eq. 4); here the pull is part of selective
  retraining, and the drift is measured after it (and after the expansion): one pass less
  per task.
- The paper retrains the whole network after a split; here only the copies' weights and
  the head train, the rest stays as it was (the originals keep their restored weights).
- Unit selection, expansion and split act on the hidden layers only (the heads are per
  task), and each unit's drift counts its incoming weights from the units that existed at
  task t-1.
- Task-incremental only: the task id picks the timestamp and the head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.params import NonNegativeFloat, PositiveInt
from metarun.errors import ConfigError

from .base import feature_shape
from .continual import ContinualLearner, Phase, check_task_heads

REFUSAL = (
    "its timestamped inference picks each task's units and output head by the task id, "
    "which the class- and domain-incremental scenarios do not give at test time; use "
    "continual.scenario=task"
)


class DEN(ContinualLearner):
    """See the module docstring."""

    title = "DEN"
    scenarios = ("task",)
    refusal = REFUSAL

    def __init__(
        self,
        backbone: nn.Module,
        hidden: tuple[PositiveInt, ...] = (312, 128),
        l1: NonNegativeFloat = 0.01,
        pull: NonNegativeFloat = 0.1,
        group: NonNegativeFloat = 1.0,
        tau: NonNegativeFloat = 0.05,
        k: PositiveInt = 10,
        sigma: NonNegativeFloat = 0.2,
    ):
        super().__init__(backbone)
        if any(p.requires_grad for p in backbone.parameters()):
            raise ConfigError(
                "DEN grows fully connected layers on fixed features; this backbone has "
                "trainable weights that no timestamp would protect: use backbone=pixels"
            )
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1:
            raise ConfigError(f"algo.hidden must be positive layer sizes, got {hidden}")
        for name, value in (("l1", l1), ("pull", pull), ("group", group), ("tau", tau)):
            if not value >= 0:
                raise ConfigError(f"algo.{name} must be >= 0, got {value!r}")
        if not sigma >= 0 or k < 1:
            raise ConfigError(f"algo.sigma must be >= 0 and algo.k >= 1, got {sigma}, {k}")
        self.inputs = math.prod(feature_shape(backbone, "DEN"))
        self.l1, self.pull, self.group = float(l1), float(pull), float(group)
        self.tau, self.k, self.sigma = float(tau), int(k), float(sigma)
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for layer, (a, b) in enumerate(zip((self.inputs, *hidden), hidden)):
            w, bias = linear_init(b, a)
            self.weights.append(w)
            self.biases.append(bias)
            self.register_buffer(f"stamp{layer}", torch.zeros(b, dtype=torch.long))
        self.head_w, self.head_b = nn.ParameterList(), nn.ParameterList()
        # the task in progress: weights at its start, the entries each phase trains, and
        # the weights the phase keeps (see phase_masks); empty between tasks
        self.previous: dict[str, torch.Tensor] = {}
        self.trainable: dict[str, torch.Tensor] = {}
        self.kept: dict[str, torch.Tensor] = {}
        self.history: list[list[int]] = []  # units per layer after every task

    # -- structure -----------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return len(self.weights)

    def stamp(self, layer: int) -> torch.Tensor:
        return getattr(self, f"stamp{layer}")

    def sizes(self) -> list[int]:
        return [w.shape[0] for w in self.weights]

    def setup(self, scenario: str, ways: list[int]) -> None:
        if scenario != "task":
            raise ConfigError(f"DEN cannot serve the {scenario}-incremental scenario: {REFUSAL}")
        check_task_heads(scenario, ways)
        self.scenario = scenario
        top = self.sizes()[-1]
        self.head_w, self.head_b = nn.ParameterList(), nn.ParameterList()
        for way in ways:
            w, b = linear_init(way, top)
            self.head_w.append(w)
            self.head_b.append(b)

    def hidden(self, x: torch.Tensor, task: int) -> torch.Tensor:
        h = self.backbone(x).flatten(1)
        for layer in range(self.layers):
            h = F.relu(F.linear(h, self.weights[layer], self.biases[layer]))
            h = h * (self.stamp(layer) <= task).to(h.dtype)  # timestamped inference
        return h

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        if task is None:
            raise ConfigError("DEN needs the task id to predict (task-incremental)")
        return F.linear(self.hidden(x, task), self.head_w[task], self.head_b[task])

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by name: w<l>, b<l> (hidden layers), hw<t>, hb<t> (heads)."""
        out = {}
        for layer in range(self.layers):
            out[f"w{layer}"], out[f"b{layer}"] = self.weights[layer], self.biases[layer]
        for t in range(len(self.head_w)):
            out[f"hw{t}"], out[f"hb{t}"] = self.head_w[t], self.head_b[t]
        return out

    def add_units(
        self,
        layer: int,
        rows: torch.Tensor,
        bias: torch.Tensor,
        task: int,
        columns: torch.Tensor | None = None,
    ) -> None:
        """Append units to hidden layer `layer` with incoming `rows` [n, in], `bias` [n] and
        timestamp `task`. Their outgoing weights: `columns` [out, n] into the layer above
        (None: random as nn.Linear's); into the heads, `columns` [sum of ways, n] for the
        task's head (None: random) and zero into every other head, which never reads a
        unit of a later task."""
        n = len(rows)
        self.weights[layer] = grown(self.weights[layer], rows, dim=0)
        self.biases[layer] = grown(self.biases[layer], bias, dim=0)
        stamp = torch.full((n,), task, dtype=torch.long, device=rows.device)
        setattr(self, f"stamp{layer}", torch.cat([self.stamp(layer), stamp]))
        if layer + 1 < self.layers:
            above = self.weights[layer + 1]
            new = columns if columns is not None else linear_init(above.shape[0], n)[0]
            self.weights[layer + 1] = grown(above, new, dim=1)
            return
        for t in range(len(self.head_w)):
            head = self.head_w[t]
            if t != task:
                new = torch.zeros(head.shape[0], n)
            elif columns is not None:
                new = columns
            else:
                new = linear_init(head.shape[0], n)[0]
            self.head_w[t] = grown(head, new, dim=1)

    def remove_units(self, layer: int, keep: torch.Tensor) -> None:
        """Keep only the units of hidden layer `layer` where `keep` (bool) is true."""
        self.weights[layer] = nn.Parameter(self.weights[layer].detach()[keep].clone())
        self.biases[layer] = nn.Parameter(self.biases[layer].detach()[keep].clone())
        setattr(self, f"stamp{layer}", self.stamp(layer)[keep].clone())
        if layer + 1 < self.layers:
            above = self.weights[layer + 1].detach()
            self.weights[layer + 1] = nn.Parameter(above[:, keep].clone())
        else:
            for t in range(len(self.head_w)):
                self.head_w[t] = nn.Parameter(self.head_w[t].detach()[:, keep].clone())

    # -- the stages ----------------------------------------------------------------------
    def first_phase(self, task: int) -> Phase:
        self.previous = {n: p.detach().clone() for n, p in self.named_tensors().items()}
        if task == 0:
            return self.begin("sparse", task, self.everything(task))
        return self.begin("head", task, self.only_head(task))

    def next_phase(self, phase, task, x, y, loss) -> Phase | None:
        if phase.name == "head":
            return self.begin("retrain", task, self.subnetwork(task))
        if phase.name == "retrain":
            if self.task_loss(x, y, task) > self.tau:
                added = self.expand(task)
                return self.begin("expand", task, self.units_of(task, added))
            return self.split_or_done(task)
        if phase.name == "expand":
            self.prune(task)
            return self.split_or_done(task)
        return self.done()  # "sparse" (task 0) and "split"

    def split_or_done(self, task: int) -> Phase | None:
        split = self.split(task)
        if any(len(s) for s in split):
            return self.begin("split", task, self.units_of(task, split))
        return self.done()

    def done(self) -> None:
        self.trainable, self.kept = {}, {}
        return None

    def begin(self, name: str, task: int, trainable: dict[str, torch.Tensor]) -> Phase:
        """A phase training the entries of `trainable` (name -> bool mask); every other
        entry is kept as it is now."""
        self.trainable = trainable
        tensors = self.named_tensors()
        self.kept = {n: tensors[n].detach().clone() for n in trainable}
        return Phase(name)

    def everything(self, task: int) -> dict[str, torch.Tensor]:
        """Every hidden weight and bias, and the task's head (task 0's sparse training)."""
        tensors = self.named_tensors()
        names = [n for n in tensors if n[0] in "wb"] + [f"hw{task}", f"hb{task}"]
        return {n: torch.ones_like(tensors[n], dtype=torch.bool) for n in names}

    def only_head(self, task: int) -> dict[str, torch.Tensor]:
        """The task's head alone."""
        t = self.named_tensors()
        return {
            f"hw{task}": torch.ones_like(t[f"hw{task}"], dtype=torch.bool),
            f"hb{task}": torch.ones_like(t[f"hb{task}"], dtype=torch.bool),
        }

    def subnetwork(self, task: int) -> dict[str, torch.Tensor]:
        """The units from which a non-zero path leads to the task's head (breadth-first,
        from the top down), and the masks of the weights between them."""
        selected = self.selected(task)
        masks = self.only_head(task)
        for layer in range(self.layers):
            rows = selected[layer]
            cols = (
                selected[layer - 1]
                if layer
                else torch.ones(self.weights[0].shape[1], dtype=torch.bool, device=rows.device)
            )
            masks[f"w{layer}"] = rows[:, None] & cols[None, :]
            masks[f"b{layer}"] = rows.clone()
        return masks

    def selected(self, task: int) -> list[torch.Tensor]:
        """S: per hidden layer, which units reach the task's head by non-zero weights."""
        reach = (self.head_w[task].detach() != 0).any(0)  # top units
        reach &= self.stamp(self.layers - 1) <= task
        out = [reach]
        for layer in range(self.layers - 1, 0, -1):
            w = self.weights[layer].detach()
            below = (w[reach] != 0).any(0) & (self.stamp(layer - 1) <= task)
            out.insert(0, below)
            reach = below
        return out

    def task_loss(self, x: torch.Tensor, y: torch.Tensor, task: int) -> float:
        """The mean cross-entropy on the task's training images (eval mode): the loss that
        decides the expansion."""
        was = self.training
        self.eval()
        with torch.no_grad():
            loss = sum(
                F.cross_entropy(self(xb, task), yb, reduction="sum")
                for xb, yb in zip(x.split(512), y.split(512))
            )
        self.train(was)
        return float(loss) / len(y)

    def expand(self, task: int) -> list[torch.Tensor]:
        """k new units per hidden layer, timestamp `task`; returns their indices."""
        added = []
        for layer in range(self.layers):
            n0 = self.weights[layer].shape[0]
            rows, bias = linear_init(self.k, self.weights[layer].shape[1])
            device = self.weights[layer].device
            self.add_units(layer, rows.to(device), bias.to(device), task)
            added.append(torch.arange(n0, n0 + self.k, device=device))
        return added

    def units_of(self, task: int, units: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masks training `units` (indices per layer, all of timestamp `task`): their
        incoming weights and biases, their outgoing weights (into every unit above: an
        earlier task never reads them, its mask zeroes these units) and the task's head."""
        masks = self.only_head(task)
        for layer in range(self.layers):
            m = torch.zeros_like(self.weights[layer], dtype=torch.bool)
            m[units[layer]] = True
            if layer:
                m[:, units[layer - 1]] = True
            b = torch.zeros_like(self.biases[layer], dtype=torch.bool)
            b[units[layer]] = True
            masks[f"w{layer}"], masks[f"b{layer}"] = m, b
        return masks

    def prune(self, task: int) -> None:
        """Remove the new units whose incoming group the group-sparse penalty zeroed."""
        for layer in range(self.layers):
            dead = self.new_units(layer) & (self.weights[layer].detach().norm(dim=1) == 0)
            if dead.any():
                self.remove_units(layer, ~dead)

    def new_units(self, layer: int) -> torch.Tensor:
        """Which units of the layer were added during the task in progress (bool)."""
        n = torch.arange(self.weights[layer].shape[0], device=self.weights[layer].device)
        return n >= self.previous[f"w{layer}"].shape[0]

    def drift(self, layer: int) -> torch.Tensor:
        """rho_i: how far each unit that existed at the task's start moved (incoming
        weights from the units that existed then, and its bias)."""
        old = self.previous[f"w{layer}"]
        now = self.weights[layer].detach()[: old.shape[0], : old.shape[1]]
        return (now - old).norm(dim=1)

    def split(self, task: int) -> list[torch.Tensor]:
        """Duplicate every unit that drifted more than sigma: the copy (timestamp `task`)
        keeps the drifted weights and the original's outgoing weights, the original gets
        its weights of the task's start back. Returns the copies' indices per layer."""
        copies = []
        for layer in range(self.layers):
            old = self.previous[f"w{layer}"]
            rho = self.drift(layer)
            older = self.stamp(layer)[: len(rho)] < task
            moved = ((rho > self.sigma) & older).nonzero().flatten()
            n0 = self.weights[layer].shape[0]
            if len(moved):
                rows = self.weights[layer].detach()[moved].clone()
                bias = self.biases[layer].detach()[moved].clone()
                if layer + 1 < self.layers:
                    out = self.weights[layer + 1].detach()[:, moved].clone()
                else:
                    out = self.head_w[task].detach()[:, moved].clone()
                with torch.no_grad():
                    self.weights[layer][moved, : old.shape[1]] = old[moved]
                    self.biases[layer][moved] = self.previous[f"b{layer}"][moved]
                self.add_units(layer, rows, bias, task, columns=out)
            copies.append(torch.arange(n0, n0 + len(moved), device=self.weights[layer].device))
        return copies

    # -- training ------------------------------------------------------------------------
    def phase_parameters(self, phase: Phase):
        tensors = self.named_tensors()
        return [tensors[n] for n in sorted(self.trainable)]

    def loss(self, x, y, task, phase=None):
        loss = F.cross_entropy(self(x, task), y)
        if phase is not None and phase.name == "retrain" and self.pull:
            tensors = self.named_tensors()
            for n, old in self.previous.items():
                if n[0] == "w" and n in self.trainable:
                    now = tensors[n][: old.shape[0], : old.shape[1]]
                    mask = self.trainable[n][: old.shape[0], : old.shape[1]]
                    loss = loss + self.pull * ((now - old).pow(2) * mask).sum()
        return loss

    @torch.no_grad()
    def after_update(self, phase: Phase, task: int, lr: float) -> None:
        tensors = self.named_tensors()
        for n, mask in self.trainable.items():  # entries outside the phase: as they were
            p = tensors[n]
            p.copy_(torch.where(mask, p, self.kept[n]))
        eta = lr  # the proximal steps' size
        for n, mask in self.trainable.items():
            p = tensors[n]
            if n[0] == "w" and self.l1:  # soft-thresholding: the proximal step of L1
                shrunk = p.sign() * (p.abs() - eta * self.l1).clamp_min(0)
                p.copy_(torch.where(mask, shrunk, p))
            if n.startswith("hw") and phase.name == "head" and self.l1:
                p.copy_(p.sign() * (p.abs() - eta * self.l1).clamp_min(0))
        if phase.name == "expand" and self.group:  # group soft-thresholding of new units
            for layer in range(self.layers):
                new = self.new_units(layer)
                if not new.any():
                    continue
                w = tensors[f"w{layer}"]
                norm = w[new].norm(dim=1, keepdim=True)
                scale = (1 - eta * self.group / norm.clamp_min(1e-12)).clamp_min(0)
                w[new] = w[new] * scale

    def end_task(self, task, x, y) -> None:
        self.previous, self.trainable, self.kept = {}, {}, {}
        self.history.append(self.sizes())

    def describe(self) -> dict:
        sizes = self.sizes()
        nonzero = sum(int((w != 0).sum()) for w in self.weights)
        return {
            "units": sum(sizes),
            **{f"units_layer{i}": n for i, n in enumerate(sizes)},
            "nonzero_weights": nonzero,
        }

    # -- checkpoints: the structure travels in the state dict ----------------------------
    def get_extra_state(self) -> dict:
        return {
            "previous": self.previous,
            "trainable": self.trainable,
            "kept": self.kept,
            "history": self.history,
        }

    def set_extra_state(self, state: dict) -> None:
        device = self.weights[0].device
        self.previous, self.trainable, self.kept = (
            {n: v.to(device) for n, v in state[key].items()}
            for key in ("previous", "trainable", "kept")
        )
        self.history = [list(h) for h in state["history"]]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Take the checkpoint's shapes first: the network may have grown since it began."""
        for layer in range(self.layers):
            for name, plist in (
                (f"weights.{layer}", self.weights),
                (f"biases.{layer}", self.biases),
            ):
                if name in state_dict and state_dict[name].shape != plist[layer].shape:
                    plist[layer] = nn.Parameter(
                        torch.empty_like(state_dict[name], device=plist[layer].device)
                    )
            key = f"stamp{layer}"
            if key in state_dict:
                setattr(
                    self, key, torch.empty_like(state_dict[key], device=self.stamp(layer).device)
                )
        for t in range(len(self.head_w)):
            key = f"head_w.{t}"
            if key in state_dict and state_dict[key].shape != self.head_w[t].shape:
                self.head_w[t] = nn.Parameter(
                    torch.empty_like(state_dict[key], device=self.head_w[t].device)
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def linear_init(out: int, inp: int) -> tuple[nn.Parameter, nn.Parameter]:
    """nn.Linear's initialization (uniform in +-1/sqrt(in))."""
    layer = nn.Linear(inp, out)
    return nn.Parameter(layer.weight.detach().clone()), nn.Parameter(layer.bias.detach().clone())


def grown(p: torch.Tensor, extra: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.cat([p.detach(), extra.detach().to(p)], dim=dim))
