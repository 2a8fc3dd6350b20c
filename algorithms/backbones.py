"""Feature extractors shared by the learners."""

from __future__ import annotations

import torch
from torch import nn

from metarun.data.params import NonNegativeFloat, NonNegativeInt, PositiveInt
from metarun.errors import ConfigError


def conv_block(c_in: int, c_out: int, variant: str, pool: bool = True) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, then (if pool) halve the resolution."""
    if variant == "maxpool":
        layers = [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)
    if variant == "strided":
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2 if pool else 1, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )
    raise ConfigError(f"unknown conv4 variant {variant!r}; choose 'maxpool' or 'strided'")


def conv4_feature_shape(
    image_size: int, hidden: int, variant: str, pooled_blocks: int, flatten: bool
) -> tuple[int, ...]:
    """Shape of conv4's output for one square input of `image_size`."""
    side = image_size
    for _ in range(pooled_blocks):
        side = side // 2 if variant == "maxpool" else (side + 1) // 2
    if side < 1:
        raise ConfigError(
            f"image_size={image_size} is too small for {pooled_blocks} halving blocks "
            f"(needs >= {2**pooled_blocks})"
        )
    if variant == "strided" and flatten:
        return (hidden,)  # mean-pooled over the remaining spatial positions
    return (hidden * side * side,) if flatten else (hidden, side, side)


def conv4(
    in_channels: PositiveInt = 1,
    hidden: PositiveInt = 64,
    variant: str = "maxpool",
    out_features: PositiveInt | None = None,
    image_size: PositiveInt = 28,
    channels_last: bool = True,
    pooled_blocks: NonNegativeInt = 4,
    flatten: bool = True,
) -> nn.Sequential:
    """The 4-block convolutional backbone of the few-shot literature.

    variant="maxpool": conv-BN-ReLU-maxpool blocks, flattened (Vinyals et al.
    2016; Snell et al. 2017). variant="strided": stride-2 convolutions and a
    spatial mean (Finn et al. 2017's Omniglot network, as in learn2learn's
    OmniglotCNN). out_features adds a linear classifier head.
    pooled_blocks: how many of the 4 blocks halve the resolution (the first
    ones); flatten=False returns feature maps instead of vectors (Relation
    Networks use 2 pooled blocks and feature maps).
    channels_last stores weights and activations as NHWC, which the CPU
    (oneDNN) and GPU convolution kernels run faster (about 1.4x measured on a
    2-core CPU); the model and its parameters are unchanged.
    Input [N, C, H, W] -> output [N, *net.feature_shape] (or [N, out_features]).
    The returned module carries `feature_shape`, so heads can be sized.
    """
    if not 0 <= pooled_blocks <= 4:
        raise ConfigError(f"pooled_blocks must be between 0 and 4, got {pooled_blocks}")
    shape = conv4_feature_shape(image_size, hidden, variant, pooled_blocks, flatten)
    layers = [ChannelsLast()] if channels_last else []
    layers += [
        conv_block(in_channels if i == 0 else hidden, hidden, variant, pool=i < pooled_blocks)
        for i in range(4)
    ]
    if flatten:
        layers.append(nn.Flatten() if variant == "maxpool" else MeanPool())
    if out_features:
        if not flatten:
            raise ConfigError("backbone.out_features needs backbone.flatten=true")
        layers.append(nn.Linear(shape[0], out_features))
        shape = (out_features,)
    net = nn.Sequential(*layers)
    net.feature_shape = shape
    return net.to(memory_format=torch.channels_last) if channels_last else net


class ChannelsLast(nn.Module):
    """[N, C, H, W] in any layout -> the same values in channels-last (NHWC) memory layout."""

    def forward(self, x):
        if torch._C._functorch.is_functorch_wrapped_tensor(x):  # in vmap: vmap owns the layout
            return x
        return x.contiguous(memory_format=torch.channels_last)


class MeanPool(nn.Module):
    """[N, C, H, W] -> [N, C]: average over spatial positions."""

    def forward(self, x):
        return x.mean(dim=(-2, -1))


def mlp(in_features: PositiveInt = 1, hidden: tuple[PositiveInt, ...] = (40, 40)) -> nn.Sequential:
    """Fully connected layers with ReLU: the network of Finn et al. (2017) for sinusoid
    regression has 2 hidden layers of 40. Input [N, in_features] -> [N, hidden[-1]]."""
    hidden = tuple(int(h) for h in hidden)
    if in_features < 1 or not hidden or min(hidden) < 1:
        raise ConfigError(
            f"mlp needs in_features >= 1 and positive hidden sizes, got {in_features}, {hidden}"
        )
    layers: list[nn.Module] = []
    for a, b in zip((in_features, *hidden), hidden):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers)
    net.feature_shape = (hidden[-1],)
    return net


mlp.inputs = "vectors"  # it takes feature vectors, not images (checked against the data set)


def pixels(in_channels: PositiveInt = 1, image_size: PositiveInt = 28) -> nn.Module:
    """No learned encoder: each image becomes the vector of its pixels, [N, C, H, W] ->
    [N, C*H*W] (MANN's input in Santoro et al. 2016, on 20x20 Omniglot images)."""
    if in_channels < 1 or image_size < 1:
        raise ConfigError(
            f"pixels needs positive channels and image_size, got {in_channels}, {image_size}"
        )
    net = nn.Flatten()
    net.feature_shape = (in_channels * image_size * image_size,)
    return net


def pixel_mlp(
    in_channels: PositiveInt = 1,
    image_size: PositiveInt = 28,
    hidden: tuple[PositiveInt, ...] = (312, 128),
) -> nn.Sequential:
    """Fully connected layers with ReLU on an image's pixels, [N, C, H, W] -> [N, hidden[-1]]:
    the network of the continual-learning papers on MNIST-like data (DEN, Yoon et al. 2018,
    starts from 312-128), so that fixed networks and DEN start from the same one."""
    hidden = tuple(int(h) for h in hidden)
    if in_channels < 1 or image_size < 1 or not hidden or min(hidden) < 1:
        raise ConfigError(
            "pixel_mlp needs positive in_channels, image_size and hidden sizes, got "
            f"{in_channels}, {image_size}, {hidden}"
        )
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip((in_channels * image_size * image_size, *hidden), hidden):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers)
    net.feature_shape = (hidden[-1],)
    return net


# (filters, kernel) of the four convolutions of Koch et al. (2015), Fig. 4
KOCH_CONVS = ((64, 10), (128, 7), (128, 4), (256, 4))


def koch_siamese(
    in_channels: PositiveInt = 1,
    image_size: PositiveInt = 105,
    features: PositiveInt = 4096,
    channels_last: bool = True,
) -> nn.Sequential:
    """The twin encoder of Koch, Zemel, Salakhutdinov (2015) for 105x105 images.

    conv 64@10x10, ReLU, max-pool; conv 128@7x7, ReLU, max-pool; conv 128@4x4,
    ReLU, max-pool; conv 256@4x4, ReLU; flatten (256x6x6 on 105x105 inputs);
    fully connected to `features` (4096) units with a sigmoid. Unpadded
    convolutions, no batch norm, as in the paper. The paper's initialisation
    (weights N(0, 0.01), biases N(0.5, 0.01), fully connected weights N(0, 0.2))
    is applied. Input [N, C, H, W] -> [N, features].
    """
    side, layers = image_size, [ChannelsLast()] if channels_last else []
    c_in = in_channels
    for i, (filters, kernel) in enumerate(KOCH_CONVS):
        side -= kernel - 1
        conv = nn.Conv2d(c_in, filters, kernel)
        nn.init.normal_(conv.weight, 0.0, 1e-2)
        nn.init.normal_(conv.bias, 0.5, 1e-2)
        layers += [conv, nn.ReLU(inplace=True)]
        if i < len(KOCH_CONVS) - 1:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        if side < 1:
            raise ConfigError(
                f"image_size={image_size} is too small for the Koch et al. encoder; it was "
                "designed for 105x105 images (data.images.size=105)"
            )
        c_in = filters
    fc = nn.Linear(c_in * side * side, features)
    nn.init.normal_(fc.weight, 0.0, 0.2)
    nn.init.normal_(fc.bias, 0.5, 1e-2)
    net = nn.Sequential(*layers, nn.Flatten(), fc, nn.Sigmoid())
    net.feature_shape = (features,)
    return net.to(memory_format=torch.channels_last) if channels_last else net


class ResidualBlock(nn.Module):
    """ResNet-12's block: three 3x3 conv-BN layers (leaky ReLU between them), a 1x1 conv-BN
    shortcut, leaky ReLU after the sum, then 2x2 max-pooling."""

    def __init__(self, c_in: int, c_out: int, slope: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(c_out)]
            if i < 2:
                layers.append(nn.LeakyReLU(slope))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.out = nn.Sequential(nn.LeakyReLU(slope), nn.MaxPool2d(2))

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


def resnet12(
    in_channels: PositiveInt = 3,
    channels: tuple[PositiveInt, ...] = (64, 160, 320, 640),
    image_size: PositiveInt = 84,
    pool: str = "avg",
    slope: NonNegativeFloat = 0.1,
    channels_last: bool = True,
) -> nn.Sequential:
    """ResNet-12 as in MetaOptNet (Lee et al. 2019) and TADAM (Oreshkin et al. 2018): four
    residual blocks of three 3x3 convolutions with widths (64, 160, 320, 640) (TADAM:
    (64, 128, 256, 512)), batch norm, leaky ReLU (slope 0.1), each block ending in 2x2
    max-pooling; 84x84 inputs leave 5x5 maps. pool="avg" averages them into a vector of the
    last width; pool="flatten" keeps all positions (MetaOptNet's 16000 features).
    Not included: MetaOptNet's DropBlock regularisation.
    Input [N, C, H, W] -> [N, *net.feature_shape]."""
    channels = tuple(int(c) for c in channels)
    if len(channels) != 4 or min(channels) < 1:
        raise ConfigError(f"resnet12 needs four positive widths, got {channels}")
    if pool not in ("avg", "flatten"):
        raise ConfigError(f"resnet12 pool must be 'avg' or 'flatten', got {pool!r}")
    side = image_size
    for _ in range(4):
        side //= 2
    if side < 1:
        raise ConfigError(f"image_size={image_size} is too small for resnet12 (needs >= 16)")
    layers: list[nn.Module] = [ChannelsLast()] if channels_last else []
    c_in = in_channels
    for c in channels:
        layers.append(ResidualBlock(c_in, c, slope))
        c_in = c
    layers.append(MeanPool() if pool == "avg" else nn.Flatten())
    net = nn.Sequential(*layers)
    net.feature_shape = (c_in,) if pool == "avg" else (c_in * side * side,)
    return net.to(memory_format=torch.channels_last) if channels_last else net
