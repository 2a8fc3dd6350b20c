"""Relation Network: the predict contract, the per-class sums, the MSE loss, and that it learns."""

from __future__ import annotations

import pytest
import torch
from conftest import learning_run
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from metarun.algorithms import conv4
from metarun.algorithms.relation import RelationNet, class_sums, pair_up
from metarun.errors import ConfigError
from metarun.runners.build import build_learner

BACKBONES = {
    "maps": lambda: conv4(hidden=16, pooled_blocks=2, flatten=False),  # [16, 7, 7]
    "flat": lambda: conv4(hidden=16),  # [16]
}


def tasks(batch, way, shot, query):
    support_x = torch.rand(batch, way * shot, 1, 28, 28)
    support_y = torch.arange(way).repeat_interleave(shot).expand(batch, -1)
    return support_x, support_y, torch.rand(batch, way * query, 1, 28, 28)


def identity(*feature_shape):
    """An embedding that passes inputs through, so sums and pairs can be checked by hand."""
    net = nn.Identity()
    net.feature_shape = feature_shape
    return net


@pytest.mark.parametrize("kind", BACKBONES)
def test_relation_scores_are_sigmoids_in_0_1(kind):
    torch.manual_seed(0)
    learner = RelationNet(BACKBONES[kind](), hidden=16).eval()
    support_x, support_y, query_x = tasks(3, 4, 3, 2)
    scores = learner.predict(support_x, support_y, query_x, 4)
    assert scores.min() >= 0 and scores.max() <= 1


def test_support_order_does_not_matter():
    torch.manual_seed(0)
    learner = RelationNet(BACKBONES["maps"](), hidden=16).eval()
    support_x, support_y, query_x = tasks(2, 3, 2, 2)
    perm = torch.randperm(6)
    scores = learner.predict(support_x, support_y, query_x, 3)
    shuffled = learner.predict(support_x[:, perm], support_y[:, perm], query_x, 3)
    assert torch.allclose(scores, shuffled, atol=1e-5)


def test_class_sums_add_each_class_support_embeddings():
    z = torch.tensor([[[1.0, 2.0], [10.0, 20.0], [3.0, 4.0], [5.0, 0.0]]])  # [1, 4, 2]
    y = torch.tensor([[1, 0, 1, 0]])  # unsorted labels
    # class 0: (10, 20) + (5, 0); class 1: (1, 2) + (3, 4)
    assert torch.equal(class_sums(z, y, 2), torch.tensor([[[15.0, 20.0], [4.0, 6.0]]]))
    maps = z[..., None, None].expand(1, 4, 2, 3, 3)  # the same numbers as [C=2, 3, 3] maps
    assert torch.equal(class_sums(maps, y, 2)[0, :, :, 1, 2], torch.tensor([[15, 20], [4, 6.0]]))


def test_pairs_put_the_class_sum_first_and_the_query_second():
    support_x = torch.tensor([[1.0], [2.0], [30.0]])[None]  # [1, 3, 1]: classes 0, 0, 1
    support_y = torch.tensor([[0, 0, 1]])
    query_x = torch.tensor([[7.0], [8.0]])[None]  # [1, 2, 1]
    pairs = pair_up(class_sums(support_x, support_y, 2), query_x)
    assert pairs.shape == (1, 2, 2, 2)  # [B, nq, way, 2D]
    assert torch.equal(
        pairs[0], torch.tensor([[[3.0, 7.0], [30.0, 7.0]], [[3.0, 8.0], [30.0, 8.0]]])
    )


def test_loss_is_mean_squared_error_against_one_hot_labels():
    learner = RelationNet(identity(2))
    scores = torch.tensor([[[0.9, 0.2], [0.4, 0.5]]])  # [1, nq=2, way=2]
    query_y = torch.tensor([[0, 1]])
    # targets (1, 0) and (0, 1): errors 0.1, 0.2, 0.4, 0.5
    expected = (0.01 + 0.04 + 0.16 + 0.25) / 4
    assert learner.loss(scores, query_y).item() == pytest.approx(expected)


def test_relation_module_is_sized_from_the_feature_maps():
    # 7x7 maps, padding 1: 7 -> 3 -> 1, so the first FC sees the 64 filters
    assert RelationNet(identity(16, 7, 7)).relation[3].in_features == 64
    # the authors' miniImageNet maps (19x19) with padding 0: 19 -> 8 -> 3, the paper's 64*3*3
    assert RelationNet(identity(16, 19, 19), padding=0).relation[3].in_features == 576
    with pytest.raises(ConfigError, match="too small"):
        RelationNet(identity(16, 7, 7), padding=0)
    with pytest.raises(ConfigError, match="feature_shape"):
        RelationNet(nn.Identity())


def test_relation_net_learns_on_synthetic_glyphs():
    torch.manual_seed(0)
    before, after, losses = learning_run(RelationNet(BACKBONES["maps"](), hidden=16), 60, 3e-3)
    # measured over 4 seeds: the MSE falls from about 0.19 to 0.08 (ratio 0.38-0.45), so 0.6 is
    # a wide margin; predicting 0.2 everywhere would only reach 0.16
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])
    # untrained scores are near chance (0.19-0.22), trained ones 0.88-0.91 over 4 seeds; the
    # 95% intervals are about 0.02 each on 100 episodes, so the margin is very wide
    assert after["acc"] - after["ci95"] > before["acc"] + before["ci95"], (before, after)


def test_builds_from_config_with_the_papers_embedding_module():
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="metarun.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["algo=relation", "backbone=conv4_relation"])
    learner = build_learner(cfg)
    assert isinstance(learner, RelationNet)
    assert learner.backbone.feature_shape == (64, 7, 7)
    assert learner.relation[3].in_features == 64  # conv blocks, then the 8-unit FC
    support_x, support_y, query_x = tasks(1, 5, 1, 1)
    scores = learner.eval().predict(support_x, support_y, query_x, 5)
    assert scores.shape == (1, 5, 5)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_split_first_layer_equals_the_module_on_concatenated_pairs(kind, mode):
    """predict never builds the [class; query] pairs; the scores must be the same as if it did."""
    torch.manual_seed(0)
    learner = RelationNet(BACKBONES[kind]()).double()
    getattr(learner, mode)()
    support_x, support_y, query_x = (
        t.double() if t.is_floating_point() else t for t in tasks(2, 4, 2, 3)
    )
    scores = learner.predict(support_x, support_y, query_x, 4)
    z_support = learner.backbone(support_x.flatten(0, 1)).unflatten(0, (2, 8))
    z_query = learner.backbone(query_x.flatten(0, 1)).unflatten(0, (2, 12))
    if mode == "train":  # batch norm statistics must cover the same batch as in predict
        z = learner.backbone(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))
        z_support, z_query = z[:16].unflatten(0, (2, 8)), z[16:].unflatten(0, (2, 12))
    pairs = pair_up(class_sums(z_support, support_y, 4), z_query)  # [2, 12, 4, 2C, ...]
    expected = learner.relation(pairs.flatten(0, 2)).view(2, 12, 4)
    torch.testing.assert_close(scores, expected)
