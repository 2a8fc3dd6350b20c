"""Backbones: the output shape they announce is the shape they produce."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms import conv4
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
