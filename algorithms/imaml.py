"""iMAML: meta-gradients through the inner optimum by the implicit function theorem."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from metarun.data.episodes import Episodes
from metarun.data.params import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from metarun.errors import ConfigError

from . import task_threads
from .base import HeadLearner, infer_way, metric_name, positive_ints, supervised_loss, task_scores

BATCHED = ("auto", "loop", "vmap", "threads")


def conjugate_gradient(
    matvec: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]],
    b: Sequence[torch.Tensor],
    steps: int,
) -> list[torch.Tensor]:
    """Approximately solve A x = b for symmetric positive definite A, given x -> A x.

    Works on lists of tensors (one per parameter); starts at x = 0; `steps` iterations.
    Stops early when A shows non-positive curvature along a search direction (the
    Hessian of a network's loss can be indefinite); before any step it then returns b.
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = sum((t * t).sum() for t in r)
    for i in range(steps):
        ap = matvec(p)
        curvature = sum((u * v).sum() for u, v in zip(p, ap))
        if not curvature > 0:  # not positive definite along p (or NaN): stop here
            # with no step taken yet, b itself (the first-order answer) is the safe fallback
            return x if i > 0 else [t.clone() for t in b]
        alpha = rr / curvature
        x = [u + alpha * v for u, v in zip(x, p)]
        r = [u - alpha * v for u, v in zip(r, ap)]
        rr_new = sum((t * t).sum() for t in r)
        if rr_new < 1e-20:
            break
        p = [u + (rr_new / rr) * v for u, v in zip(r, p)]
        rr = rr_new
    return x


def batched_conjugate_gradient(
    matvec: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]],
    b: Sequence[torch.Tensor],
    steps: int,
) -> list[torch.Tensor]:
    """conjugate_gradient for a batch of independent systems, one per task: every tensor
    in b (and in matvec's input and output) has the task index first. Each task takes the
    iterates, the early stops and the fallback of conjugate_gradient on its own system;
    a task that has stopped is held with torch.where (no host synchronisation)."""

    def dot(u, v):  # [tasks]
        return sum((a * c).flatten(1).sum(1) for a, c in zip(u, v))

    def per_task(s, t):  # a [tasks] vector shaped to broadcast against t
        return s.view(-1, *([1] * (t.dim() - 1)))

    def where(mask, u, v):
        return [torch.where(per_task(mask, a), a, c) for a, c in zip(u, v)]

    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = dot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    for i in range(steps):
        ap = matvec(p)
        curvature = dot(p, ap)
        bad = active & ~(curvature > 0)
        if i == 0:  # no step taken yet: b itself (the first-order answer)
            x = where(bad, b, x)
        active = active & ~bad
        alpha = torch.where(active, rr / torch.where(active, curvature, 1.0), 0.0)
        x = where(active, [u + per_task(alpha, u) * v for u, v in zip(x, p)], x)
        r = where(active, [u - per_task(alpha, u) * v for u, v in zip(r, ap)], r)
        rr_new = dot(r, r)
        beta = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0)
        p = where(active, [u + per_task(beta, u) * v for u, v in zip(r, p)], p)
        rr = torch.where(active, rr_new, rr)
        active = active & ~(rr_new < 1e-20)
    return x


def implicit_meta_gradient(
    support_loss: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    phi: Sequence[torch.Tensor],
    query_grad: Sequence[torch.Tensor],
    lam: float,
    cg_steps: int,
    damping: float = 0.0,
    solver: Callable = conjugate_gradient,
) -> list[torch.Tensor]:
    """v = (I + (H + damping I) / lam)^-1 g, with H the Hessian of the support loss at phi.

    With solver=batched_conjugate_gradient, phi and query_grad carry the task index first
    and support_loss returns the sum of the tasks' losses (each task's gradient and
    Hessian-vector product are then its own): one system per task.

    That is the gradient of the query loss at the proximal inner optimum phi with
    respect to the initial weights (Rajeswaran et al. 2019, Lemma 1), found by
    conjugate gradient with Hessian-vector products (no unrolled inner loop).
    """
    phi = [p.detach().requires_grad_(True) for p in phi]
    with torch.enable_grad():
        grads = torch.autograd.grad(support_loss(phi), phi, create_graph=True)

    def matvec(v):
        hv = torch.autograd.grad(grads, phi, grad_outputs=v, retain_graph=True)
        return [u + (h + damping * u) / lam for u, h in zip(v, hv)]

    return [t.detach() for t in solver(matvec, [g.detach() for g in query_grad], cg_steps)]


class IMAML(HeadLearner):
    """Implicit MAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019).

    Inner problem per task: phi = argmin L_support(phi) + lam/2 ||phi - theta||^2,
    solved approximately by `inner_steps` steps of gradient descent (step
    `inner_lr`) from theta, without building a graph. Meta-gradient: the
    implicit one, (I + H/lam)^-1 grad L_query(phi), solved by `cg_steps` of
    conjugate gradient with Hessian-vector products of the support loss at
    phi; `damping` adds damping * I to H for stability. Memory therefore does
    not grow with inner_steps. The meta-batch's meta-gradients are averaged and
    given to the outer optimizer (Adam at trainer.lr).

    Batch norm uses the statistics of the batch it sees and keeps no running
    statistics (transductive, as in MAML). predict solves the same proximal
    problem with `test_inner_steps`.

    batched: "loop" solves the tasks of a meta-batch one after another; "vmap"
    all at once (the per-task losses under torch.func.vmap, their gradients and
    Hessian-vector products by autograd with the task index as a batch dimension,
    conjugate gradient per task with batched_conjugate_gradient); "threads" solves
    groups of tasks on CPU worker threads, one intra-op thread each (task_threads.py),
    and sums the meta-gradients in task order, as the loop does, so a run gives the same
    weights every time for a given thread count. All compute the same values.
    "auto": vmap on CUDA; on a CPU with two or more torch threads, threads for a
    convolutional network; else the loop.
    Departure: the paper's Omniglot experiments solve the inner problem with
    Hessian-free or many GD steps; the solver here is plain GD.
    """

    compile_refusal = (
        "its Hessian-vector products differentiate through a backward pass "
        "(create_graph=True), which a torch.compile'd graph refuses (donated buffers)"
    )
    title = "iMAML"

    def __init__(
        self,
        backbone: nn.Module,
        way: PositiveInt,
        lam: PositiveFloat = 2.0,
        inner_steps: PositiveInt = 16,
        inner_lr: PositiveFloat = 0.1,
        test_inner_steps: NonNegativeInt | None = None,
        cg_steps: PositiveInt = 5,
        damping: NonNegativeFloat = 1.0,
        batched: str = "auto",
    ):
        if batched not in BATCHED:
            raise ConfigError(f"algo.batched={batched!r}; choose one of {BATCHED}")
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        positive_ints(inner_steps=inner_steps, cg_steps=cg_steps, test_inner_steps=test_inner_steps)
        for key, value in (("lam", lam), ("inner_lr", inner_lr)):
            if not value > 0:
                raise ConfigError(f"algo.{key} must be positive, got {value!r}")
        if damping < 0:
            raise ConfigError(f"algo.damping must be 0 or more, got {damping!r}")
        super().__init__(backbone, way, batch_statistics=True)
        self.lam, self.inner_lr, self.damping = float(lam), float(inner_lr), damping
        self.batched = batched
        self.inner_steps, self.test_inner_steps, self.cg_steps = (
            inner_steps,
            test_inner_steps,
            cg_steps,
        )

    def task_loss(self, params: Sequence[torch.Tensor], x, y, way: int) -> torch.Tensor:
        names = [n for n, _ in self.named_parameters()]
        with self.autocast():
            logits = functional_call(self, dict(zip(names, params)), (x,))[:, :way]
        return supervised_loss(logits, y)

    def solve_inner(self, x, y, steps: int, way: int) -> list[torch.Tensor]:
        theta = [p.detach() for p in self.parameters()]
        phi = [t.clone() for t in theta]
        with torch.enable_grad():
            for _ in range(steps):
                phi = [p.requires_grad_(True) for p in phi]
                grads = torch.autograd.grad(self.task_loss(phi, x, y, way), phi)
                with torch.no_grad():
                    phi = [
                        p - self.inner_lr * (g + self.lam * (p - t))
                        for p, g, t in zip(phi, grads, theta)
                    ]
        return [p.detach() for p in phi]

    def formulation(self, device: torch.device, tasks: int) -> str:
        """How the tasks run: "vmap", "threads" or "loop" (see the class docstring). auto:
        vmap on CUDA (one launch per layer for all tasks instead of one per task; measured
        on an H200, see the README); on the CPU, where vmap was not measured faster,
        worker threads for convolutional networks when there are two or more intra-op
        threads (make bench)."""
        how = self.batched
        if how == "auto":
            if device.type == "cuda":
                how = "vmap"
            else:
                how = "threads" if task_threads.has_conv(self.backbone) else "loop"
        if how == "threads" and not task_threads.usable(device, tasks):
            return "loop"
        return how

    # -- all tasks at once -------------------------------------------------------------

    def task_losses(self, params: Sequence[torch.Tensor], x, y, way: int) -> torch.Tensor:
        """[tasks] losses; params, x and y carry the task index first."""
        return torch.func.vmap(lambda p, xi, yi: self.task_loss(p, xi, yi, way))(params, x, y)

    def task_outputs(self, params: Sequence[torch.Tensor], x, way: int) -> torch.Tensor:
        names = [n for n, _ in self.named_parameters()]

        def one(p, xi):
            with self.autocast():
                return functional_call(self, dict(zip(names, p)), (xi,))[:, :way]

        return torch.func.vmap(one)(params, x)

    def solve_inner_batched(self, x, y, steps: int, way: int) -> list[torch.Tensor]:
        """solve_inner for every task of the batch at once: weights [tasks, ...]."""
        theta = [p.detach() for p in self.parameters()]
        phi = [t.expand(x.shape[0], *t.shape).clone() for t in theta]
        with torch.enable_grad():
            for _ in range(steps):
                phi = [p.requires_grad_(True) for p in phi]
                # tasks are independent, so the sum's gradient holds each task's own
                grads = torch.autograd.grad(self.task_losses(phi, x, y, way).sum(), phi)
                with torch.no_grad():
                    phi = [
                        p - self.inner_lr * (g + self.lam * (p - t))
                        for p, g, t in zip(phi, grads, theta)
                    ]
        return [p.detach() for p in phi]

    def meta_train_step_batched(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        way = episodes.way
        sx, sy = episodes.support_x, episodes.support_y
        qx, qy = episodes.query_x, episodes.query_y
        phi = self.solve_inner_batched(sx, sy, self.inner_steps, way)
        with torch.enable_grad():
            phi_q = [p.requires_grad_(True) for p in phi]
            logits = self.task_outputs(phi_q, qx, way)
            losses = torch.func.vmap(supervised_loss)(logits, qy)
            query_grad = torch.autograd.grad(losses.sum(), phi_q)
        v = implicit_meta_gradient(
            lambda p: self.task_losses(p, sx, sy, way).sum(),
            phi,
            query_grad,
            self.lam,
            self.cg_steps,
            self.damping,
            solver=batched_conjugate_gradient,
        )
        self.outer_update(
            losses.detach().mean(), [(p, g.mean(0)) for p, g in zip(self.parameters(), v)]
        )
        return {"loss": losses.detach().mean(), metric_name(qy): task_scores(logits.detach(), qy)}

    # -----------------------------------------------------------------------------------

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        self.check_way(way)
        steps = self.inner_steps if self.training else self.test_inner_steps
        how = self.formulation(support_x.device, len(support_x))
        if how == "vmap":
            phi = self.solve_inner_batched(support_x, support_y, steps, way)
            with torch.no_grad():
                return self.task_outputs(phi, query_x, way)
        names = [n for n, _ in self.named_parameters()]

        def one(model: IMAML, i: int) -> torch.Tensor:
            phi = model.solve_inner(support_x[i], support_y[i], steps, way)
            with torch.no_grad(), model.autocast():
                return functional_call(model, dict(zip(names, phi)), (query_x[i],))[:, :way]

        threaded = how == "threads"
        return torch.stack(task_threads.map_tasks(self, len(support_x), one, threaded))

    def meta_train_step(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        self.train()
        way, b = episodes.way, episodes.batch_size
        how = self.formulation(episodes.support_x.device, b)
        if how == "vmap":
            return self.meta_train_step_batched(episodes)
        names = [n for n, _ in self.named_parameters()]

        def one(model: IMAML, i: int):
            """Task i's implicit meta-gradient, query loss and logits."""
            sx, sy = episodes.support_x[i], episodes.support_y[i]
            phi = model.solve_inner(sx, sy, self.inner_steps, way)
            phi_q = [p.requires_grad_(True) for p in phi]
            with torch.enable_grad():
                with model.autocast():
                    logits = functional_call(model, dict(zip(names, phi_q)), (episodes.query_x[i],))
                    logits = logits[:, :way]
                loss = supervised_loss(logits, episodes.query_y[i])
                query_grad = torch.autograd.grad(loss, phi_q)
            v = implicit_meta_gradient(
                lambda p: model.task_loss(p, sx, sy, way),
                phi,
                query_grad,
                self.lam,
                self.cg_steps,
                self.damping,
            )
            return v, loss.detach(), logits.detach()

        results = task_threads.map_tasks(self, b, one, how == "threads")
        params = list(self.parameters())
        meta_grads = [torch.zeros_like(p) for p in params]
        losses, scores = [], []
        for (v, loss, logits), qy in zip(results, episodes.query_y):  # in task order
            for acc_g, vi in zip(meta_grads, v):
                acc_g += vi / b
            losses.append(loss)
            scores.append(task_scores(logits[None], qy[None])[0])
        self.outer_update(torch.stack(losses).mean(), zip(params, meta_grads))
        return {"loss": torch.stack(losses).mean(), metric_name(qy): torch.stack(scores)}
