"""OML: meta-learned representations for continual learning (Javed & White, "Meta-Learning
Representations for Continual Learning", NeurIPS 2019).

The network is a representation (RLN: the backbone) and a prediction network (PLN: here one
linear layer) on its features. OML meta-trains the RLN so that the PLN, trained online by
SGD one example at a time on a stream of classes, learns the new classes without forgetting
the earlier ones. Two learners:

- `OMLMeta` (algo=oml_meta, mode=train: the existing runner, data and episodes): per task, a
  zero PLN over the episode's classes is trained by `inner_lr`-SGD on the support images
  one at a time, class after class (the trajectory); the loss of the trained PLN on the
  task's queries (held-out images of every class of the trajectory: what it still knows of
  the first class after the last) is backpropagated through the whole trajectory into the
  RLN (second order; first_order=True cuts it).
- `OML` (algo=oml, mode=continual: the meta-test): the RLN of a checkpoint
  (`representation=`, from algo=oml_meta or from plain classification, algo=baseline: the
  pretrained baseline; mode=continual loads it and hands it to `adopt`) frozen, in eval mode, and a zero PLN trained by the run's optimizer
  (SGD, batch 1, one pass: the stream) on a class-incremental sequence of held-out classes.

Departures from the paper, stated:
- The PLN is one linear layer, and starts from zero in every meta-training task and at
  meta-test (the paper meta-learns a 2-layer PLN and resets its output weights); the RLN is
  metarun's conv4 (the paper: 6 convolutions, 2 of them strided, on 84x84 images).
- The meta-loss is on the trajectory classes' held-out images (the episode's queries); the
  paper adds a batch of random meta-training images (its remember set) to the trajectory.
- Trajectories are the sampler's N-way K-shot episodes (N classes of K images each).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.params import PositiveFloat
from metarun.errors import ConfigError

from .base import MetaLearner, feature_shape, infer_way, supervised_loss
from .continual import ContinualLearner


class OMLMeta(MetaLearner):
    """Meta-training of the representation (see the module docstring)."""

    title = "OML"
    inner_loop = True
    compile_refusal = "its trajectory is many tiny sequential steps; nothing for compile to fuse"

    def __init__(
        self, backbone: nn.Module, inner_lr: PositiveFloat = 0.1, first_order: bool = False
    ):
        super().__init__()
        if not inner_lr > 0:
            raise ConfigError(f"algo.inner_lr must be positive, got {inner_lr!r}")
        self.backbone = backbone
        self.dim = math.prod(feature_shape(backbone, "OML's prediction network"))
        self.inner_lr, self.first_order = float(inner_lr), bool(first_order)

    def trajectory(self, features: torch.Tensor, labels: torch.Tensor, way: int) -> tuple:
        """The PLN (weight [way, dim], bias [way]) after SGD from zero on each (feature,
        label) in turn, class after class in the order of their first appearance. The
        gradient of one example's cross-entropy is written out: (p - onehot(y)) f^T."""
        order = torch.argsort(labels, stable=True)  # class after class, images in order
        w = features.new_zeros(way, features.shape[-1])
        b = features.new_zeros(way)
        onehot = F.one_hot(labels, way).to(features.dtype)
        for i in order.tolist():
            f = features[i]
            if self.first_order:
                f = f.detach()
            err = torch.softmax(F.linear(f, w, b), -1) - onehot[i]
            w = w - self.inner_lr * err[:, None] * f[None, :]
            b = b - self.inner_lr * err
        return w, b

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        out = []
        for sx, sy, qx in zip(support_x, support_y, query_x):
            fs = self.backbone(sx).flatten(1)
            fq = self.backbone(qx).flatten(1)
            w, b = self.trajectory(fs, sy, way)
            out.append(F.linear(fq, w, b))
        return torch.stack(out)

    def loss(self, logits, query_y):
        return supervised_loss(logits.flatten(0, 1), query_y.flatten())


class OML(ContinualLearner):
    """Meta-test: a frozen representation from a checkpoint and a zero linear PLN trained
    online on the stream (see the module docstring). mode=continual with
    optimizer=sgd, continual.batch=1 and continual.epochs=1 is the paper's protocol."""

    title = "OML"

    def __init__(self, backbone: nn.Module, representation: str | None = None):
        if not representation:
            raise ConfigError(
                "algo=oml trains on a frozen representation: set algo.representation to a "
                "checkpoint of algo=oml_meta (meta-trained) or algo=baseline (pretrained "
                "by plain classification)"
            )
        super().__init__(backbone)
        self.representation = str(representation)  # mode=continual loads it: adopt()
        self.adopt(backbone)

    def adopt(self, backbone: nn.Module) -> None:
        """Take `backbone` (the checkpoint's network) as the frozen representation."""
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def setup(self, scenario: str, ways: list[int]) -> None:
        super().setup(scenario, ways)
        for head in self.heads:  # the PLN starts from zero, as in meta-training
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: batch norm keeps its running statistics
        return self

    def phase_parameters(self, phase):
        return self.heads.parameters()
