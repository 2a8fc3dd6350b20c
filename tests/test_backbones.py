"""Backbones: the output shape they announce is the shape they produce."""

from __future__ import annotations

import pytest
import torch
from conftest import configure

from metarun.algorithms import Siamese, conv4, koch_siamese
from metarun.data import ConfigError


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        ({}, (64,)),
        ({"image_size": 84}, (1600,)),
        ({"variant": "strided"}, (64,)),
        ({"pooled_blocks": 2, "flatten": False}, (64, 7, 7)),
        ({"out_features": 5, "hidden": 32}, (5,)),
        ({"channels_last": False, "in_channels": 3, "image_size": 32}, (256,)),
    ],
)
def test_conv4_feature_shape(kwargs, shape):
    net = conv4(**kwargs)
    side, channels = kwargs.get("image_size", 28), kwargs.get("in_channels", 1)
    out = net(torch.rand(3, channels, side, side))
    assert net.feature_shape == shape and tuple(out.shape) == (3, *shape)


def test_conv4_refuses_images_too_small_for_its_pooling():
    with pytest.raises(ConfigError, match="too small"):
        conv4(image_size=8)


def test_koch_encoder_matches_the_paper_on_105x105_images():
    net = koch_siamese(features=32)  # 4096 in the paper; fewer units keep the test light
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [
        (64, 10),
        (128, 7),
        (128, 4),
        (256, 4),
    ]
    assert net[-2].in_features == 256 * 6 * 6  # 105 -> 96 -> 48 -> 42 -> 21 -> 18 -> 9 -> 6
    out = net(torch.rand(2, 1, 105, 105))
    assert net.feature_shape == (32,) and tuple(out.shape) == (2, 32)
    assert ((out >= 0) & (out <= 1)).all()  # sigmoid units (the paper's wide init saturates some)
    logits = (
        Siamese(net)
        .eval()
        .predict(
            torch.rand(2, 3, 1, 105, 105),
            torch.tensor([[0, 1, 2]] * 2),
            torch.rand(2, 4, 1, 105, 105),
        )
    )
    assert tuple(logits.shape) == (2, 4, 3)


def test_koch_encoder_refuses_small_images_and_names_the_fix():
    with pytest.raises(ConfigError, match="data.images.size=105"):
        koch_siamese(image_size=28)


def test_resnet12_shapes_at_84_and_its_widths():
    from metarun.algorithms.backbones import resnet12

    net = resnet12(3, (4, 6, 8, 10), image_size=84, pool="flatten").eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 84, 84))
    assert net.feature_shape == (10 * 5 * 5,) and out.shape == (2, 250)
    avg = resnet12(1, (4, 6, 8, 10), image_size=32)
    assert avg.feature_shape == (10,) and avg(torch.rand(3, 1, 32, 32)).shape == (3, 10)
    full = resnet12()
    widths = [m.out_channels for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths[:4] == [64, 64, 64, 64] and widths[-1] == 640  # 3 convs + shortcut per block
    assert full.feature_shape == (640,)
    with pytest.raises(ConfigError, match="too small"):
        resnet12(image_size=8)
    with pytest.raises(ConfigError, match="pool"):
        resnet12(pool="max")


def test_every_learner_family_runs_on_resnet12():
    from metarun.algorithms import MAML, ProtoNet, resnet12
    from metarun.data import Episodes

    ep = Episodes(
        torch.rand(2, 3, 3, 16, 16),
        torch.arange(3).repeat(2, 1),
        torch.rand(2, 6, 3, 16, 16),
        torch.arange(3).repeat_interleave(2).repeat(2, 1),
        torch.arange(3).repeat(2, 1),
    )
    for learner in (
        ProtoNet(resnet12(3, (4, 4, 8, 8), image_size=16)),
        MAML(resnet12(3, (4, 4, 8, 8), image_size=16), way=3, inner_lr=0.1),
    ):
        configure(learner, 1e-3)
        metrics = learner.meta_train_step(ep)
        assert torch.isfinite(metrics["loss"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo",
    ["protonet", "siamese", "matching", "relation", "maml", "anil", "reptile", "imaml", "mann"],
)
def test_every_learner_trains_and_predicts_on_resnet12(algo):
    from conftest import compose_with

    from metarun.data import Episodes
    from metarun.runners.build import build_learner

    cfg = compose_with(
        f"algo={algo}", "backbone=resnet12", "backbone.channels=[4,4,8,8]", "data.images.size=16"
    )
    torch.manual_seed(0)
    learner = build_learner(cfg)
    configure(learner, 1e-3)
    ep = Episodes(
        torch.rand(2, 5, 1, 16, 16),
        torch.arange(5).repeat(2, 1),
        torch.rand(2, 10, 1, 16, 16),
        torch.arange(5).repeat(2).repeat(2, 1),
        torch.arange(5).repeat(2, 1),
    )
    assert torch.isfinite(learner.meta_train_step(ep)["loss"])
    with torch.no_grad():
        logits = learner.eval().predict(ep.support_x, ep.support_y, ep.query_x, 5)
    assert logits.shape == (2, 10, 5)
