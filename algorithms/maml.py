"""Model-Agnostic Meta-Learning and its relatives: first-order MAML, Meta-SGD, ANIL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metarun.data.episodes import Episodes
from metarun.data.params import NonNegativeInt, PositiveFloat, PositiveInt
from metarun.errors import ConfigError

from . import task_threads
from .base import HeadLearner, infer_way, metric_name, positive_ints, supervised_loss, task_scores

BATCH_NORM = ("transductive", "running")
ADAPT = ("all", "head")
BATCHED = ("auto", "loop", "vmap", "threads")


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

    batched: "loop" adapts task after task; "vmap" runs all tasks of a batch at once
    with torch.func.vmap (batched weights become grouped convolutions); "threads" splits
    the tasks of a batch into one group per intra-op thread and runs the groups on CPU
    worker threads with one intra-op thread each, the meta-gradient of each task taken
    in its worker thread and summed in task order (task_threads.py); "auto" picks from
    measurements (see formulation and make bench). All give the same meta-gradients (up
    to float rounding).

    predict adapts with `test_inner_steps` at step size `test_inner_lr` (default:
    inner_lr) in eval mode and `inner_steps` at `inner_lr` in training mode. Evaluation runs under torch.no_grad; the adaptation turns
    gradients back on for itself and returns detached logits.
    """

    # checked on the CPU with torch 2.13: results bit-identical and no compilation happened
    compile_refusal = (
        "torch.compile leaves its per-task forward passes (torch.func.functional_call with "
        "fast weights, inside autograd.grad) uncompiled, so it would change nothing"
    )
    title = "MAML"

    def __init__(
        self,
        backbone: nn.Module,
        way: PositiveInt,
        inner_steps: PositiveInt = 1,
        inner_lr: PositiveFloat = 0.4,
        test_inner_steps: NonNegativeInt | None = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        adapt: str = "all",
        batch_norm: str = "transductive",
        batched: str = "auto",
        test_inner_lr: PositiveFloat | None = None,
    ):
        positive_ints(inner_steps=inner_steps)
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        if isinstance(test_inner_steps, bool) or not isinstance(test_inner_steps, int):
            raise ConfigError(f"algo.test_inner_steps must be an integer, got {test_inner_steps!r}")
        if not inner_lr > 0:
            raise ConfigError(f"algo.inner_lr must be positive, got {inner_lr!r}")
        if test_inner_lr is not None:
            if learn_inner_lr:
                raise ConfigError(
                    "algo.test_inner_lr is for fixed step sizes; Meta-SGD (learn_inner_lr=true) "
                    "adapts with its learned ones: leave algo.test_inner_lr=null"
                )
            if not test_inner_lr > 0:
                raise ConfigError(f"algo.test_inner_lr must be positive, got {test_inner_lr!r}")
        if adapt not in ADAPT:
            raise ConfigError(f"algo.adapt={adapt!r}; choose 'all' (MAML) or 'head' (ANIL)")
        if batch_norm not in BATCH_NORM:
            raise ConfigError(f"algo.batch_norm={batch_norm!r}; choose one of {BATCH_NORM}")
        if batched not in BATCHED:
            raise ConfigError(f"algo.batched={batched!r}; choose one of {BATCHED}")
        if batched in ("vmap", "threads") and batch_norm == "running":
            raise ConfigError(
                f"algo.batched={batched} cannot update batch-norm running statistics (inside "
                "vmap, or from several threads at once); use algo.batched=loop with "
                "algo.batch_norm=running"
            )
        self.batched, self.batch_norm = batched, batch_norm
        super().__init__(backbone, way, batch_statistics=batch_norm == "transductive")
        self.has_conv = task_threads.has_conv(backbone)
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        self.inner_lr, self.first_order, self.adapt = float(inner_lr), first_order, adapt
        self.test_inner_lr = self.inner_lr if test_inner_lr is None else float(test_inner_lr)
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
        for _ in range(steps):
            with self.autocast():
                logits = self.fast_forward(params, x)[:, :way]
            loss = supervised_loss(logits, y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = self.inner_step(params, dict(zip(params, grads)))
        return params

    def inner_step(self, params: dict, grads: dict) -> dict:
        """One gradient step on the fast weights: step size inner_lr (test_inner_lr in eval
        mode), or Meta-SGD's own."""
        if self.inner_lrs is None:
            lr = self.inner_lr if self.training else self.test_inner_lr
            return {n: p - lr * grads[n] for n, p in params.items()}
        lrs = dict(zip(self.fast_names, self.inner_lrs))
        return {n: p - lrs[n] * grads[n] for n, p in params.items()}

    def task_logits(self, sx, sy, qx, steps: int, way: int, create_graph: bool) -> torch.Tensor:
        if self.adapt == "head":  # ANIL: features once; only the head adapts
            with self.autocast():
                sx, qx = self.backbone(sx).flatten(1), self.backbone(qx).flatten(1)
        params = self.adapt_task(sx, sy, steps, way, create_graph)
        with self.autocast():
            return self.fast_forward(params, qx)[:, :way]

    def looped_logits(self, support_x, support_y, query_x, steps, way, create_graph):
        """task_logits of every task, one after another: [B, n_query, way]."""
        return torch.stack(
            [
                self.task_logits(sx, sy, qx, steps, way, create_graph)
                for sx, sy, qx in zip(support_x, support_y, query_x)
            ]
        )

    def vmapped_logits(self, support_x, support_y, query_x, steps, way, create_graph):
        """All tasks at once: the per-task computation of task_logits under torch.func.vmap,
        with torch.func.grad for the inner gradients (the same values and meta-gradients)."""
        initial = {n: p for n, p in self.named_parameters() if n in self.fast_names}

        def one_task(sx, sy, qx):  # [ns, ...], [ns], [nq, ...]: one task's slice
            if self.adapt == "head":
                with self.autocast():
                    sx, qx = self.backbone(sx).flatten(1), self.backbone(qx).flatten(1)

            def support_loss(params):
                with self.autocast():
                    return supervised_loss(self.fast_forward(params, sx)[:, :way], sy)

            params = initial
            for _ in range(steps):
                grads = torch.func.grad(support_loss)(params)
                if not create_graph:  # first order: the inner gradients are constants
                    grads = {n: g.detach() for n, g in grads.items()}
                params = self.inner_step(params, grads)
            with self.autocast():
                return self.fast_forward(params, qx)[:, :way]

        return torch.func.vmap(one_task)(support_x, support_y, query_x)

    def threaded_logits(self, support_x, support_y, query_x, steps, way, create_graph):
        """looped_logits with the tasks split among worker threads; each group works on
        its own replica of the module (functional_call swaps tensors into it)."""

        def work(part: range) -> torch.Tensor:
            tasks = slice(part.start, part.stop)
            with torch.enable_grad():
                return task_threads.replica(self).looped_logits(
                    support_x[tasks], support_y[tasks], query_x[tasks], steps, way, create_graph
                )

        parts = task_threads.groups(len(support_x), torch.get_num_threads())
        return torch.cat(task_threads.run(work, parts))

    def formulation(self, device: torch.device, tasks: int) -> str:
        """How `tasks` tasks are run: "loop", "vmap" or "threads" (algo.batched).

        "auto", from benchmarks/bench_maml.py and the sinusoid MLP (2-core CPU): vmap on
        CUDA (one launch per layer for all tasks instead of one per task); on the CPU, vmap
        for networks without convolutions (the 40-40 MLP ran 7x faster under vmap than the
        loop, at 1 and 5 steps); for convolutional ones, whose per-task weights become
        grouped convolutions under vmap (0.7-1.05x the loop at 1 step, 0.35-0.7x at 5),
        worker threads when there are several intra-op threads and tasks (1.2-1.4x the
        loop), else the loop. With batch_norm="running" always the loop, the one formulation
        that updates running statistics."""
        batched = self.batched
        if batched == "auto":
            if self.batch_norm == "running":
                batched = "loop"  # the only one that updates running statistics
            elif device.type == "cuda" or not self.has_conv:
                batched = "vmap"
            elif torch.get_num_threads() > 1:
                batched = "threads"
            else:
                batched = "loop"
        if batched == "threads" and not task_threads.usable(device, tasks):
            return "loop"  # CPU threads only; with one group there is nothing to share out
        return batched

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        self.check_way(way)
        train_graph = torch.is_grad_enabled()
        steps = self.inner_steps if self.training else self.test_inner_steps
        create_graph = self.training and train_graph and not self.first_order
        with torch.enable_grad():  # adaptation needs gradients, even inside evaluation
            how = self.formulation(support_x.device, len(support_x))
            if how == "vmap":
                logits = self.vmapped_logits(
                    support_x, support_y, query_x, steps, way, create_graph
                )
            elif how == "threads":
                logits = self.threaded_logits(
                    support_x, support_y, query_x, steps, way, create_graph
                )
            else:
                logits = self.looped_logits(support_x, support_y, query_x, steps, way, create_graph)
        return logits if train_graph else logits.detach()

    def meta_train_step(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        """The default step, except with batched="threads": there each worker thread also
        takes its tasks' shares of the meta-gradient, so the backward pass, most of the
        work, runs in parallel too. A worker differentiates each task's part of the mean
        query loss as soon as the task is done (one task's graph in memory at a time); the
        calling thread sums the tasks' parts in task order and makes the update."""
        tasks = episodes.batch_size
        if self.scaler is not None or self.formulation(episodes.support_x.device, tasks) != (
            "threads"
        ):
            return super().meta_train_step(episodes)
        self.check_way(episodes.way)
        self.train()
        params = [p for p in self.parameters() if p.requires_grad]
        create_graph = not self.first_order

        def one(model: MAML, i: int):
            """Task i's logits, its part of the mean query loss and that part's gradients:
            one task's graph at a time, a smaller working set (1.05-1.09x)."""
            with torch.enable_grad(), self.autocast():
                logits = model.task_logits(
                    episodes.support_x[i],
                    episodes.support_y[i],
                    episodes.query_x[i],
                    self.inner_steps,
                    episodes.way,
                    create_graph,
                )[None]
                share = self.loss(logits, episodes.query_y[i : i + 1]) / tasks
            grads = torch.autograd.grad(share, params, allow_unused=True)
            return logits.detach(), share.detach(), grads

        results = task_threads.map_tasks(self, tasks, one, threaded=True)
        summed = []
        for i, p in enumerate(params):
            shares = [grads[i] for _, _, grads in results if grads[i] is not None]
            if shares:
                summed.append((p, torch.stack(shares).sum(0)))
        loss = torch.stack([share for _, share, _ in results]).sum()
        self.outer_update(loss, summed)
        logits = torch.cat([logits for logits, _, _ in results])
        return {
            "loss": loss,
            metric_name(episodes.query_y): task_scores(logits, episodes.query_y),
        }
