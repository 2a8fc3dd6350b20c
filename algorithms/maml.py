"""Model-Agnostic Meta-Learning and its relatives: first-order MAML, Meta-SGD, ANIL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metarun.data.errors import ConfigError

from .base import HeadLearner, infer_way, positive_ints

BATCH_NORM = ("transductive", "running")
ADAPT = ("all", "head")


class MAML(HeadLearner):
    """MAML (Finn, Abbeel, Levine, ICML 2017).

    The model is the backbone followed by a linear head with `way` outputs.
    For each task, `inner_steps` steps of gradient descent on the support
    cross-entropy, from the shared initial weights, with step size
    `inner_lr`; the adapted weights score the queries. The outer update
    minimises the query loss averaged over the meta-batch with respect to the
    initial weights, differentiating through the inner steps
    (`create_graph=True`: the exact second-order meta-gradient).

    Variants, all one class:
    - first_order=True (FOMAML, Finn et al. Sec. 5.2): the inner gradients are
      treated as constants, so the meta-gradient is the query-loss gradient at
      the adapted weights.
    - learn_inner_lr=True (Meta-SGD, Li, Zhou, Chen, Li 2017): one learned step
      size per weight, elementwise, initialised to inner_lr, meta-trained with
      the initial weights.
    - adapt="head" (ANIL, Raghu, Raghu, Bengio, Vinyals, ICLR 2020): only the
      head adapts in the inner loop; the backbone's features are computed once
      per task and meta-trained through the head's adaptation.

    Batch norm: batch_norm="transductive" (default, the paper's choice) uses the
    statistics of the current batch (a task's support set, then its query set)
    in training and at test time and keeps no running statistics, so a query's
    prediction depends on the other queries of its task. batch_norm="running"
    keeps running statistics during meta-training and uses them at test time,
    so queries are scored independently.

    predict adapts with `test_inner_steps` in eval mode and `inner_steps` in
    training mode. Evaluation runs under torch.no_grad; the adaptation turns
    gradients back on for itself and returns detached logits.
    """

    title = "MAML"

    def __init__(
        self,
        backbone: nn.Module,
        way: int,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        test_inner_steps: int | None = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        adapt: str = "all",
        batch_norm: str = "transductive",
    ):
        positive_ints(inner_steps=inner_steps)
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        if isinstance(test_inner_steps, bool) or not isinstance(test_inner_steps, int):
            raise ConfigError(f"algo.test_inner_steps must be an integer, got {test_inner_steps!r}")
        if not inner_lr > 0:
            raise ConfigError(f"algo.inner_lr must be positive, got {inner_lr!r}")
        if adapt not in ADAPT:
            raise ConfigError(f"algo.adapt={adapt!r}; choose 'all' (MAML) or 'head' (ANIL)")
        if batch_norm not in BATCH_NORM:
            raise ConfigError(f"algo.batch_norm={batch_norm!r}; choose one of {BATCH_NORM}")
        super().__init__(backbone, way, batch_statistics=batch_norm == "transductive")
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        self.inner_lr, self.first_order, self.adapt = float(inner_lr), first_order, adapt
        self.fast_names = [
            n for n, _ in self.named_parameters() if adapt == "all" or n.startswith("head.")
        ]
        self.inner_lrs = (
            nn.ParameterList(
                nn.Parameter(torch.full_like(p, float(inner_lr)))
                for n, p in self.named_parameters()
                if n in self.fast_names
            )
            if learn_inner_lr
            else None
        )

    def fast_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits with the fast weights `params`; x are images, or features when adapt=head."""
        if self.adapt == "head":
            return F.linear(x, params["head.weight"], params["head.bias"])
        return functional_call(self, params, (x,))

    def adapt_task(self, x, y, steps: int, way: int, create_graph: bool):
        """`steps` gradient steps on one task's support loss, from the initial weights."""
        params = {n: p for n, p in self.named_parameters() if n in self.fast_names}
        lrs = list(self.inner_lrs) if self.inner_lrs is not None else None
        for _ in range(steps):
            with self.autocast():
                logits = self.fast_forward(params, x)[:, :way]
            loss = F.cross_entropy(logits.float(), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {
                name: p - (self.inner_lr if lrs is None else lrs[i]) * g
                for i, ((name, p), g) in enumerate(zip(params.items(), grads))
            }
        return params

    def task_logits(self, sx, sy, qx, steps: int, way: int, create_graph: bool) -> torch.Tensor:
        if self.adapt == "head":  # ANIL: features once; only the head adapts
            with self.autocast():
                sx, qx = self.backbone(sx).flatten(1), self.backbone(qx).flatten(1)
        params = self.adapt_task(sx, sy, steps, way, create_graph)
        with self.autocast():
            return self.fast_forward(params, qx)[:, :way]

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        self.check_way(way)
        train_graph = torch.is_grad_enabled()
        steps = self.inner_steps if self.training else self.test_inner_steps
        create_graph = self.training and train_graph and not self.first_order
        with torch.enable_grad():  # adaptation needs gradients, even inside evaluation
            logits = torch.stack(
                [
                    self.task_logits(sx, sy, qx, steps, way, create_graph)
                    for sx, sy, qx in zip(support_x, support_y, query_x)
                ]
            )
        return logits if train_graph else logits.detach()
