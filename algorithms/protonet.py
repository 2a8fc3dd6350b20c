"""Prototypical Networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.errors import ConfigError

from .base import MetaLearner, embed_tasks, infer_way


class ProtoNet(MetaLearner):
    """Prototypical Networks (Snell, Swersky, Zemel, NeurIPS 2017).

    Each class's prototype is the mean embedding of its support examples; a
    query's logits are negative squared Euclidean distances to the
    prototypes. Trained episodically with cross-entropy and Adam, as in the
    paper. Departure: support and query images go through the backbone in one
    batch, so in training mode batch norm statistics cover both (the same
    choice as the authors' code); evaluation uses running statistics.
    distance="cosine" is offered as a variant, not the paper's default.
    """

    def __init__(self, backbone: nn.Module, distance: str = "sqeuclidean"):
        super().__init__()
        if distance not in ("sqeuclidean", "cosine"):
            raise ConfigError(f"unknown distance {distance!r}; choose 'sqeuclidean' or 'cosine'")
        self.backbone = backbone
        self.distance = distance

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        z_support, z_query = embed_tasks(self.backbone, support_x, query_x)  # [B, ns|nq, D]
        return -self.distances(z_query, prototypes(z_support, support_y, way))

    def distances(self, z_query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """[B, nq, D] x [B, way, D] -> [B, nq, way]."""
        if self.distance == "cosine":
            return -F.normalize(z_query, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2)
        return (z_query[:, :, None] - protos[:, None]).pow(2).sum(-1)


def prototypes(z_support: torch.Tensor, support_y: torch.Tensor, way: int) -> torch.Tensor:
    """Class means of support embeddings: [B, ns, D] -> [B, way, D]."""
    onehot = F.one_hot(support_y, way).to(z_support.dtype)  # [B, ns, way]
    sums = onehot.transpose(1, 2) @ z_support  # [B, way, D]
    return sums / onehot.sum(1)[..., None]
