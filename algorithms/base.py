"""The learner interface every algorithm implements.

A learner adapts to each task's support set and scores the queries
(`predict`), and owns its outer update (`meta_train_step`). The trainer only
ever calls these, so a new algorithm is one file and one yaml.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms import second_order
from metarun.data.episodes import Episodes
from metarun.errors import ConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


NAN_POLICIES = ("stop", "skip", "off")


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval: 1.96 * std / sqrt(n)."""
    values = values.double()
    n = len(values)
    std = float(values.std(unbiased=True)) if n > 1 else 0.0
    return float(values.mean()), 1.96 * std / math.sqrt(n)


class NonFiniteLoss(FloatingPointError):
    """A NaN or inf loss or gradient before an outer update (trainer.nan_policy=stop)."""


class MetaLearner(nn.Module):
    """Base class: subclasses implement `predict`; most keep the default step."""

    optimizer: torch.optim.Optimizer | None = None
    # set by the trainer in a multi-process run (runners/distributed.py): averages .grad
    # over the processes before every outer update
    grad_sync: Callable[[Iterable[nn.Parameter]], None] | None = None
    # trainer.nan_policy: what a NaN or inf loss or gradient does (see outer_update)
    nan_policy: str = "stop"
    # trainer.grad_clip: the largest gradient norm of an outer update (None: no clipping)
    grad_clip: float | None = None
    skipped_updates: int = 0
    # regression (float targets, MSE) needs a model with an output head; metric learners
    # compare classes and are classification-only
    supports_regression = False
    # learners that adapt the network per task with gradient steps (MAML and relatives,
    # Reptile, iMAML): their inner-loop gradients are taken with torch.autograd.grad
    inner_loop = False
    # why trainer.compile=true is refused, for learners where torch.compile does not work
    compile_refusal: str | None = None
    title = "this"  # how error messages name the learner
    # learners with a fixed-size output layer set self.way: tasks with more classes are
    # refused (check_way), fewer use its first outputs
    way: int | None = None

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
        """Mean loss over all queries of all tasks (cross-entropy, or MSE for regression)."""
        return supervised_loss(logits.flatten(0, 1), query_y.flatten())

    def meta_train_step(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        """One outer update: the loss of predict(...) on the queries, then outer_update.

        Returns detached scalar tensors; the trainer reads them only when it
        logs, so a GPU step does not wait on a host sync.
        """
        self.train()
        with self.autocast():
            logits = self.predict(
                episodes.support_x, episodes.support_y, episodes.query_x, episodes.way
            )
            loss = self.loss(logits, episodes.query_y)
        self.outer_update(loss)
        return {
            "loss": loss.detach(),
            metric_name(episodes.query_y): task_scores(logits, episodes.query_y),
        }

    def check_way(self, way: int) -> None:
        if self.way is not None and way > self.way:
            raise ConfigError(
                f"this {self.title} model has a {self.way}-way output layer and cannot score "
                f"{way}-way tasks; test with way <= {self.way}, or train with way={way}"
            )

    def test_report(self, episodes, batch_size: int | None = None) -> dict:
        """Extra figures for results.json after the standard test (e.g. MANN's accuracy by
        instance); none by default."""
        return {}

    def test_summary(self, report: dict) -> dict:
        """The dashboard's summary entries for test_report's figures ("test/..." keys)."""
        return {}

    # -- shared machinery ---------------------------------------------------
    def configure_optimizer(
        self, make: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    ) -> torch.optim.Optimizer:
        """The outer optimizer, from the config's `optimizer` node (a `_partial_` call that
        takes the parameters, e.g. functools.partial(torch.optim.Adam, lr=1e-3))."""
        self.optimizer = make(self.parameters())
        return self.optimizer

    def set_precision(self, amp: str) -> None:
        if amp not in AMP_DTYPES:
            raise ConfigError(f"trainer.amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        if amp == "fp16" and self.inner_loop:
            raise ConfigError(
                f"trainer.amp=fp16 is not supported by {type(self).__name__}: its inner-loop "
                "gradients are not loss-scaled (the GradScaler scales only the outer loss), so "
                "small ones would underflow in float16; use trainer.amp=bf16, which has "
                "float32's range, or trainer.amp=off"
            )
        self.amp_dtype = AMP_DTYPES[amp]
        # fp16 gradients underflow without loss scaling; bf16 does not need it
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    def compile_network(self) -> None:
        """trainer.compile=true: torch.compile the backbone in place (the state dict keeps
        its names, so checkpoints load with or without compilation)."""
        if self.compile_refusal:
            raise ConfigError(
                f"trainer.compile=true is not supported by {type(self).__name__}: "
                f"{self.compile_refusal}; use trainer.compile=false"
            )
        self.backbone.compile()

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def outer_update(
        self, loss: torch.Tensor, grads: Iterable[tuple[nn.Parameter, torch.Tensor]] | None = None
    ) -> bool:
        """The one outer update of every learner: zero the gradients; backpropagate `loss`
        (scaled under fp16), or, for learners that compute their own update direction
        (Reptile's weight difference, iMAML's implicit gradient, MAML's per-thread parts),
        take `grads` as (parameter, gradient) pairs; average over the processes of a
        multi-process run; check for NaN or inf (trainer.nan_policy); clip the gradient
        norm (trainer.grad_clip); step the optimizer. Returns whether the update was made:
        nan_policy=skip skips it and counts it, nan_policy=stop raises NonFiniteLoss with
        the weights still those before this step."""
        self.optimizer.zero_grad(set_to_none=True)
        if grads is None:
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        else:
            if self.scaler is not None:
                raise ConfigError(
                    f"trainer.amp=fp16 is not supported by {type(self).__name__}: it computes "
                    "its own update directions, which the loss scaler cannot scale; use "
                    "trainer.amp=bf16 or trainer.amp=off"
                )
            for p, g in grads:
                p.grad = g
        if self.grad_sync is not None:
            self.grad_sync(self.parameters())
        if not self.finite_update(loss):
            return False
        if self.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
            nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # skips the step when a gradient overflowed
            self.scaler.update()
        return True

    def finite_update(self, loss: torch.Tensor) -> bool:
        """trainer.nan_policy on the loss and (without a loss scaler, which skips
        overflowing steps itself) the gradients in .grad: True when the update may go on."""
        if self.nan_policy == "off":
            return True
        checks = [torch.isfinite(loss.detach()).all()]
        if self.scaler is None:
            checks += [
                torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None
            ]
        if bool(torch.stack(checks).all()):  # one host sync per step
            return True
        what = "loss" if not bool(checks[0]) else "gradient"
        if self.nan_policy == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            return False
        raise NonFiniteLoss(f"non-finite {what} ({float(loss.detach().float().mean()):g})")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions, per task: [B] from logits [B, n, way] and y [B, n]."""
    return (logits.argmax(-1) == y).float().mean(-1).detach()


# Regression tasks (e.g. sinusoid) carry float targets y [B, n]; the model's outputs are
# [B, n, 1]. Classification tasks carry integer labels. The loss and the per-task score
# follow from the targets' dtype, so learners and the evaluator need no switch.


def is_regression(y: torch.Tensor) -> bool:
    return y.is_floating_point()


def metric_name(y: torch.Tensor) -> str:
    """What the per-task score measures: "mse" (lower is better) or "acc" (higher)."""
    return "mse" if is_regression(y) else "acc"


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (mixed precision) are scored in float32; float64 stays."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def mean_log_probs(scores: Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean of log softmax(scores) over several scorings of the same queries [..., way]
    (an ensemble's members, test-time views), in float32 or wider."""
    total, n = None, 0
    for s in scores:
        logp = at_least_float32(s).log_softmax(-1)
        total, n = (logp if total is None else total + logp), n + 1
    return total / n


def supervised_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [n, way] against labels [n]; MSE of outputs [n, 1] against
    float targets [n]."""
    outputs = at_least_float32(outputs)
    if is_regression(y):
        return F.mse_loss(outputs[..., 0], y.to(outputs.dtype))
    return F.cross_entropy(outputs, y)


def task_scores(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per task [B]: accuracy (classification) or mean squared error (regression)."""
    if is_regression(y):
        return (outputs[..., 0].float() - y.float()).pow(2).mean(-1).detach()
    return accuracy(outputs, y)


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


class BatchStatisticsNorm(nn.Module):
    """Batch norm that always uses the current batch's statistics and keeps none.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the mean and biased variance
    over every dimension but the channels (dim 1). Outside torch.func transforms this
    is F.batch_norm (the fused kernel: measured 1.4x faster for a MAML step on the CPU),
    or on the CPU metarun's own kernel with a cheaper second derivative
    (algorithms/second_order.py; the same forward values). Inside them (MAML's vmap over
    tasks) it is written out in plain tensor operations:
    under torch.func.vmap, PyTorch 2.13's second derivative of F.batch_norm with per-task
    weights came out wrong (checked against finite differences), the written-out form
    right. Parameters `weight` and `bias` keep batch norm's names, so state dicts match.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias  # the same Parameters (None: not affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch._C._functorch.is_functorch_wrapped_tensor(x):
            return second_order.batch_norm(x, self.weight, self.bias, self.eps)
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


def use_batch_statistics(backbone: nn.Module) -> None:
    """Make every batch-norm layer normalise with the current batch's statistics, always,
    and keep no running statistics (the transductive setting of MAML and its relatives)."""
    for parent in list(backbone.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, BatchStatisticsNorm(child))


class HeadLearner(MetaLearner):
    """A learner whose model is the backbone plus a linear head with `way` outputs.

    The optimization-based learners adapt this model per task. Tasks with fewer
    classes than the head use its first outputs; more classes are refused.
    """

    supports_regression = True
    inner_loop = True

    def __init__(self, backbone: nn.Module, way: int, batch_statistics: bool) -> None:
        super().__init__()
        positive_ints(way=way)
        shape = feature_shape(backbone, f"{self.title}'s head")
        self.backbone = backbone
        self.head = nn.Linear(math.prod(shape), way)
        self.way = way
        if batch_statistics:
            use_batch_statistics(backbone)
        second_order.use_fused_convolutions(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> logits [N, way] with the module's own (initial) weights."""
        return self.head(self.backbone(x).flatten(1))
