"""Feature extractors shared by the learners."""

from __future__ import annotations

import torch
from torch import nn

from metarun.data.errors import ConfigError


def conv_block(c_in: int, c_out: int, variant: str) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, then halve the resolution."""
    if variant == "maxpool":
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
    if variant == "strided":
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )
    raise ConfigError(f"unknown conv4 variant {variant!r}; choose 'maxpool' or 'strided'")


def conv4_features(image_size: int, hidden: int, variant: str) -> int:
    """Length of conv4's flattened output for square inputs of `image_size`."""
    if variant == "strided":
        return hidden  # mean-pooled over the remaining spatial positions
    side = image_size
    for _ in range(4):
        side //= 2
    if side < 1:
        raise ConfigError(
            f"image_size={image_size} is too small for 4 max-pool blocks (needs >= 16)"
        )
    return hidden * side * side


def conv4(
    in_channels: int = 1,
    hidden: int = 64,
    variant: str = "maxpool",
    out_features: int | None = None,
    image_size: int = 28,
    channels_last: bool = True,
) -> nn.Sequential:
    """The 4-block convolutional backbone of the few-shot literature.

    variant="maxpool": conv-BN-ReLU-maxpool blocks, flattened (Vinyals et al.
    2016; Snell et al. 2017). variant="strided": stride-2 convolutions and a
    spatial mean (Finn et al. 2017's Omniglot network, as in learn2learn's
    OmniglotCNN). out_features adds a linear classifier head.
    channels_last stores weights and activations as NHWC, which the CPU
    (oneDNN) and GPU convolution kernels run faster (about 1.4x measured on a
    2-core CPU); the model and its parameters are unchanged.
    Input [N, C, H, W] -> output [N, features] (or [N, out_features]).
    """
    layers = [ChannelsLast()] if channels_last else []
    layers.append(conv_block(in_channels, hidden, variant))
    layers += [conv_block(hidden, hidden, variant) for _ in range(3)]
    layers.append(nn.Flatten() if variant == "maxpool" else MeanPool())
    if out_features:
        layers.append(nn.Linear(conv4_features(image_size, hidden, variant), out_features))
    net = nn.Sequential(*layers)
    return net.to(memory_format=torch.channels_last) if channels_last else net


class ChannelsLast(nn.Module):
    """[N, C, H, W] in any layout -> the same values in channels-last (NHWC) memory layout."""

    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


class MeanPool(nn.Module):
    """[N, C, H, W] -> [N, C]: average over spatial positions."""

    def forward(self, x):
        return x.mean(dim=(-2, -1))
