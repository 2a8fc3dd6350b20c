"""ProtoNet: the predict contract, the prototype arithmetic, and that it learns."""

from __future__ import annotations

import pytest
import torch
from conftest import learning_run
from torch import nn

from metarun.algorithms import ProtoNet, conv4
from metarun.runners.evaluate import mean_ci95


def test_logits_are_negative_squared_distances_to_class_means():
    learner = ProtoNet(nn.Flatten())  # identity embedding makes the arithmetic visible
    support_x = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]], [[10.0, 10.0]]])[None]  # [1, 3, 1, 2]
    support_y = torch.tensor([[0, 0, 1]])
    query_x = torch.tensor([[[1.0, 1.0]]])[None]
    logits = learner.predict(support_x, support_y, query_x, 2)
    # prototypes (1, 0) and (10, 10); distances 1 and 81 + 81
    assert torch.allclose(logits, torch.tensor([[[-1.0, -162.0]]]))
    cosine = ProtoNet(nn.Flatten(), distance="cosine").predict(support_x, support_y, query_x, 2)
    assert cosine[0, 0, 1] > cosine[0, 0, 0]  # (1,1) points along (10,10)


def test_protonet_learns_on_synthetic_glyphs():
    torch.manual_seed(0)
    before, after, losses = learning_run(ProtoNet(conv4()), 60, 1e-3)
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])
    # random conv features already beat chance (0.2) on glyphs; training must add a clear margin
    # beyond both 95% intervals (about 0.05 each on 100 episodes)
    assert after["acc"] - after["ci95"] > before["acc"] + before["ci95"], (before, after)


def test_mean_ci95_matches_the_textbook_formula():
    values = torch.tensor([0.5, 0.7, 0.9, 0.6])
    mean, ci = mean_ci95(values)
    assert mean == pytest.approx(0.675)
    assert ci == pytest.approx(1.96 * values.std(unbiased=True).item() / 2)


def test_protonet_accepts_feature_map_backbones():
    """Channels-last feature maps [N, C, h, w] are flattened into prototypes too."""
    learner = ProtoNet(conv4(hidden=8, pooled_blocks=2, flatten=False)).eval()
    support_y = torch.arange(3).repeat_interleave(2)[None].expand(2, -1)
    logits = learner.predict(torch.rand(2, 6, 1, 28, 28), support_y, torch.rand(2, 4, 1, 28, 28), 3)
    assert logits.shape == (2, 4, 3)
