"""Baseline and Baseline++: pretrain on all training classes, fine-tune a new head per task."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.episodes import Episodes
from metarun.data.params import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from metarun.errors import ConfigError

from .base import MetaLearner, embed_tasks, feature_shape, infer_way, positive_ints

CLASSIFIERS = ("linear", "cosine")


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(feature, class weight): [..., n, D] x [..., way, D] -> [..., n, way]."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)


def paper_scale(num_classes: int) -> float:
    """Baseline++'s cosine scale when algo.scale is null: 2 for up to 200 classes, else 10
    (the setting of the authors' released code)."""
    return 2.0 if num_classes <= 200 else 10.0


class Baseline(MetaLearner):
    """Baseline and Baseline++ of Chen, Liu, Kira, Wang, Huang, "A Closer Look at Few-shot
    Classification" (ICLR 2019).

    Training: the backbone and a classifier over all `num_classes` training classes learn by
    cross-entropy on ordinary mini-batches of images (`trains_on = "images"`: the trainer
    draws trainer.meta_batch images per step, uniformly over all images, and labels each by
    the global class id its Episodes carry). classifier="linear" is Baseline (a linear
    layer); classifier="cosine" is Baseline++ (logits are `scale` times the cosine similarity
    of the feature and a learned weight vector per class, no bias).

    Testing (`predict`): the backbone is frozen (eval mode: batch-norm running statistics),
    and a new head of the same kind is fitted to each task's support features by SGD, as in
    the paper: `finetune_epochs` passes over the support set in mini-batches of
    `finetune_batch`, learning rate `finetune_lr`, momentum 0.9, dampening 0.9, weight decay
    0.001 (paper: 100 passes, batches of 4, 0.01). All tasks of a batch are fitted at once
    (one head per task, stacked). The new head's initial weights and the order of the support
    images come from a generator seeded with `finetune_seed` at every call and are shared by
    the tasks of a call, so a task's score does not depend on which other tasks share its
    batch.

    Departures: the head is fitted on the features of the unaugmented support images (the
    paper's test-time setting); training images are augmented only with trainer.augment.
    """

    trains_on = "images"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: PositiveInt | None = None,
        classifier: str = "linear",
        scale: PositiveFloat | None = None,
        finetune_epochs: PositiveInt = 100,
        finetune_batch: PositiveInt = 4,
        finetune_lr: PositiveFloat = 0.01,
        finetune_momentum: Fraction = 0.9,
        finetune_dampening: Fraction = 0.9,
        finetune_weight_decay: NonNegativeFloat = 0.001,
        finetune_seed: NonNegativeInt = 0,
    ):
        super().__init__()
        if num_classes is None:
            raise ConfigError(
                "algo.num_classes is unset: the trainer passes the number of training "
                "classes; outside the trainer pass the number of classes the classifier covers"
            )
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"algo.classifier={classifier!r}; choose one of {CLASSIFIERS}")
        positive_ints(
            num_classes=num_classes, finetune_epochs=finetune_epochs, finetune_batch=finetune_batch
        )
        if not finetune_lr > 0:
            raise ConfigError(f"algo.finetune_lr must be positive, got {finetune_lr!r}")
        if scale is not None and not scale > 0:
            raise ConfigError(f"algo.scale must be positive or null, got {scale!r}")
        self.backbone = backbone
        self.dim = math.prod(feature_shape(backbone, "Baseline's classifier"))
        self.num_classes, self.classifier = num_classes, classifier
        self.scale = float(scale) if scale is not None else paper_scale(num_classes)
        self.head = nn.Linear(self.dim, num_classes, bias=classifier == "linear")
        self.finetune = dict(
            epochs=finetune_epochs,
            batch=finetune_batch,
            lr=float(finetune_lr),
            momentum=float(finetune_momentum),
            dampening=float(finetune_dampening),
            weight_decay=float(finetune_weight_decay),
            seed=int(finetune_seed),
        )

    def logits(self, features: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """[..., n, D] features against [..., way, D] class weights -> [..., n, way]."""
        if self.classifier == "cosine":
            return cosine_logits(features, weight, self.scale)
        return features @ weight.transpose(-1, -2) + bias[..., None, :]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(1)

    def meta_train_step(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        """One mini-batch of images (see ImageBatchSampler): cross-entropy over all classes."""
        self.train()
        x = episodes.support_x.flatten(0, 1)
        y = episodes.classes.gather(1, episodes.support_y).flatten()
        with self.autocast():
            logits = self.logits(self.embed(x), self.head.weight, self.head.bias)
            loss = F.cross_entropy(logits.float(), y)
        self.outer_update(loss)
        return {"loss": loss.detach(), "acc": (logits.argmax(-1) == y).float().detach()}

    def head_gradients(self, z, y, weight, bias):
        """Gradients of the tasks' mean cross-entropy on (z [B, b, D], y [B, b]) with respect
        to their heads, written out (a few matrix products; the fine-tuning loop takes
        hundreds of steps per task, where autograd's bookkeeping would cost more than the
        arithmetic). Checked against autograd in tests/test_baseline.py."""
        logits = self.logits(z, weight, bias)
        delta = logits.softmax(-1) - F.one_hot(y, logits.shape[-1]).to(logits)  # [B, b, way]
        delta = delta / z.shape[1]
        if self.classifier == "linear":
            return delta.transpose(-1, -2) @ z, delta.sum(1)
        # logits = scale * zn @ wn^T with zn, wn the unit-length rows of z and weight
        norm = weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        wn = weight / norm
        d_wn = self.scale * delta.transpose(-1, -2) @ F.normalize(z, dim=-1)  # [B, way, D]
        return (d_wn - wn * (wn * d_wn).sum(-1, keepdim=True)) / norm, None

    def fit_heads(self, features: torch.Tensor, labels: torch.Tensor, way: int):
        """New heads for B tasks at once: features [B, n, D], labels [B, n] -> weight
        [B, way, D] (and bias [B, way] for the linear head; None for the cosine one).

        SGD as torch.optim.SGD takes it (weight decay added to the gradient; the momentum
        buffer starts at the first gradient, then buf = momentum * buf + (1 - dampening) * g);
        each task's head follows its own mean loss."""
        cfg, (b, n, d) = self.finetune, features.shape
        gen = torch.Generator().manual_seed(cfg["seed"])
        bound = 1.0 / math.sqrt(d)  # nn.Linear's default initialisation
        weight = ((torch.rand(way, d, generator=gen) * 2 - 1) * bound).to(features)
        params = [weight.expand(b, way, d).clone()]
        if self.classifier == "linear":
            bias = ((torch.rand(way, generator=gen) * 2 - 1) * bound).to(features)
            params.append(bias.expand(b, way).clone())
        buffers = None
        lr, mom, damp, wd = (cfg[k] for k in ("lr", "momentum", "dampening", "weight_decay"))
        for _ in range(cfg["epochs"]):
            order = torch.randperm(n, generator=gen).to(features.device)
            for chunk in order.split(cfg["batch"]):
                grads = self.head_gradients(
                    features[:, chunk], labels[:, chunk], params[0], params[-1]
                )
                grads = [g + wd * p for g, p in zip(grads, params)]
                if buffers is None:
                    buffers = grads
                else:
                    buffers = [mom * m + (1 - damp) * g for m, g in zip(buffers, grads)]
                params = [p - lr * m for p, m in zip(params, buffers)]
        return params[0], params[1] if len(params) > 1 else None

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        with torch.no_grad():
            with self.autocast():
                zs, zq = embed_tasks(self.backbone, support_x, query_x)
            weight, bias = self.fit_heads(zs.float(), support_y, way)
            return self.logits(zq.float(), weight, bias)
