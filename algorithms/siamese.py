"""Siamese networks: a learned pair-verification similarity used for few-shot classification."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.episodes import Episodes
from metarun.errors import ConfigError

from .base import MetaLearner, embed_tasks, feature_shape, infer_way

# The paper's distortion ranges (Koch et al. 2015, Sec. 4): rotation in degrees, shear,
# scale, and translation of +-2 pixels on 105x105 images, here a fraction of the side.
ROTATION_DEGREES = 10.0
SHEAR = 0.3
SCALE = (0.8, 1.2)
TRANSLATE = 2.0 / 105.0
COMPONENT_PROBABILITY = 0.5


class Siamese(MetaLearner):
    """Siamese networks (Koch, Zemel, Salakhutdinov, ICML Deep Learning Workshop 2015).

    Twin encoders with shared weights map two images to vectors h1, h2; a
    weighted L1 distance scores the pair: logit = w . |h1 - h2| + b, and
    sigmoid(logit) = p(same class). The network is trained as a verifier with
    binary cross-entropy on same/different pairs, then classifies a query by
    its most similar support example (the paper's one-shot protocol).

    Departures from the paper:
    - The encoder is whatever backbone the config gives (default conv4 on
      28x28 images, 64-d flattened features), not the paper's 4-conv network on
      105x105 images ending in a 4096-unit sigmoid layer. Feature maps are
      flattened. The head keeps a bias; default PyTorch initialisation is used
      instead of the paper's normal initialisation.
    - The optimizer is the runner's Adam at trainer.lr, not SGD with per-layer
      learning rates, a per-layer momentum schedule, per-layer L2 weight decay
      and 1% learning-rate decay per epoch.
    - Pairs are drawn online from the meta-training episodes rather than from a
      fixed set of 30k-150k pairs. Each step puts every image of the episodes
      (support and query, labels shared within a task) through the encoder
      once, then draws `pairs_per_task` pairs per task among them: the first
      half same-class (a uniform image, and a uniform other image of its
      class), the rest different-class (a uniform image, and a uniform image of
      another class of the same task). An image can be in several pairs, so
      many pairs cost little more than one. The draws use torch's global RNG
      on the episodes' device, so checkpoints capture it. Training needs
      way >= 2.
    - augment=True applies the paper's affine distortions (each of rotation,
      two shears, two scales, two translations kept with probability 0.5) to
      every image, drawn afresh each step (one distortion per image per step,
      shared by the pairs it is in), instead of 8 precomputed distortions per
      pair; translation is scaled to the image side.
    - K-shot (an extension; the paper is one-shot only): a class's logit is
      the mean of the similarity logits to its shots. For one shot this is the
      paper's rule (argmax of p over the support set).
    - Batch norm in the backbone sees all the episodes' images in one batch
      when training, and support with query when predicting in train mode.
    """

    def __init__(self, backbone: nn.Module, pairs_per_task: int = 32, augment: bool = False):
        super().__init__()
        shape = feature_shape(backbone, "the Siamese head")
        if isinstance(pairs_per_task, bool) or not isinstance(pairs_per_task, int):
            raise ConfigError(f"algo.pairs_per_task must be an integer, got {pairs_per_task!r}")
        if pairs_per_task < 2:
            raise ConfigError(
                f"algo.pairs_per_task={pairs_per_task} leaves no room for both a same-class "
                "and a different-class pair; use 2 or more (e.g. algo.pairs_per_task=32)"
            )
        self.backbone = backbone
        self.head = nn.Linear(math.prod(shape), 1)  # the weights alpha_j of the L1 distance
        self.pairs_per_task = pairs_per_task
        self.augment = augment

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, D] (feature maps flattened)."""
        return self.backbone(x).flatten(1)

    def similarity(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """Same-class logit of broadcastable [..., D] pairs -> [...]."""
        return self.head((h1 - h2).abs()).squeeze(-1)

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        h_support, h_query = embed_tasks(self.backbone, support_x, query_x)  # [B, ns|nq, D]
        # every query against every support example: [B, nq, 1, D] vs [B, 1, ns, D] -> [B, nq, ns]
        scores = self.similarity(h_query[:, :, None], h_support[:, None])
        return class_means(scores, support_y, way)

    def meta_train_step(self, episodes: Episodes) -> dict[str, torch.Tensor]:
        """One verification step on pairs drawn among the episodes' images."""
        self.train()
        check_way(episodes)
        x = torch.cat([episodes.support_x, episodes.query_x], 1)  # [B, n, C, H, W]
        y = torch.cat([episodes.support_y, episodes.query_y], 1)  # [B, n]
        first, second, same = pair_indices(y, self.pairs_per_task)  # [B, P], [B, P], [P]
        images = x.flatten(0, 1)
        if self.augment:
            images = distort(images)
        with self.autocast():
            # every image once through the encoder, then any number of pairs among them
            h = self.encode(images).unflatten(0, y.shape)  # [B, n, D]
            rows = torch.arange(y.shape[0], device=y.device)[:, None]
            logits = self.similarity(h[rows, first], h[rows, second]).flatten()  # [B*P]
            targets = same.to(torch.float32).expand(y.shape[0], -1).flatten()
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        self.outer_update(loss)
        correct = ((logits.detach() > 0) == (targets > 0.5)).float()
        return {"loss": loss.detach(), "acc": correct.view(episodes.batch_size, -1).mean(1)}


def class_means(scores: torch.Tensor, support_y: torch.Tensor, way: int) -> torch.Tensor:
    """Mean score per class over its shots: [B, nq, ns] -> [B, nq, way] (labels in any order)."""
    onehot = F.one_hot(support_y, way).to(scores.dtype)  # [B, ns, way]
    return (scores @ onehot) / onehot.sum(1)[:, None]


def check_way(episodes: Episodes) -> None:
    if episodes.way < 2:
        raise ConfigError(
            "Siamese training needs way >= 2 to draw different-class pairs; set way=5"
        )


def pair_indices(y: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of same- and different-class pairs within each task's images.

    y [B, n] are the labels of each task's images. Returns first, second [B, pairs] (indices
    into n) and same [pairs] (bool); per task, the first ceil(pairs/2) pairs are same-class.
    """
    (b, n), dev = y.shape, y.device
    same = torch.arange(pairs, device=dev) < (pairs + 1) // 2  # [P]
    first = torch.randint(n, (b, pairs), device=dev)  # [B, P]
    match = y.gather(1, first)[..., None] == y[:, None]  # [B, P, n]
    allowed = torch.where(same[:, None], match, ~match)
    allowed &= first[..., None] != torch.arange(n, device=dev)  # never an image with itself
    # the largest of iid uniform keys over the allowed images = a uniform draw among them
    # (every class has shot + query >= 2 images, so a same-class partner always exists)
    keys = torch.rand(b, pairs, n, device=dev).masked_fill(~allowed, -1.0)
    return first, keys.argmax(-1), same


def sample_pairs(episodes: Episodes, pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair images themselves: first and second [B*pairs, C, H, W] and targets [B*pairs]
    (1.0 same class, 0.0 different), drawn as in `pair_indices`."""
    check_way(episodes)
    x = torch.cat([episodes.support_x, episodes.query_x], 1)  # [B, n, C, H, W]
    y = torch.cat([episodes.support_y, episodes.query_y], 1)  # [B, n]
    first, second, same = pair_indices(y, pairs)
    rows = torch.arange(y.shape[0], device=y.device)[:, None]
    targets = same.to(x.dtype).expand(y.shape[0], -1).flatten()
    return x[rows, first].flatten(0, 1), x[rows, second].flatten(0, 1), targets


def distort(x: torch.Tensor) -> torch.Tensor:
    """The paper's random affine distortion of each image, [N, C, H, W] -> same shape.

    Rotation, x/y shear, x/y scale and x/y translation are each applied with
    probability 0.5; the draws use the global RNG on x's device.
    """
    n, dev = x.shape[0], x.device

    def draw(low, high, neutral, count=1):
        value = low + (high - low) * torch.rand(n, count, device=dev)
        keep = torch.rand(n, count, device=dev) < COMPONENT_PROBABILITY
        return torch.where(keep, value, torch.full_like(value, neutral))

    angle = draw(-1.0, 1.0, 0.0)[:, 0] * math.radians(ROTATION_DEGREES)  # [N]
    shear = draw(-SHEAR, SHEAR, 0.0, 2)  # [N, 2]
    scale = draw(*SCALE, 1.0, 2)  # [N, 2]
    shift = draw(-2 * TRANSLATE, 2 * TRANSLATE, 0.0, 2)  # [N, 2]; grid coordinates span 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
    ones = torch.ones_like(angle)
    shearing = torch.stack(
        [torch.stack([ones, shear[:, 0]], -1), torch.stack([shear[:, 1], ones], -1)], 1
    )
    forward = rotation @ shearing @ torch.diag_embed(scale)  # [N, 2, 2]: image point -> new point
    # grid_sample looks up where each output pixel came from, so it needs the inverse map
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -(inverse @ shift[..., None])], -1)  # [N, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
