"""Meta Networks (Munkhdalai & Yu, ICML 2017, "Meta Networks").

Two learners with slow weights (trained across tasks by the optimizer) and fast weights
(generated within a task from loss gradients, the paper's "meta information"):

- the base learner b: a backbone f and a layer-augmented output layer, logits
  b(x) = W f(x) + c + W*_x f(x), slow W, c and fast W*_x;
- the dynamic representation function u: a second backbone g and a layer-augmented layer,
  u(x) = Q g(x) + Q* g(x), slow Q and task-level fast Q* (Sec. 3.3: the augmented layer
  adds the outputs of its slow and its fast weights; both of these last layers are linear,
  as an embedding's or a classifier's last layer).

For each task (Algorithm 1 of the paper, per task, all tasks of a batch at once):

1. Representation meta information. For T pairs (i, j) of support examples, the
   representation loss L_ij = BCE(sigmoid(v . |u_Q(x_i) - u_Q(x_j)| + e), [y_i == y_j])
   on the slow representation u_Q(x) = Q g(x), and its gradient dL_ij/dQ
   (`pair_gradients`, closed form). Task-level fast weights Q* = d(G, {dL_ij/dQ}): d is an
   LSTM that reads the T gradients one after another, coordinate-wise (every weight of Q
   is a sequence of its own; d's weights are shared across coordinates), on the gradient
   preprocessing of Andrychowicz et al. (2016), which the paper uses; Q* is a linear
   readout of its last state.
2. Example-level meta information. For each support example x_i, the gradient of the base
   learner's cross-entropy with respect to W, dl_i/dW = (softmax(b_W(x_i)) - onehot(y_i))
   f(x_i)^T, and fast weights W*_i = m(Z, dl_i/dW), m a two-layer network applied to every
   coordinate's preprocessed gradient (`example_fast_weights`). Memory: M = {W*_i} and
   R = {r_i = u(x_i)} with the task's Q*.
3. Each query x: r = u(x); attention a = softmax_i(cos(r, r_i)) over the support set;
   W*_x = sum_i a_i W*_i; logits b(x) with W*_x.

The slow weights (both backbones, W, c, Q, v, e and the generators m and d) are trained on
the queries' cross-entropy plus `repr_weight` times the mean representation loss.

Simplifications, stated: fast weights exist only in the last layer of b and of u (the
paper augments more layers); the loss gradients fed to m and d are inputs, not
differentiated through (no second derivatives); m and d act coordinate-wise (one
weight's gradient at a time, weights shared) instead of on whole gradient tensors; the
representation loss uses the first T pairs of a random order of all support pairs
(`pairs`; evaluation uses a fixed order), and is also minimised, so its classifier v, e
learns; the gradient of the output bias is not used. In 1-shot tasks every pair is of two
classes, so the representation loss only pushes embeddings apart.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.params import NonNegativeFloat, PositiveInt
from metarun.errors import ConfigError

from .base import (
    MetaLearner,
    at_least_float32,
    embed_tasks,
    feature_shape,
    infer_way,
    metric_name,
    positive_ints,
    task_scores,
)
from .lstm_meta import preprocess


class MetaNet(MetaLearner):
    """Meta Networks with fast weights in the output layers of b and u (see the module
    docstring for the algorithm and the simplifications)."""

    title = "Meta Networks"

    def __init__(
        self,
        backbone: nn.Module,
        way: PositiveInt,
        repr_dim: PositiveInt = 64,
        hidden_size: PositiveInt = 20,
        pairs: PositiveInt = 10,
        repr_weight: NonNegativeFloat = 1.0,
        shared_backbone: bool = False,
    ):
        super().__init__()
        positive_ints(way=way, repr_dim=repr_dim, hidden_size=hidden_size, pairs=pairs)
        if not repr_weight >= 0:
            raise ConfigError(f"algo.repr_weight must be >= 0, got {repr_weight!r}")
        features = math.prod(feature_shape(backbone, self.title))
        self.way, self.pairs, self.repr_weight = way, pairs, float(repr_weight)
        self.backbone = backbone  # f, the base learner's
        self.shared_backbone = bool(shared_backbone)
        if not shared_backbone:  # g, the representation function's: same shape, own weights
            self.repr_backbone = copy.deepcopy(backbone)
            for module in self.repr_backbone.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.head = nn.Linear(features, way)  # W, c
        self.repr = nn.Linear(features, repr_dim, bias=False)  # Q
        self.pair = nn.Linear(repr_dim, 1)  # v, e: same class from |u(x_i) - u(x_j)|
        # m: preprocessed gradient (2 numbers) -> a fast weight, per coordinate
        self.m = nn.Sequential(nn.Linear(2, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))
        # d: an LSTM over the T pair gradients of each coordinate of Q, then a readout
        self.d = nn.LSTMCell(2, hidden_size)
        self.d_out = nn.Linear(hidden_size, 1)

    # -- the two networks ---------------------------------------------------------
    def features(self, support_x, query_x):
        """f and g of every image: ([B, ns, D], [B, nq, D]) for each of b and u."""
        fs, fq = embed_tasks(self.backbone, support_x, query_x)
        if self.shared_backbone:
            return (fs, fq), (fs, fq)
        return (fs, fq), embed_tasks(self.repr_backbone, support_x, query_x)

    def represent(
        self, g: torch.Tensor, fast: torch.Tensor | None, slow: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u: Q g (+ Q* g with the task's fast weights fast [B, E, D]); `slow`: Q g when the
        caller has it already."""
        r = self.repr(g) if slow is None else slow
        if fast is None:
            return r
        return r + torch.einsum("bed,bnd->bne", fast, g)

    # -- meta information ---------------------------------------------------------------
    def pair_index(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `pairs` of the n(n-1)/2 support pairs in a random order (training) or a
        fixed one (evaluation, so scores are repeatable)."""
        i, j = torch.triu_indices(n, n, offset=1)
        if self.training:
            order = torch.randperm(i.numel())
        else:
            order = torch.randperm(i.numel(), generator=torch.Generator().manual_seed(0))
        order = order[: self.pairs]
        return i[order].to(device), j[order].to(device)

    def pair_losses(self, r: torch.Tensor, y: torch.Tensor, i, j):
        """Representation losses of pairs (i, j) of one representation r [B, n, E] and labels
        y [B, n]: ([B, T] losses, [B, T] logits, [B, T] same-class targets)."""
        logit = self.pair((r[:, i] - r[:, j]).abs()).squeeze(-1)
        same = (y[:, i] == y[:, j]).to(logit.dtype)
        return F.binary_cross_entropy_with_logits(logit, same, reduction="none"), logit, same

    def pair_gradients(self, r: torch.Tensor, g: torch.Tensor, y: torch.Tensor, i, j):
        """dL_ij/dQ for every pair, in closed form, as meta information (no graph): from the
        slow representation r = Q g [B, n, E] and g [B, n, D] -> [B, T, E, D]; and the mean
        representation loss (with its graph)."""
        losses, logit, same = self.pair_losses(r, y, i, j)
        with torch.no_grad():
            # dL/dr_i = (sigmoid(logit) - same) v * sign(r_i - r_j); dL/dr_j is its negative
            dr = (torch.sigmoid(logit) - same).unsqueeze(-1) * self.pair.weight[0]
            dr = dr * (r[:, i] - r[:, j]).sign()  # [B, T, E]
            grads = dr.unsqueeze(-1) * (g[:, i] - g[:, j]).unsqueeze(-2)  # [B, T, E, D]
        return grads, losses.mean()

    def task_fast_weights(self, grads: torch.Tensor) -> torch.Tensor:
        """d: [B, T, E, D] pair gradients -> Q* [B, E, D], an LSTM over T per coordinate."""
        b, t, e, dim = grads.shape
        x = preprocess(grads.permute(1, 0, 2, 3).reshape(t, -1))  # [T, B*E*D, 2]
        state = None
        for step in x:
            state = self.d(step, state)
        return self.d_out(state[0]).view(b, e, dim)

    def example_gradients(self, f: torch.Tensor, y: torch.Tensor, way: int) -> torch.Tensor:
        """Each support example's gradient of the base learner's cross-entropy with respect
        to W, (softmax(b_W(x_i)) - onehot(y_i)) f(x_i)^T, as meta information (no graph):
        f [B, n, D], y [B, n] -> [B, n, way, D]."""
        with torch.no_grad():
            p = at_least_float32(self.head(f)[..., :way]).softmax(-1)
            err = p - F.one_hot(y, way).to(p.dtype)  # [B, n, way]
            return err.unsqueeze(-1) * f.to(p.dtype).unsqueeze(-2)

    def example_fast_weights(self, f: torch.Tensor, y: torch.Tensor, way: int) -> torch.Tensor:
        """m, per coordinate, on the preprocessed gradients: fast weights W*_i [B, n, way, D]."""
        return self.m(preprocess(self.example_gradients(f, y, way))).squeeze(-1).to(f.dtype)

    # -- the contract -------------------------------------------------------------------
    def predict(self, support_x, support_y, query_x, way=None):
        return self.forward_task(support_x, support_y, query_x, way)[0]

    def forward_task(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        self.check_way(way)
        (fs, fq), (gs, gq) = self.features(support_x, query_x)  # [B, n, D] each
        slow_keys = self.repr(gs)  # Q g of the support set: the pair loss's and the keys'
        # 1. task-level fast weights Q* from the representation loss's gradients
        i, j = self.pair_index(support_y.shape[1], support_y.device)
        if i.numel():
            pair_grads, repr_loss = self.pair_gradients(slow_keys, gs, support_y, i, j)
            fast_q = self.task_fast_weights(pair_grads)
        else:  # a single support example has no pairs: no task-level fast weights
            repr_loss, fast_q = fs.new_zeros(()), None
        # 2. example-level fast weights W*_i and the memory of representations
        memory = self.example_fast_weights(fs, support_y, way)  # [B, ns, way, D]
        keys = self.represent(gs, fast_q, slow_keys)  # [B, ns, E]
        # 3. queries: attention over the support set, then the augmented output layer
        r = self.represent(gq, fast_q)  # [B, nq, E]
        attention = (F.normalize(r, dim=-1) @ F.normalize(keys, dim=-1).transpose(1, 2)).softmax(
            -1
        )  # [B, nq, ns]
        fast_w = torch.einsum("bqs,bswd->bqwd", attention, memory)
        logits = self.head(fq)[..., :way] + torch.einsum("bqwd,bqd->bqw", fast_w, fq)
        return logits, repr_loss

    def meta_train_step(self, episodes) -> dict[str, torch.Tensor]:
        self.train()
        with self.autocast():
            logits, repr_loss = self.forward_task(
                episodes.support_x, episodes.support_y, episodes.query_x, episodes.way
            )
            task_loss = self.loss(logits, episodes.query_y)
            loss = task_loss + self.repr_weight * repr_loss
        self.outer_update(loss)
        return {
            "loss": loss.detach(),
            "task_loss": task_loss.detach(),
            "repr_loss": repr_loss.detach(),
            metric_name(episodes.query_y): task_scores(logits, episodes.query_y),
        }
