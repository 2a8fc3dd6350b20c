"""Episodes: the one place where tasks are sampled and split into support/query.

Sampling is tensor indexing on the store's device with a seeded
`torch.Generator`: no per-image Python, no PIL in the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import partial

import torch

from metarun.errors import ConfigError

from .augment import random_affine, random_mirror, random_shift
from .store import ClassStore, rotate


@dataclass(frozen=True)
class Episodes:
    """A meta-batch of B tasks, already on the device."""

    support_x: torch.Tensor  # [B, way*shot, C, H, W] float
    support_y: torch.Tensor  # [B, way*shot] int64 in 0..way-1
    query_x: torch.Tensor  # [B, way*query, C, H, W]
    query_y: torch.Tensor  # [B, way*query]
    classes: torch.Tensor  # [B, way] global class ids behind labels 0..way-1

    @property
    def way(self) -> int:
        return self.classes.shape[1]

    @property
    def batch_size(self) -> int:
        return self.classes.shape[0]

    def to(self, device) -> Episodes:
        return Episodes(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, idx) -> Episodes:
        """Slice along the task dimension (keeps the batch dim)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Episodes(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def check_episode_shape(
    store: ClassStore, way: int, shot: int, query: int, split: str = ""
) -> None:
    """Raise a clear error when a split cannot supply the requested episodes."""
    where = f" in the {split!r} split" if split else ""
    for name, value in (("way", way), ("shot", shot), ("query", query)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if way > store.num_classes:
        raise ConfigError(
            f"way={way} is larger than the {store.num_classes} classes{where}; "
            f"use way<={store.num_classes} or a data set with more classes."
        )
    if shot + query > store.min_samples:
        smallest = int(store.counts.argmin()) if store.names else None
        named = f" ({store.names[smallest]!r})" if smallest is not None else ""
        raise ConfigError(
            f"shot+query={shot + query} (shot={shot}, query={query}) is larger than the "
            f"{store.min_samples} samples of the smallest class{named}{where}; lower shot or "
            "query, or give that class more images."
        )


def sample_indices(
    counts: torch.Tensor,
    rotations: int,
    n: int,
    way: int,
    k: int,
    generator: torch.Generator,
    s_max: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n tasks of `way` classes with k distinct samples each.

    counts: [n_base] images per base class, on the generator's device.
    s_max: counts.max(), passed in to avoid a host sync per draw on CUDA.
    Returns global class ids [n, way] and sample ids [n, way, k] on that device.
    """
    dev, n_base = counts.device, len(counts)
    # classes: the `way` largest of iid uniform keys = a uniform draw without replacement
    # (topk, not a full argsort: ~5x cheaper for Omniglot's ~1000 classes)
    keys = torch.rand(n, n_base * rotations, generator=generator, device=dev)
    classes = keys.topk(way, dim=1).indices
    class_counts = counts[classes % n_base]  # [n, way]
    s_max = int(counts.max()) if s_max is None else s_max
    # samples: likewise k of each class's own images; slots past a class's count never win
    keys = torch.rand(n, way, s_max, generator=generator, device=dev)
    keys = keys.masked_fill(torch.arange(s_max, device=dev) >= class_counts[..., None], -1.0)
    return classes, keys.topk(k, dim=-1).indices


def gather(
    store: ClassStore,
    classes: torch.Tensor,
    samples: torch.Tensor,
    shot: int,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Episodes:
    """Turn index tensors into an Episodes batch (the support/query split).

    augment, if given, maps the float images [tasks, way, k, C, H, W] to new ones (training
    only; see train_augmentation).
    """
    n, way, k = samples.shape
    base, rot = classes % store.n_base, classes // store.n_base
    rows = store.offsets[base][..., None] + samples  # [n, way, k]
    x = store.images[rows]  # [n, way, k, C, H, W] uint8
    x = rotate(x, rot[..., None], store.rotations)  # one rotation per class, broadcast over k
    x = x.float().div_(255.0)
    shape = x.shape[3:]
    if augment is not None:
        x = augment(x)
    labels = torch.arange(way, device=store.device)[None, :, None].expand(n, way, k)
    support_x = x[:, :, :shot].reshape(n, way * shot, *shape)
    query_x = x[:, :, shot:].reshape(n, way * (k - shot), *shape)
    support_y = labels[:, :, :shot].reshape(n, way * shot)
    query_y = labels[:, :, shot:].reshape(n, way * (k - shot))
    return Episodes(support_x, support_y, query_x, query_y, classes)


# per-image augmentations, in the order they apply; "mirror" works on whole classes
PER_IMAGE = {"affine": random_affine, "shift": random_shift}
AUGMENTATIONS = (*PER_IMAGE, "mirror")


def train_augmentation(
    augment: str | Sequence[str] | None, generator: torch.Generator, episodes: bool = True
):
    """trainer.augment as a function of float images [..., C, H, W] drawing from `generator`
    (None: no augmentation); a ConfigError for an unknown name.

    augment: one name or several (a list, or names joined by "+"), applied in this order:
    "mirror" mirrors each class of an episode at random (images [tasks, way, k, C, H, W]; a
    new class, so episodes only), then per image "affine" (small rotation, scale and
    shift) and "shift" (whole-pixel shift)."""
    if augment is None:
        return None
    names = augment.split("+") if isinstance(augment, str) else [str(a) for a in augment]
    for name in names:
        if name not in AUGMENTATIONS:
            raise ConfigError(
                f"unknown augmentation {name!r}; use null, one of {', '.join(AUGMENTATIONS)}, "
                "or several joined by '+' (e.g. mirror+shift)"
            )
    if "mirror" in names and not episodes:
        raise ConfigError(
            "trainer.augment=mirror turns a class into a new one (its mirror image), which needs "
            "episodes with their own labels; this learner trains on plain labelled batches: "
            "use trainer.augment=shift or affine"
        )
    per_image = [
        partial(fn, generator=generator) for name, fn in PER_IMAGE.items() if name in names
    ]

    def apply(x: torch.Tensor) -> torch.Tensor:
        if "mirror" in names:
            x = random_mirror(x, generator)
        flat = x.reshape(-1, *x.shape[-3:])
        for fn in per_image:
            flat = fn(flat)
        return flat.reshape(x.shape)

    return apply


class SeededSampler:
    """A training sampler whose draws all come from `self.generator`: its state is the
    generator's, saved in checkpoints so that a resumed run draws what the whole run would."""

    generator: torch.Generator

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class EpisodeSampler(SeededSampler):
    """Random N-way K-shot tasks from a class store, on the store's device.

    >>> tasks = EpisodeSampler(store, way=5, shot=1, query=15, device="cpu", seed=0)
    >>> episodes = tasks.sample(32)   # Episodes with B=32
    """

    def __init__(
        self,
        store: ClassStore,
        way: int,
        shot: int,
        query: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        split: str = "",
        augment: str | None = None,
    ):
        check_episode_shape(store, way, shot, query, split)
        self.store = store if store.device == torch.device(device) else store.to(device)
        self.way, self.shot, self.query = way, shot, query
        self.generator = torch.Generator(device=self.store.device).manual_seed(seed)
        self._s_max = int(store.counts.max())
        self.augment = train_augmentation(augment, self.generator)

    def sample(self, batch_size: int) -> Episodes:
        classes, samples = sample_indices(
            self.store.counts,
            self.store.rotations,
            batch_size,
            self.way,
            self.shot + self.query,
            self.generator,
            self._s_max,
        )
        return gather(self.store, classes, samples, self.shot, self.augment)


class ImageBatchSampler(SeededSampler):
    """Ordinary mini-batches for learners that pretrain a classifier over all training
    classes (Baseline, Baseline++): every image of every (rotated) class is equally likely.

    `sample(n)` returns n images as an Episodes batch of n one-image tasks: support_x
    [n, 1, C, H, W], support_y zeros, classes [n, 1] the image's global class id (base class
    b rotated k times is k * n_base + b, as everywhere), no queries. So the same trainer,
    checkpoints and multi-process split (a process keeps its share of the n images) serve
    both kinds of training.
    """

    def __init__(self, store: ClassStore, device="cpu", seed: int = 0, augment: str | None = None):
        if not isinstance(store, ClassStore):
            raise ConfigError(
                "this learner pretrains a classifier on labelled images and needs an image "
                f"data set with classes, not {type(store).__name__}; use e.g. data=omniglot_small"
            )
        if store.n_base < 1 or int(store.counts.sum()) < 1:
            raise ConfigError("the 'train' split has no images to pretrain on")
        self.store = store if store.device == torch.device(device) else store.to(device)
        self.generator = torch.Generator(device=self.store.device).manual_seed(seed)
        # the base class of every stored row, looked up once
        self.row_class = torch.repeat_interleave(
            torch.arange(store.n_base, device=self.store.device), self.store.counts
        )
        self.augment = train_augmentation(augment, self.generator, episodes=False)

    def sample(self, batch_size: int) -> Episodes:
        store, dev = self.store, self.store.device
        n_rows = store.images.shape[0]
        pick = torch.randint(
            n_rows * store.rotations, (batch_size,), generator=self.generator, device=dev
        )
        rows, rot = pick % n_rows, pick // n_rows
        x = rotate(store.images[rows], rot, store.rotations).float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x)
        classes = (rot * store.n_base + self.row_class[rows])[:, None]
        zeros = torch.zeros(batch_size, 1, dtype=torch.int64, device=dev)
        empty = x.new_zeros(batch_size, 0, *x.shape[1:])
        return Episodes(x[:, None], zeros, empty, zeros[:, :0], classes)


class FixedEpisodes:
    """A fixed list of episodes defined by a seed, for validation and testing.

    The indices are drawn on the CPU once, so the same seed gives the same
    episodes on every device and for every algorithm; images are gathered
    batch by batch on the store's device when iterated.
    """

    def __init__(
        self,
        store: ClassStore,
        n: int,
        way: int,
        shot: int,
        query: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        split: str = "",
    ):
        check_episode_shape(store, way, shot, query, split)
        if n < 1:
            raise ConfigError(f"the number of evaluation episodes must be positive, got {n}")
        self.store = store if store.device == torch.device(device) else store.to(device)
        self.n, self.way, self.shot, self.query = n, way, shot, query
        gen = torch.Generator().manual_seed(seed)
        classes, samples = sample_indices(
            store.counts.cpu(), store.rotations, n, way, shot + query, gen
        )
        self.classes, self.samples = classes.to(self.store.device), samples.to(self.store.device)

    def __len__(self) -> int:
        return self.n

    @property
    def device(self) -> torch.device:
        return self.store.device

    def batches(self, batch_size: int) -> Iterator[Episodes]:
        for start in range(0, self.n, batch_size):
            end = min(start + batch_size, self.n)
            yield gather(self.store, self.classes[start:end], self.samples[start:end], self.shot)


def episode_sampler(store, way, shot, query, device="cpu", seed=0, split="", augment=None):
    """The random-episode sampler for any store: a class store of images, or a task
    distribution (e.g. sinusoid) that brings its own sampler."""
    if hasattr(store, "episode_sampler"):
        return store.episode_sampler(way, shot, query, device, seed, split, augment)
    return EpisodeSampler(store, way, shot, query, device, seed, split, augment)


def fixed_episodes(store, n, way, shot, query, seed=0, device="cpu", split=""):
    """The fixed evaluation episodes for any store (see episode_sampler)."""
    if hasattr(store, "fixed_episodes"):
        return store.fixed_episodes(n, way, shot, query, seed, device, split)
    return FixedEpisodes(store, n, way, shot, query, seed, device, split)
