"""Sinusoid regression: the toy problem of Finn, Abbeel, Levine (2017), Sec. 5.1.

A task is a sine wave y = A sin(x - b) with amplitude A uniform in [0.1, 5.0]
and phase b uniform in [0, pi]; its inputs x are uniform in [-5, 5]. The
support set has K = `shot` points and the query set `query` points, with
mean squared error as the loss. Tasks are drawn afresh, so the splits differ
only in their random streams; the fixed validation and test tasks are drawn
from `seed` as for image data sets.

Episodes use the usual container: x [B, K, 1] float, y [B, K] float targets,
and `classes` [B, 1] (one output; "way" is 1), so learners with a head of
`way` outputs predict [B, n, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from metarun.errors import ConfigError

from .episodes import Episodes, SeededSampler

SPLITS = ("train", "val", "test")
# distinct random streams per split, so validation tasks never reappear as test tasks
SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@dataclass(frozen=True)
class SinusoidTasks:
    """The task distribution; plays the part a class store plays for images."""

    split: str = "train"
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    device: torch.device = torch.device("cpu")

    def draw(self, n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """n tasks of k points: x [n, k, 1], y [n, k], amplitude and phase [n]."""
        dev = generator.device

        def uniform(shape, bounds):
            lo, hi = bounds
            return lo + (hi - lo) * torch.rand(shape, generator=generator, device=dev)

        amp, phase = uniform((n,), self.amplitude), uniform((n,), self.phase)
        x = uniform((n, k, 1), self.x_range)
        y = amp[:, None] * torch.sin(x[..., 0] - phase[:, None])
        return x.to(self.device), y.to(self.device), amp, phase

    def episode_sampler(self, way, shot, query, device, seed=0, split="", augment=None):
        return SinusoidSampler(self, way, shot, query, device, seed)

    def fixed_episodes(self, n, way, shot, query, seed=0, device="cpu", split=""):
        return FixedSinusoidEpisodes(self, n, way, shot, query, seed, device)


def sinusoid(
    split: str = "train",
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
) -> SinusoidTasks:
    """The sinusoid task distribution for `split` (the ranges are the paper's defaults)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    ranges = {"amplitude": amplitude, "phase": phase, "x_range": x_range}
    for name, bounds in ranges.items():
        if len(bounds) != 2 or not float(bounds[0]) <= float(bounds[1]):
            raise ConfigError(f"data.{name} must be [low, high] with low <= high, got {bounds}")
    return SinusoidTasks(split, *(tuple(float(b) for b in r) for r in ranges.values()))


# what the data set is, read by the config checks without building it (runners/validate.py):
# float targets scored by MSE, and vectors rather than images as inputs
sinusoid.task = "regression"
sinusoid.inputs = "vectors"


def check_regression_shape(way: int, shot: int, query: int) -> None:
    for name, value in (("shot", shot), ("query", query)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if way != 1:
        raise ConfigError(
            f"sinusoid tasks are regression with one output, so way must be 1, got way={way}; "
            "data=sinusoid sets way=1 unless the command line says otherwise"
        )


def to_episodes(x: torch.Tensor, y: torch.Tensor, shot: int) -> Episodes:
    """Split drawn points into support (the first `shot`) and query (the rest)."""
    classes = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
    return Episodes(x[:, :shot], y[:, :shot], x[:, shot:], y[:, shot:], classes)


class SinusoidSampler(SeededSampler):
    """Random sinusoid tasks; the same interface as EpisodeSampler."""

    def __init__(self, tasks: SinusoidTasks, way, shot, query, device="cpu", seed=0):
        check_regression_shape(way, shot, query)
        self.tasks = replace(tasks, device=torch.device(device))
        self.way, self.shot, self.query = way, shot, query
        self.generator = torch.Generator().manual_seed(seed + SPLIT_OFFSET[tasks.split])

    def sample(self, batch_size: int) -> Episodes:
        x, y, _, _ = self.tasks.draw(batch_size, self.shot + self.query, self.generator)
        return to_episodes(x, y, self.shot)


class FixedSinusoidEpisodes:
    """A fixed list of sinusoid tasks from a seed; the same interface as FixedEpisodes."""

    def __init__(self, tasks: SinusoidTasks, n, way, shot, query, seed=0, device="cpu"):
        check_regression_shape(way, shot, query)
        if n < 1:
            raise ConfigError(f"the number of evaluation episodes must be positive, got {n}")
        self.n, self.way, self.shot, self.query = n, way, shot, query
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed + SPLIT_OFFSET[tasks.split])
        x, y, self.amplitude, self.phase = tasks.draw(n, shot + query, gen)
        self.x, self.y = x.to(self.device), y.to(self.device)

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int) -> Iterator[Episodes]:
        for start in range(0, self.n, batch_size):
            end = min(start + batch_size, self.n)
            yield to_episodes(self.x[start:end], self.y[start:end], self.shot)
