"""Relation Networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.params import NonNegativeInt, PositiveInt
from metarun.errors import ConfigError

from .base import MetaLearner, embed_tasks, feature_shape, infer_way


class RelationNet(MetaLearner):
    """Relation Network (Sung, Yang, Zhang, Xiang, Torr, Hospedales, CVPR 2018,
    "Learning to Compare: Relation Network for Few-Shot Learning").

    The backbone is the embedding module. Support embeddings are summed per
    class (the paper's K-shot rule; 1-shot: the one embedding); each class
    sum is concatenated with each query's embedding along channels and the
    relation module maps the pair to a relation score in [0, 1]. Training
    regresses the scores onto one-hot targets with a mean squared error, as
    in the paper. So for this learner `predict` returns scores in [0, 1],
    not logits: their argmax is the prediction, and `loss` is the MSE.

    Relation module for feature-map backbones (backbone=conv4_relation,
    [64, 7, 7] on 28x28 images), as in the paper: 2 x (3x3 conv with
    `hidden` filters, batch norm, ReLU, 2x2 max-pool), flatten, FC to
    `fc_hidden` (8) with ReLU, FC to 1, sigmoid. The first FC is sized from
    `backbone.feature_shape`.

    The relation module's first convolution acts on the concatenation
    [class, query], so it is split into a class part and a query part computed
    once each and added per pair (`first_layer_of_pairs`): the same function
    and parameters, without the per-pair concatenation.

    Departures from the paper:
    - Convolution padding: `padding=1` (default) in the relation module, as
      the authors' Omniglot code does (7x7 -> 3x3 -> 1x1 here); the authors'
      miniImageNet code uses padding 0 (19x19 -> 3x3), available as
      `padding=0` for larger maps. The embedding module is this project's
      conv4 (padding 1 everywhere, so 28x28 gives 7x7 maps, not the
      authors' 5x5 from unpadded first convolutions).
    - Flat backbones (the default conv4, vectors [D]): the relation module is
      an MLP on the concatenated vectors, 2D -> hidden -> fc_hidden -> 1
      (ReLU, sigmoid at the end); the paper always compares feature maps.
    - Optimiser: the runner's Adam at trainer.lr with its schedule; the paper
      uses Adam at 1e-3 halved every 100k episodes, and the authors' code
      also clips each module's gradient norm at 0.5 (not done here) and uses
      its own weight initialisation (PyTorch defaults here).
    - The loss is the mean, not the sum, of squared errors over all
      (query, class) pairs of all tasks: a constant scale only.
    - Support and query images go through the backbone in one batch, so in
      training mode batch norm statistics cover both; evaluation uses
      running statistics.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden: PositiveInt = 64,
        fc_hidden: PositiveInt = 8,
        padding: NonNegativeInt = 1,
    ):
        super().__init__()
        shape = feature_shape(backbone, "the relation learner")
        self.backbone = backbone
        self.relation = relation_module(shape, hidden, fc_hidden, padding)

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        b, n_query = query_x.shape[0], query_x.shape[1]
        z_support, z_query = embed_tasks(self.backbone, support_x, query_x, flatten=False)
        z_class = class_sums(z_support, support_y, way)  # [B, way, *S]
        first = first_layer_of_pairs(self.relation[0], z_class, z_query)  # [B*nq*way, hidden, ...]
        scores = self.relation[1:](first)  # [B*nq*way, 1]
        return scores.view(b, n_query, way)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """The relation scores are already in [0, 1]; a softmax would flatten them."""
        return logits.float()

    def loss(self, logits: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Mean squared error between relation scores [B, nq, way] and one-hot labels [B, nq]."""
        target = F.one_hot(query_y, logits.shape[-1]).float()
        return F.mse_loss(logits.float(), target)


def class_sums(z_support: torch.Tensor, support_y: torch.Tensor, way: int) -> torch.Tensor:
    """Per-class sums of support embeddings: [B, ns, *S] -> [B, way, *S].

    A one-hot matrix product, so the labels may come in any order.
    """
    onehot = F.one_hot(support_y, way).to(z_support.dtype)  # [B, ns, way]
    sums = onehot.transpose(1, 2) @ z_support.flatten(2)  # [B, way, prod(S)]
    return sums.unflatten(2, z_support.shape[2:])


def first_layer_of_pairs(layer: nn.Module, z_class: torch.Tensor, z_query: torch.Tensor):
    """The relation module's first layer on every (query, class) pair, without building pairs.

    That layer begins with a convolution (or, for vectors, a linear map) of the
    concatenation [class, query], which is linear in it: W [c; q] + b = W_c c + b + W_q q.
    So it runs once per class and once per query and the two are broadcast-added for
    every pair, instead of once per pair on a concatenated copy: the same function and
    parameters as `layer(pair_up(z_class, z_query))`, with far fewer operations and no
    [B, nq, way, 2C, ...] tensor. Returns [B*nq*way, ...], the input of the next layer.
    """
    b, way, n_query, c = z_class.shape[0], z_class.shape[1], z_query.shape[1], z_class.shape[2]
    if isinstance(layer, nn.Linear):  # flat features: the MLP's first layer alone
        op, rest = layer, []
    else:  # relation_block: conv, batch norm, ReLU, max-pool
        op, rest = layer[0], list(layer[1:])
    w_class, w_query = op.weight[:, :c], op.weight[:, c:]
    if isinstance(op, nn.Conv2d):
        kw = {"stride": op.stride, "padding": op.padding}
        from_class = F.conv2d(z_class.flatten(0, 1), w_class, op.bias, **kw)
        from_query = F.conv2d(z_query.flatten(0, 1), w_query, None, **kw)
    else:
        from_class = F.linear(z_class.flatten(0, 1), w_class, op.bias)
        from_query = F.linear(z_query.flatten(0, 1), w_query)
    rest_shape = from_class.shape[1:]
    pre = from_class.view(b, 1, way, *rest_shape) + from_query.view(b, n_query, 1, *rest_shape)
    out = pre.flatten(0, 2)  # [B*nq*way, hidden, ...]
    for module in rest:
        out = module(out)
    return out


def pair_up(z_class: torch.Tensor, z_query: torch.Tensor) -> torch.Tensor:
    """Every (query, class) pair, class features first, concatenated along channels.

    [B, way, C, *rest] and [B, nq, C, *rest] -> [B, nq, way, 2C, *rest].
    """
    b, way, n_query = z_class.shape[0], z_class.shape[1], z_query.shape[1]
    rest = z_class.shape[2:]
    classes = z_class[:, None].expand(b, n_query, way, *rest)
    queries = z_query[:, :, None].expand(b, n_query, way, *rest)
    return torch.cat([classes, queries], dim=3)


def relation_module(shape: tuple[int, ...], hidden: int, fc_hidden: int, padding: int):
    """The learned comparison: a pair [N, 2C, h, w] (or [N, 2D]) -> scores [N, 1] in [0, 1]."""
    head = [nn.ReLU(inplace=True), nn.Linear(fc_hidden, 1), nn.Sigmoid()]
    if len(shape) == 1:  # flat vectors: an MLP stands in for the convolutions
        d = shape[0]
        return nn.Sequential(
            nn.Linear(2 * d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, fc_hidden), *head
        )
    if len(shape) != 3:
        raise ConfigError(f"backbone feature_shape {shape} is neither [D] nor [C, h, w]")
    if padding < 0:
        raise ConfigError(f"algo.padding must be 0 or more, got {padding}")
    c, h, w = shape
    out_h, out_w = conv_output_side(h, padding), conv_output_side(w, padding)
    if min(out_h, out_w) < 1:
        raise ConfigError(
            f"backbone feature maps {h}x{w} are too small for the relation module's two "
            f"conv+pool blocks with padding={padding}; use algo.padding=1, or a backbone with "
            "fewer pooled blocks (backbone.pooled_blocks)"
        )
    return nn.Sequential(
        relation_block(2 * c, hidden, padding),
        relation_block(hidden, hidden, padding),
        nn.Flatten(),
        nn.Linear(hidden * out_h * out_w, fc_hidden),
        *head,
    )


def relation_block(c_in: int, c_out: int, padding: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, 2x2 max-pool (the paper's relation-module block)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=padding),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def conv_output_side(side: int, padding: int) -> int:
    """Side length after two relation blocks (3x3 conv, then a floor-halving pool)."""
    for _ in range(2):
        side = (side + 2 * padding - 2) // 2
    return side
