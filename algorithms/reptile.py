"""Reptile: first-order meta-learning by moving the initial weights toward adapted ones."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from metarun.data.episodes import Episodes
from metarun.data.params import PositiveFloat, PositiveInt
from metarun.errors import ConfigError

from . import task_threads
from .base import HeadLearner, infer_way, metric_name, positive_ints, supervised_loss, task_scores

INNER_OPTIMIZERS = ("sgd", "adam")
BATCHED = ("auto", "loop", "threads")


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

    Each task's minibatch order comes from its own generator: in training, seeded by a
    number drawn for it from the global generator before any task runs; in evaluation,
    seeded with 0. So the tasks can run in any order: batched="threads" fine-tunes groups
    of tasks on CPU worker threads, one intra-op thread each (task_threads.py, as MAML
    does), and the outer direction sums the tasks' differences in task order, so a run
    gives the same weights every time for a given thread count. batched="loop" runs the
    tasks one after another; "auto": threads for a convolutional network on a CPU with two
    or more torch threads, else the loop.
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
        batched: str = "auto",
    ):
        if batched not in BATCHED:
            raise ConfigError(f"algo.batched={batched!r}; choose one of {', '.join(BATCHED)}")
        positive_ints(
            inner_steps=inner_steps, inner_batch=inner_batch, test_inner_steps=test_inner_steps
        )
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"algo.inner_optimizer={inner_optimizer!r}; choose sgd or adam")
        if not inner_lr > 0:
            raise ConfigError(f"algo.inner_lr must be positive, got {inner_lr!r}")
        super().__init__(backbone, way, batch_statistics=True)
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        self.batched = batched
        self.inner_lr, self.inner_optimizer, self.inner_batch = (
            inner_lr,
            inner_optimizer,
            inner_batch,
        )

    def fine_tune(self, x, y, steps: int, way: int, generator) -> dict[str, torch.Tensor]:
        """Weights after `steps` inner steps on (x, y), starting from the module's own.
        The minibatch order comes from `generator`, on the CPU (the same for a task
        whatever the device, the thread or the other tasks)."""
        params = {n: p.detach().clone() for n, p in self.named_parameters()}
        state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
        n = x.shape[0]

        def permutation():
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

    def formulation(self, device: torch.device, tasks: int) -> str:
        """How the tasks run: "threads" or "loop" (see the class docstring); auto takes the
        threads for convolutional networks only (measured: make bench)."""
        wanted = self.batched == "threads" or (
            self.batched == "auto" and task_threads.has_conv(self.backbone)
        )
        return "threads" if wanted and task_threads.usable(device, tasks) else "loop"

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        self.check_way(way)
        steps = self.inner_steps if self.training else self.test_inner_steps
        generators = self.task_generators(len(support_x))

        def one(model: Reptile, i: int) -> torch.Tensor:
            with torch.enable_grad():
                params = model.fine_tune(support_x[i], support_y[i], steps, way, generators[i])
            with torch.no_grad(), model.autocast():
                return functional_call(model, params, (query_x[i],))[:, :way]

        threaded = self.formulation(support_x.device, len(support_x)) == "threads"
        return torch.stack(task_threads.map_tasks(self, len(support_x), one, threaded))

    def task_generators(self, tasks: int) -> list[torch.Generator]:
        """Each task's minibatch generator: in training seeded from the global generator
        (drawn here, in the calling thread, before any task runs); in evaluation with 0, so
        that a checkpoint's test score is repeatable."""
        if not self.training:
            return [torch.Generator().manual_seed(0) for _ in range(tasks)]
        seeds = torch.randint(0, 2**62, (tasks,)).tolist()
        return [torch.Generator().manual_seed(s) for s in seeds]

    def meta_train_step(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        self.train()
        way, b = episodes.way, episodes.batch_size
        theta = dict(self.named_parameters())
        generators = self.task_generators(b)

        def one(model: Reptile, i: int):
            phi = model.fine_tune(
                episodes.support_x[i], episodes.support_y[i], self.inner_steps, way, generators[i]
            )
            with torch.no_grad(), model.autocast():
                logits = functional_call(model, phi, (episodes.query_x[i],))[:, :way].float()
            return phi, logits

        threaded = self.formulation(episodes.support_x.device, b) == "threads"
        results = task_threads.map_tasks(self, b, one, threaded)
        deltas = {n: torch.zeros_like(p) for n, p in theta.items()}
        losses, scores = [], []
        for (phi, logits), qy in zip(results, episodes.query_y):  # in task order
            for n in deltas:
                deltas[n] += (theta[n].detach() - phi[n]) / b
            losses.append(supervised_loss(logits, qy))
            scores.append(task_scores(logits[None], qy[None])[0])
        # the update direction theta - mean(phi) as the gradient: with optimizer=sgd at
        # lr epsilon, theta <- theta + epsilon * (mean(phi) - theta)
        self.outer_update(torch.stack(losses).mean(), [(theta[n], deltas[n]) for n in theta])
        return {"loss": torch.stack(losses).mean(), metric_name(qy): torch.stack(scores)}
