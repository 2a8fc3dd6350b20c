"""OML (algorithms/oml.py): the trajectory is online SGD one image at a time, class after
class; meta-training through it teaches the representation; the meta-test freezes the
checkpoint's representation and trains only a zero head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import NEEDS, compose_with, learning_run
from torch import nn

from metarun.algorithms.oml import OML, OMLMeta
from metarun.errors import ConfigError
from metarun.runners import checkpoint
from metarun.runners.continual import ContinualRun


def features_net() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    net.feature_shape = (3,)
    return net


def test_the_trajectory_is_sgd_on_one_image_at_a_time_class_after_class():
    torch.manual_seed(0)
    learner = OMLMeta(features_net(), inner_lr=0.3)
    f = torch.randn(6, 3)
    y = torch.tensor([2, 0, 1, 0, 2, 1])
    w, b = learner.trajectory(f, y, way=3)
    head = nn.Linear(3, 3)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    sgd = torch.optim.SGD(head.parameters(), lr=0.3)
    for i in [1, 3, 2, 5, 0, 4]:  # class 0's images, then class 1's, then class 2's
        sgd.zero_grad()
        F.cross_entropy(head(f[i : i + 1]), y[i : i + 1]).backward()
        sgd.step()
    assert torch.allclose(w, head.weight.detach(), atol=1e-6)
    assert torch.allclose(b, head.bias.detach(), atol=1e-6)


def test_the_meta_gradient_reaches_the_representation_through_the_trajectory():
    torch.manual_seed(0)
    learner = OMLMeta(features_net(), inner_lr=0.5)
    sx, sy = torch.randn(1, 4, 1, 2, 2), torch.tensor([[0, 0, 1, 1]])
    qx, qy = torch.randn(1, 4, 1, 2, 2), torch.tensor([[0, 1, 0, 1]])
    loss = learner.loss(learner.predict(sx, sy, qx), qy)
    full = torch.autograd.grad(loss, list(learner.parameters()))
    first = OMLMeta(learner.backbone, inner_lr=0.5, first_order=True)
    loss = first.loss(first.predict(sx, sy, qx), qy)
    cut = torch.autograd.grad(loss, list(first.parameters()))
    # first order keeps only the path through the query features: a different gradient
    assert all(g.abs().sum() > 0 for g in full)
    assert not all(torch.allclose(a, b) for a, b in zip(full, cut))


def test_meta_training_teaches_the_representation():
    torch.manual_seed(0)
    learner = OMLMeta(compose_backbone(), inner_lr=0.1)
    before, after, _ = learning_run(learner, steps=40, lr=0.003)
    assert after["acc"] > before["acc"] + 0.1, (before, after)


def compose_backbone() -> nn.Module:
    from metarun.runners.build import instantiate_clean

    return instantiate_clean(compose_with("algo=oml_meta", "backbone.hidden=16").backbone)


def test_the_meta_test_trains_only_a_zero_head_on_the_checkpoints_representation(tmp_path):
    cfg = compose_with(
        *NEEDS[("algo", "oml")],
        "algo=oml",
        "logger=none",
        "device=cpu",
        "continual.scenario=class",
        "continual.tasks=3",
        "continual.classes_per_task=2",
        "continual.batch=1",
        "optimizer=sgd",
        "trainer.lr=0.1",
    )
    run = ContinualRun(cfg, tmp_path, torch.device("cpu"))
    head = run.learner.heads[0]
    assert head.out_features == 6 and head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0
    source = checkpoint.load_learner(cfg.algo.representation)
    result = run.run()
    learner = run.learner
    assert not learner.backbone.training  # frozen batch norm, even while training
    trained = learner.backbone.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in source.backbone.state_dict().items())
    assert learner.heads[0].weight.abs().sum() > 0
    assert len(result["accuracy_curve"]) == 3


def test_the_meta_test_needs_a_representation():
    with pytest.raises(ConfigError, match="set algo.representation to a checkpoint"):
        OML(features_net())
