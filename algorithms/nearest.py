"""Nearest-neighbour classification in a learned embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MetaLearner, embed_tasks, infer_way


class NearestNeighbour(MetaLearner):
    """Scores a query by minus its squared distance to the nearest support example of
    each class; the backbone is meta-trained with cross-entropy on these scores."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        z_support, z_query = embed_tasks(self.backbone, support_x, query_x)  # [B, n, D]
        d = torch.cdist(z_query, z_support).pow(2)  # [B, nq, ns]
        mask = F.one_hot(support_y, way).bool()  # [B, ns, way]
        d = d[..., None].masked_fill(~mask[:, None], float("inf"))  # [B, nq, ns, way]
        return -d.amin(2)  # [B, nq, way]
