"""Reptile: first-order meta-learning by moving the initial weights toward adapted ones."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from metarun.data.episodes import Episodes
from metarun.data.params import PositiveFloat, PositiveInt
from metarun.errors import ConfigError

from .base import HeadLearner, infer_way, metric_name, positive_ints, supervised_loss, task_scores

INNER_OPTIMIZERS = ("sgd", "adam")


class Reptile(HeadLearner):
    """Reptile (Nichol, Achiam, Schulman 2018, "On First-Order Meta-Learning Algorithms").

    Per task of the meta-batch: start from the initial weights theta, take
    `inner_steps` optimizer steps (SGD, or Adam as in the paper's few-shot
    experiments) on minibatches of `inner_batch` support examples, giving
    phi_i. The outer update is the batched version: theta <- theta +
    epsilon * mean_i (phi_i - theta). It is done by handing theta - mean phi
    to the outer optimizer as its gradient: conf/algo/reptile.yaml chooses
    optimizer=sgd, whose step at learning rate epsilon = trainer.lr is exactly
    that update, and the trainer's schedule anneals epsilon (the paper: linearly
    from 1 to 0, trainer.schedule=linear). Another optimizer=... gives the
    variants the paper mentions (e.g. Adam on the difference).

    predict fine-tunes a copy on each task's support set for
    `test_inner_steps` and scores the queries with it.

    Batch norm keeps no running statistics and uses the statistics of the
    batch it sees (transductive at test time, as in the paper's
    "transductive" setting); the paper also reports a non-transductive
    variant, not offered here.
    Departures: the inner minibatches cycle through a fresh permutation of
    the support set (the paper samples minibatches from the task's training
    data the same way); the queries of training episodes are unused.
    """

    compile_refusal = (
        "torch.compile breaks its graph at every batch-norm layer (the per-task "
        "batch-statistics norm) and has not been measured faster here"
    )
    title = "Reptile"

    def __init__(
        self,
        backbone: nn.Module,
        way: PositiveInt,
        inner_steps: PositiveInt = 5,
        inner_lr: PositiveFloat = 0.001,
        inner_optimizer: str = "adam",
        inner_batch: PositiveInt = 10,
        test_inner_steps: PositiveInt = 50,
    ):
        positive_ints(
            inner_steps=inner_steps, inner_batch=inner_batch, test_inner_steps=test_inner_steps
        )
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"algo.inner_optimizer={inner_optimizer!r}; choose sgd or adam")
        if not inner_lr > 0:
            raise ConfigError(f"algo.inner_lr must be positive, got {inner_lr!r}")
        super().__init__(backbone, way, batch_statistics=True)
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        self.inner_lr, self.inner_optimizer, self.inner_batch = (
            inner_lr,
            inner_optimizer,
            inner_batch,
        )

    def fine_tune(self, x, y, steps: int, way: int, generator=None) -> dict[str, torch.Tensor]:
        """Weights after `steps` inner steps on (x, y), starting from the module's own.
        The minibatch order comes from the global RNG (training) or from `generator`, on
        the CPU (evaluation: the same for a task whatever the device, the batch or the
        random state, so a checkpoint's test score is repeatable)."""
        params = {n: p.detach().clone() for n, p in self.named_parameters()}
        state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
        n = x.shape[0]

        def permutation():
            if generator is None:
                return torch.randperm(n, device=x.device)
            return torch.randperm(n, generator=generator).to(x.device)

        order = permutation()
        cursor = 0
        for t in range(1, steps + 1):
            if cursor + self.inner_batch > n:
                order, cursor = permutation(), 0
            idx = order[cursor : cursor + self.inner_batch]
            cursor += self.inner_batch
            for p in params.values():
                p.requires_grad_(True)
            with self.autocast():
                logits = functional_call(self, params, (x[idx],))[:, :way]
            loss = supervised_loss(logits, y[idx])
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                params = {
                    name: self.update(p, g, state[name], t)
                    for (name, p), g in zip(params.items(), grads)
                }
        return params

    def update(self, p, g, state, t: int) -> torch.Tensor:
        if self.inner_optimizer == "sgd":
            return p - self.inner_lr * g
        m, v = state  # Adam with the default betas and eps, fresh for every task
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        return p - self.inner_lr * m_hat / (v_hat.sqrt() + 1e-8)

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        self.check_way(way)
        steps = self.inner_steps if self.training else self.test_inner_steps
        out = []
        for sx, sy, qx in zip(support_x, support_y, query_x):
            generator = None if self.training else torch.Generator().manual_seed(0)
            with torch.enable_grad():
                params = self.fine_tune(sx, sy, steps, way, generator)
            with torch.no_grad(), self.autocast():
                out.append(functional_call(self, params, (qx,))[:, :way])
        return torch.stack(out)

    def meta_train_step(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        self.train()
        way = episodes.way
        theta = dict(self.named_parameters())
        deltas = {n: torch.zeros_like(p) for n, p in theta.items()}
        losses, scores = [], []
        for sx, sy, qx, qy in zip(
            episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y
        ):
            phi = self.fine_tune(sx, sy, self.inner_steps, way)
            for n in deltas:
                deltas[n] += (theta[n].detach() - phi[n]) / episodes.batch_size
            with torch.no_grad(), self.autocast():
                logits = functional_call(self, phi, (qx,))[:, :way].float()
            losses.append(supervised_loss(logits, qy))
            scores.append(task_scores(logits[None], qy[None])[0])
        # the update direction theta - mean(phi) as the gradient: with optimizer=sgd at
        # lr epsilon, theta <- theta + epsilon * (mean(phi) - theta)
        self.outer_update(torch.stack(losses).mean(), [(theta[n], deltas[n]) for n in theta])
        return {"loss": torch.stack(losses).mean(), metric_name(qy): torch.stack(scores)}
