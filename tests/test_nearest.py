"""Nearest neighbour's own mathematics; the learner contract is tests/test_contract.py's."""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.nearest import NearestNeighbour


def test_scores_are_minus_the_squared_distance_to_the_nearest_support_of_each_class():
    torch.manual_seed(0)
    learner = NearestNeighbour(nn.Flatten())  # the identity embedding: distances by hand
    support_x, query_x = torch.randn(2, 6, 1, 2, 2), torch.randn(2, 5, 1, 2, 2)
    support_y = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 1, 1, 0]])
    scores = learner.predict(support_x, support_y, query_x, 3)
    for b in range(2):
        for q in range(5):
            for c in range(3):
                nearest = min(
                    float((query_x[b, q] - support_x[b, i]).pow(2).sum())
                    for i in range(6)
                    if support_y[b, i] == c
                )
                torch.testing.assert_close(float(scores[b, q, c]), -nearest, rtol=1e-5, atol=1e-5)


def test_one_shot_is_prototypical_networks():
    """With one example per class the nearest example is the class mean."""
    from metarun.algorithms import ProtoNet

    torch.manual_seed(0)
    backbone = nn.Flatten()
    support_x, query_x = torch.randn(3, 4, 1, 3, 3), torch.randn(3, 7, 1, 3, 3)
    support_y = torch.arange(4).repeat(3, 1)
    nearest = NearestNeighbour(backbone).predict(support_x, support_y, query_x, 4)
    proto = ProtoNet(backbone).predict(support_x, support_y, query_x, 4)
    torch.testing.assert_close(nearest, proto, rtol=1e-4, atol=1e-4)
