"""MAML's two formulations, task after task and vmap over tasks, agree with each other and
with finite differences, including through batch norm's second derivative."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metarun.algorithms import MAML, conv4
from metarun.algorithms.backbones import MeanPool
from metarun.algorithms.base import BatchStatisticsNorm
from metarun.data import Episodes
from metarun.data.errors import ConfigError


def batch(b=3, way=3, shot=1, query=2, seed=0, dtype=torch.float64) -> Episodes:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(way)
    return Episodes(
        torch.rand(b, way * shot, 1, 12, 12, generator=g, dtype=dtype),
        labels.repeat_interleave(shot).expand(b, -1).contiguous(),
        torch.rand(b, way * query, 1, 12, 12, generator=g, dtype=dtype),
        labels.repeat_interleave(query).expand(b, -1).contiguous(),
        labels.expand(b, -1).contiguous(),
    )


def smooth_bn_net() -> nn.Module:
    """Conv, batch norm, tanh: smooth, so central differences are accurate."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        MeanPool(),
    )
    net.feature_shape = (4,)
    return net


def meta_loss(learner, ep):
    return learner.loss(learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way), ep.query_y)


def meta_grads(learner, ep):
    learner.train()
    learner.zero_grad(set_to_none=True)
    meta_loss(learner, ep).backward()
    return [p.grad.clone() for p in learner.parameters()]


VARIANTS = {
    "maml": {},
    "maml_2_steps": {"inner_steps": 2},
    "fomaml": {"first_order": True},
    "metasgd": {"learn_inner_lr": True},
    "anil": {"adapt": "head"},
}


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_vmap_and_loop_agree_on_logits_and_meta_gradients(kw):
    torch.manual_seed(0)
    loop = MAML(conv4(hidden=8, variant="strided"), 3, batched="loop", **kw).double()
    vmap = copy.deepcopy(loop)
    vmap.batched = "vmap"
    ep = batch()
    for a, b in zip(meta_grads(loop, ep), meta_grads(vmap, ep), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    loop.eval(), vmap.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loop.predict(ep.support_x, ep.support_y, ep.query_x, 3),
            vmap.predict(ep.support_x, ep.support_y, ep.query_x, 3),
        )


@pytest.mark.parametrize("batched", ["loop", "vmap"])
def test_second_order_through_batch_norm_matches_finite_differences(batched):
    """A directional derivative of the meta-loss against a central difference (float64).
    Before batch norm was written out, vmap got this wrong by about 0.2% (F.batch_norm's
    double backward under vmap)."""
    torch.manual_seed(0)
    learner = MAML(smooth_bn_net(), 3, inner_steps=2, inner_lr=0.4, batched=batched).double()
    assert sum(isinstance(m, BatchStatisticsNorm) for m in learner.modules()) == 2
    ep = batch()
    direction = [torch.randn_like(p) for p in learner.parameters()]
    analytic = sum((g * d).sum() for g, d in zip(meta_grads(learner, ep), direction))
    base = [p.detach().clone() for p in learner.parameters()]
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, p0, d in zip(learner.parameters(), base, direction):
                p.copy_(p0 + sign * 1e-6 * d)
            values.append(meta_loss(learner, ep))
    numeric = (values[0] - values[1]) / 2e-6
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_batch_statistics_norm_equals_batch_norm_in_training_mode():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    x = torch.randn(6, 4, 5, 5)
    expected = bn.train()(x)
    norm = BatchStatisticsNorm(bn)
    torch.testing.assert_close(norm(x), expected)
    # the written-out form, used inside torch.func transforms
    written = torch.func.vmap(norm)(x[None])[0]
    torch.testing.assert_close(written, expected)


def test_vmap_with_running_statistics_is_refused():
    with pytest.raises(ConfigError, match="batched=loop"):
        MAML(conv4(hidden=8, variant="strided"), 3, batched="vmap", batch_norm="running")
    with pytest.raises(ConfigError, match="algo.batched"):
        MAML(conv4(hidden=8, variant="strided"), 3, batched="sometimes")
