"""The learner interface every algorithm implements.

A learner adapts to each task's support set and scores the queries
(`predict`), and owns its outer update (`meta_train_step`). The trainer only
ever calls these, so a new algorithm is one file and one yaml.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.episodes import Episodes
from metarun.data.errors import ConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MetaLearner(nn.Module):
    """Base class: subclasses implement `predict`; most keep the default step."""

    optimizer: torch.optim.Optimizer | None = None

    def __init__(self) -> None:
        super().__init__()
        self.amp_dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None

    # -- the contract -------------------------------------------------------
    def predict(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        way: int | None = None,
    ) -> torch.Tensor:
        """Adapt to each task's support set, return query logits [B, n_query, way]."""
        raise NotImplementedError

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class confidence in [0, 1] from predict's output (for mode=predict): softmax."""
        return logits.float().softmax(-1)

    def loss(self, logits: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all queries of all tasks."""
        return F.cross_entropy(logits.flatten(0, 1).float(), query_y.flatten())

    def meta_train_step(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        """One outer update: loss on predict(...) + optimizer step.

        Returns detached scalar tensors; the trainer reads them only when it
        logs, so a GPU step does not wait on a host sync.
        """
        self.train()
        with self.autocast():
            logits = self.predict(
                episodes.support_x, episodes.support_y, episodes.query_x, episodes.way
            )
            loss = self.loss(logits, episodes.query_y)
        self.optimizer_step(loss)
        return {"loss": loss.detach(), "acc": accuracy(logits, episodes.query_y)}

    # -- shared machinery ---------------------------------------------------
    def configure_optimizer(self, lr: float) -> torch.optim.Optimizer:
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        return self.optimizer

    def set_precision(self, amp: str) -> None:
        if amp not in AMP_DTYPES:
            raise ConfigError(f"trainer.amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        self.amp_dtype = AMP_DTYPES[amp]
        # fp16 gradients underflow without loss scaling; bf16 does not need it
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions, per task: [B] from logits [B, n, way] and y [B, n]."""
    return (logits.argmax(-1) == y).float().mean(-1).detach()


def embed_tasks(
    backbone: nn.Module, support_x: torch.Tensor, query_x: torch.Tensor, flatten: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of every task in one backbone call.

    [B, ns, C, H, W] and [B, nq, C, H, W] -> [B, ns, D] and [B, nq, D] (flatten=True: feature
    maps become vectors) or [B, ns, *S] and [B, nq, *S] (flatten=False: the backbone's shape).
    """
    b, n_support, n_query = support_x.shape[0], support_x.shape[1], query_x.shape[1]
    z = backbone(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))  # [B*(ns+nq), *S]
    if flatten:
        z = z.flatten(1)
    return z[: b * n_support].unflatten(0, (b, n_support)), z[b * n_support :].unflatten(
        0, (b, n_query)
    )


def feature_shape(backbone: nn.Module, learner: str) -> tuple[int, ...]:
    """The per-image output shape a backbone announces, for learners that size layers by it."""
    shape = getattr(backbone, "feature_shape", None)
    if shape is None:
        raise ConfigError(
            f"{learner} sizes its layers from backbone.feature_shape, which this backbone lacks; "
            "use a backbone from metarun.algorithms.backbones (e.g. backbone=conv4)"
        )
    return tuple(shape)


def infer_way(support_y: torch.Tensor, way: int | None) -> int:
    """`way` when given; else from the labels (a host sync, so callers pass it)."""
    return int(support_y.max()) + 1 if way is None else way


def positive_ints(**values) -> None:
    """Raise a ConfigError naming `algo.<key>` unless every value is an integer >= 1."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"algo.{key} must be a positive integer, got {value!r}")


def use_batch_statistics(backbone: nn.Module) -> None:
    """Make every batch-norm layer normalise with the current batch's statistics, always,
    and keep no running statistics (the transductive setting of MAML and its relatives)."""
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


class HeadLearner(MetaLearner):
    """A learner whose model is the backbone plus a linear head with `way` outputs.

    The optimization-based learners adapt this model per task. Tasks with fewer
    classes than the head use its first outputs; more classes are refused.
    """

    title = "this"  # how error messages name the learner

    def __init__(self, backbone: nn.Module, way: int, batch_statistics: bool) -> None:
        super().__init__()
        positive_ints(way=way)
        shape = feature_shape(backbone, f"{self.title}'s head")
        self.backbone = backbone
        self.head = nn.Linear(math.prod(shape), way)
        self.way = way
        if batch_statistics:
            use_batch_statistics(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, way] with the module's own (initial) weights."""
        return self.head(self.backbone(x).flatten(1))

    def check_way(self, way: int) -> None:
        if way > self.way:
            raise ConfigError(
                f"this {self.title} model has a {self.way}-way head and cannot score {way}-way "
                f"tasks; test with way <= {self.way}, or train with way={way}"
            )
