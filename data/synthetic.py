"""A built-in few-shot data set of procedurally drawn glyphs (no download).

Each class is a random glyph: 2 to 4 quadratic Bezier strokes. Each instance
of a class is that glyph with its control points jittered, then rotated,
scaled and shifted a little, and rendered anti-aliased. Everything follows
from `seed`, so two machines build the same images.
"""

from __future__ import annotations

import math

import torch

from metarun.errors import ConfigError

from .images import INK_28, Preprocess
from .params import NonNegativeInt, PositiveInt, Rotations
from .store import ClassStore, cached_store

SPLITS = ("train", "val", "test")
POINTS_PER_STROKE = 24


def synthetic(
    split: str = "train",
    *,
    classes: tuple[PositiveInt, PositiveInt, PositiveInt] = (200, 50, 50),
    samples: PositiveInt = 20,
    images: Preprocess = INK_28,
    seed: NonNegativeInt = 0,
    rotations: Rotations = 1,
) -> ClassStore:
    """The `split` part of the synthetic glyph set as a ClassStore.

    classes: how many classes in train, val and test (disjoint glyphs).
    samples: instances per class.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    # drawn as white ink on black, as an inverted scan (mode=predict inverts files likewise)
    image_size = images.fixed("synthetic", channels=1, invert=True)
    classes = tuple(int(c) for c in classes)
    if len(classes) != 3 or min(classes) < 1 or samples < 1:
        raise ConfigError(
            f"synthetic needs 3 positive class counts and samples>=1, got {classes}, {samples}"
        )
    key = {"classes": classes, "samples": samples, "size": image_size, "seed": seed, "v": 1}
    full = cached_store("synthetic", key, lambda: _build(sum(classes), samples, image_size, seed))
    start = sum(classes[: SPLITS.index(split)])
    return full.select(
        list(range(start, start + classes[SPLITS.index(split)])), rotations=rotations
    )


def _build(n_classes: int, samples: int, size: int, seed: int) -> ClassStore:
    gen = torch.Generator().manual_seed(seed)
    per_class = [_render(_instances(_glyph(gen), samples, gen), size) for _ in range(n_classes)]
    names = [f"glyph{i:04d}" for i in range(n_classes)]
    return ClassStore.from_classes(per_class, names)


def _glyph(gen: torch.Generator) -> torch.Tensor:
    """Control points of one class: [4 strokes, 3 points, 2] in [0.15, 0.85].

    Glyphs with fewer than 4 strokes repeat a stroke, which draws nothing new.
    """
    n_strokes = int(torch.randint(2, 5, (1,), generator=gen))
    ctrl = 0.15 + 0.7 * torch.rand(n_strokes, 3, 2, generator=gen)
    return ctrl[torch.arange(4) % n_strokes]


def _instances(ctrl: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Jittered copies of a glyph as point clouds [n, 4 * POINTS_PER_STROKE, 2]."""
    pts = ctrl[None] + 0.035 * torch.randn(n, *ctrl.shape, generator=gen)  # [n, 4, 3, 2]
    t = torch.linspace(0, 1, POINTS_PER_STROKE)[:, None]  # [P, 1]
    p0, p1, p2 = pts[:, :, 0, None], pts[:, :, 1, None], pts[:, :, 2, None]  # [n, 4, 1, 2]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # [n, 4, P, 2]
    curve = curve.reshape(n, -1, 2) - 0.5
    angle = (torch.rand(n, generator=gen) - 0.5) * (2 * math.radians(12))
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = 0.06 * (torch.rand(n, 1, 2, generator=gen) - 0.5) * 2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    return curve @ rot.transpose(1, 2) + 0.5 + shift


def _render(points: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased strokes: uint8 [n, 1, size, size], ink = 255 on 0."""
    axis = (torch.arange(size) + 0.5) / size
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(
        -1, 2
    )  # [size*size, 2]
    dist = torch.cdist(grid[None].expand(len(points), -1, -1), points).amin(-1)  # [n, size*size]
    half_width, soft = 1.1 / size, 0.8 / size
    ink = ((half_width + soft - dist) / soft).clamp(0, 1)
    return (ink * 255).round().to(torch.uint8).reshape(-1, 1, size, size)
