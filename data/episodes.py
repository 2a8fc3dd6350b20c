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

from .augment import (
    random_distortion,
    random_mirror,
    random_shift,
    random_stroke,
)
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


def check_positive(way: int, shot: int, query: int) -> None:
    for name, value in (("way", way), ("shot", shot), ("query", query)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_episode_shape(
    store: ClassStore, way: int, shot: int, query: int, split: str = ""
) -> None:
    """Raise a clear error when a split cannot supply the requested episodes."""
    where = f" in the {split!r} split" if split else ""
    check_positive(way, shot, query)
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
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n tasks of `way` classes with k distinct samples each.

    counts: [n_base] images per base class, on the generator's device.
    s_max: counts.max(), passed in to avoid a host sync per draw on CUDA.
    allowed: [n, n_base * rotations] bool, the classes each task may take (each row with
    `way` or more); None: all of them.
    Returns global class ids [n, way] and sample ids [n, way, k] on that device.
    """
    dev, n_base = counts.device, len(counts)
    # classes: the `way` largest of iid uniform keys = a uniform draw without replacement
    # (topk, not a full argsort: ~5x cheaper for Omniglot's ~1000 classes)
    keys = torch.rand(n, n_base * rotations, generator=generator, device=dev)
    if allowed is not None:
        keys = keys.masked_fill(~allowed, -1.0)  # below every uniform key: never drawn
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


# per-image augmentations, in the order they apply ("affine" and "elastic" together resample
# once); "mirror" works on whole classes
PER_IMAGE = ("stroke", "affine", "elastic", "shift")
AUGMENTATIONS = (*PER_IMAGE, "mirror")


def per_image_steps(names: Sequence[str]) -> list:
    """The per-image functions of trainer.augment's names, in PER_IMAGE's order, each taking
    (x, generator)."""
    steps = []
    if "stroke" in names:
        steps.append(random_stroke)
    if "affine" in names or "elastic" in names:  # alone, affine draws what random_affine does
        steps.append(
            partial(random_distortion, affine="affine" in names, elastic="elastic" in names)
        )
    if "shift" in names:
        steps.append(random_shift)
    return steps


def train_augmentation(
    augment: str | Sequence[str] | None, generator: torch.Generator, episodes: bool = True
):
    """trainer.augment as a function of float images [..., C, H, W] drawing from `generator`
    (None: no augmentation); a ConfigError for an unknown name.

    augment: one name or several (a list, or names joined by "+"), applied in this order:
    "mirror" mirrors each class of an episode at random (images [tasks, way, k, C, H, W]; a
    new class, so episodes only), then per image "stroke" (thicker or thinner strokes),
    "affine" (small rotation, scale and shift), "elastic" (a smooth random bending; with
    affine, one resampling for both) and "shift" (whole-pixel shift)."""
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
    per_image = [partial(fn, generator=generator) for fn in per_image_steps(names)]

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
        classes: str = "random",
    ):
        check_episode_shape(store, way, shot, query, split)
        if classes not in TRAIN_CLASSES:
            raise ConfigError(f"trainer.episodes={classes!r}; choose {', '.join(TRAIN_CLASSES)}")
        self.store = store if store.device == torch.device(device) else store.to(device)
        self.way, self.shot, self.query = way, shot, query
        self.generator = torch.Generator(device=self.store.device).manual_seed(seed)
        self._s_max = int(store.counts.max())
        self.augment = train_augmentation(augment, self.generator)
        self.members = self.weights = None
        if classes == "within_alphabet":
            self.members, self.weights = alphabet_members(self.store, way, split)

    def sample(self, batch_size: int) -> Episodes:
        allowed = None
        if self.members is not None:  # each task: an alphabet, by its number of classes
            pick = torch.multinomial(self.weights, batch_size, True, generator=self.generator)
            allowed = self.members[pick]
        classes, samples = sample_indices(
            self.store.counts,
            self.store.rotations,
            batch_size,
            self.way,
            self.shot + self.query,
            self.generator,
            self._s_max,
            allowed,
        )
        return gather(self.store, classes, samples, self.shot, self.augment)


# How training episodes choose their classes (trainer.episodes):
# - "random": from the whole train split (every rotation of a character its own class)
# - "within_alphabet": all of an episode's classes from one alphabet, as Lake's test
#   episodes (eval.protocol=within_alphabet) take them; each rotation of a character still
#   its own class; an alphabet is drawn with probability proportional to its number of
#   classes, so every class of the alphabets that take part (those with `way` classes or
#   more) is equally likely to appear
TRAIN_CLASSES = ("random", "within_alphabet")


def alphabet_members(
    store: ClassStore, way: int, split: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """For trainer.episodes=within_alphabet: ([alphabets, n_base * rotations] bool, which
    classes each alphabet holds, rotations included; [alphabets] float, each one's share
    of the draws), over the alphabets with `way` classes or more."""
    n_classes = store.n_base * store.rotations
    groups = alphabet_groups(store, None)
    sizes = {a: len(ids) * store.rotations for a, ids in groups.items()}
    usable = [a for a in groups if sizes[a] >= way]
    if not usable:
        where = f" of the {split!r} split" if split else ""
        largest = max(sizes, key=sizes.get)
        raise ConfigError(
            f"trainer.episodes=within_alphabet draws {way} classes from one alphabet, but the "
            f"largest alphabet{where}, {largest}, has {sizes[largest]} (rotations counted); "
            f"set way<={sizes[largest]}, or trainer.episodes=random"
        )
    members = torch.zeros(len(usable), n_classes, dtype=torch.bool)
    for row, a in enumerate(usable):
        ids = groups[a][None, :] + store.n_base * torch.arange(store.rotations)[:, None]
        members[row, ids.flatten()] = True
    weights = torch.tensor([float(sizes[a]) for a in usable])
    return members.to(store.device), (weights / weights.sum()).to(store.device)


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


# ---------------------------------------------------------------- evaluation protocols

# How fixed evaluation episodes are drawn (eval.protocol):
# - "random": `way` classes drawn from the whole split, rotation-made classes included,
#   and any `shot + query` images of each;
# - "within_alphabet": the one-shot protocol of Lake et al. (Science 2015): the classes of
#   an episode are characters of one alphabet, unrotated, and each image of a character is
#   by another person: the support by `shot` people, the queries by `query` others, the
#   same people for every character of the episode. Stores that know who drew each image
#   (Omniglot's) support it.
PROTOCOLS = ("random", "within_alphabet")


def within_alphabet_indices(
    store: ClassStore,
    n: int,
    way: int,
    shot: int,
    query: int,
    generator: torch.Generator,
    alphabets: Sequence[str] | None = None,
    split: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n within-alphabet tasks (Lake et al., 2015); `alphabets` restricts them to those
    alphabets of the store (None: all of them).

    The episodes go to the alphabets in turn, in an order drawn from `generator`, so each
    alphabet gets n / A of them (A alphabets; the first n mod A one more). Each episode
    then draws `way` of its alphabet's characters and `shot + query` of the people who drew
    every character of the alphabet: the first `shot` people's drawings are the support,
    the others' the queries. Returns base class ids [n, way] (rotation 0) and sample ids
    [n, way, shot + query] (the first `shot` the support, as `gather` splits them).
    """
    check_positive(way, shot, query)
    table = drawer_table(store)  # [n_base, D]
    groups = alphabet_groups(store, alphabets, split)
    check_alphabet_sizes(groups, way, split)
    # who drew every character of each alphabet: column ids into `table`
    people = {a: (table[ids] >= 0).all(0).nonzero()[:, 0] for a, ids in groups.items()}
    check_drawers(people, shot, query, split)
    names = sorted(groups)  # the same episodes however `alphabets` is ordered
    order = torch.randperm(len(names), generator=generator).tolist()
    classes, samples = [], []
    for i in range(n):
        name = names[order[i % len(names)]]
        chars, who = groups[name], people[name]
        chars = chars[torch.randperm(len(chars), generator=generator)[:way]]  # [way]
        who = who[torch.randperm(len(who), generator=generator)[: shot + query]]  # [k]
        classes.append(chars)
        samples.append(table[chars][:, who])  # [way, k]: drawer who[j]'s image of each
    return torch.stack(classes), torch.stack(samples)


def drawer_table(store: ClassStore) -> torch.Tensor:
    """table[b, d]: the position within base class b of the image by the d-th drawer (in
    the order of their ids), -1 if that person did not draw b; the first such image when
    someone drew b twice."""
    if getattr(store, "drawers", None) is None:
        raise ConfigError(
            "eval.protocol=within_alphabet needs to know who drew each image and each "
            "class's alphabet, which only the Omniglot data sets record (data=omniglot, "
            "data=omniglot_small); use eval.protocol=random with this data set"
        )
    counts, offsets = store.counts.cpu(), store.offsets.cpu()
    people, person = torch.unique(store.drawers.cpu(), return_inverse=True)  # [N] in 0..D-1
    base = torch.repeat_interleave(torch.arange(store.n_base), counts)  # [M] each image's class
    position = torch.arange(len(base)) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    who = person[offsets[base] + position]  # [M] its drawer's column
    absent = int(counts.max()) if len(counts) else 0  # above every position
    table = torch.full((store.n_base * len(people),), absent, dtype=torch.int64)
    table.scatter_reduce_(0, base * len(people) + who, position, "amin")
    table = table.view(store.n_base, len(people))
    return table.masked_fill(table == absent, -1)


def alphabet_groups(
    store: ClassStore, alphabets: Sequence[str] | None, split: str = ""
) -> dict[str, torch.Tensor]:
    """{alphabet: its base class ids} for `alphabets` (None: every alphabet of the store)."""
    groups: dict[str, list[int]] = {}
    for base, name in enumerate(store.alphabets):
        groups.setdefault(name, []).append(base)
    if isinstance(alphabets, str):  # a lone name, not its letters
        alphabets = [alphabets]
    if alphabets is not None:
        where = f"the {split!r} split" if split else "this data set"
        unknown = [a for a in alphabets if a not in groups]
        if unknown or not alphabets:
            named = f"names {', '.join(map(str, unknown))}, which" if unknown else "is empty:"
            raise ConfigError(
                f"eval.alphabets {named} {where} does not hold; its alphabets: "
                f"{', '.join(sorted(groups))} (eval.alphabets=null: all of them)"
            )
        groups = {a: groups[a] for a in alphabets}
    return {a: torch.tensor(ids) for a, ids in groups.items()}


def check_alphabet_sizes(groups: dict[str, torch.Tensor], way: int, split: str = "") -> None:
    """Every alphabet must have `way` characters: name those that do not, and the fixes."""
    sizes = {a: len(ids) for a, ids in sorted(groups.items())}
    small = {a: n for a, n in sizes.items() if n < way}
    if not small:
        return
    where = f" in the {split!r} split" if split else ""
    few = ", ".join(f"{a} has only {n}" for a, n in small.items())
    counts = ", ".join(f"{a}: {n}" for a, n in sizes.items())
    fixes = [f"eval.way<={min(sizes.values())}"]
    big = [a for a in sizes if a not in small]
    if big and split != "val":  # validation episodes use every alphabet of their split
        fixes.append(f"eval.alphabets=[{','.join(big)}] (those with {way} or more)")
    raise ConfigError(
        f"within-alphabet {way}-way episodes take {way} characters of one alphabet, but"
        f"{where} {few} (characters per alphabet: {counts}); use {' or '.join(fixes)}"
    )


def check_drawers(people: dict[str, torch.Tensor], shot: int, query: int, split: str = "") -> None:
    """Each image of a character comes from another person: shot + query people needed."""
    k = shot + query
    short = {a: len(who) for a, who in sorted(people.items()) if len(who) < k}
    if not short:
        return
    where = f" in the {split!r} split" if split else ""
    named = ", ".join(f"{a}: {n}" for a, n in short.items())
    raise ConfigError(
        f"within-alphabet episodes take each of a character's shot+query={k} images (shot="
        f"{shot}, query={query}) from a different person, but{where} fewer people drew "
        f"every character of an alphabet ({named}); use eval.shot+eval.query<="
        f"{min(short.values())} (Lake's protocol: eval.shot=1 eval.query=1)"
    )


class FixedEpisodes:
    """A fixed list of episodes defined by a seed, for validation and testing.

    The indices are drawn on the CPU once, so the same seed gives the same
    episodes on every device and for every algorithm; images are gathered
    batch by batch on the store's device when iterated.

    protocol: "random" or "within_alphabet" (see PROTOCOLS); alphabets: within_alphabet's
    alphabets (None: all of the store's).
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
        protocol: str = "random",
        alphabets: Sequence[str] | None = None,
    ):
        check_protocol(protocol, alphabets)
        if protocol == "random":
            check_episode_shape(store, way, shot, query, split)
        if n < 1:
            raise ConfigError(f"the number of evaluation episodes must be positive, got {n}")
        self.n, self.way, self.shot, self.query = n, way, shot, query
        self.protocol, self.alphabets = protocol, alphabets
        gen = torch.Generator().manual_seed(seed)
        if protocol == "random":
            classes, samples = sample_indices(
                store.counts.cpu(), store.rotations, n, way, shot + query, gen
            )
        else:
            classes, samples = within_alphabet_indices(
                store, n, way, shot, query, gen, alphabets, split
            )
        self.store = store if store.device == torch.device(device) else store.to(device)
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


def episode_sampler(
    store, way, shot, query, device="cpu", seed=0, split="", augment=None, classes="random"
):
    """The random-episode sampler for any store: a class store of images, or a task
    distribution (e.g. sinusoid) that brings its own sampler. classes: TRAIN_CLASSES."""
    if hasattr(store, "episode_sampler"):
        if classes != "random":
            raise ConfigError(
                f"trainer.episodes={classes} needs a data set of classes grouped in alphabets; "
                "use trainer.episodes=random"
            )
        return store.episode_sampler(way, shot, query, device, seed, split, augment)
    return EpisodeSampler(store, way, shot, query, device, seed, split, augment, classes)


def check_protocol(protocol: str, alphabets: Sequence[str] | None) -> None:
    """A known eval.protocol, and eval.alphabets only with within_alphabet."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol={protocol!r}; choose {', '.join(PROTOCOLS)}")
    if alphabets is not None and protocol != "within_alphabet":
        raise ConfigError(
            f"eval.alphabets chooses the alphabets of within-alphabet episodes, but "
            f"eval.protocol={protocol}; set eval.protocol=within_alphabet, or eval.alphabets=null"
        )


def fixed_episodes(
    store, n, way, shot, query, seed=0, device="cpu", split="", protocol="random", alphabets=None
):
    """The fixed evaluation episodes for any store (see episode_sampler); protocol and
    alphabets: see FixedEpisodes (a store with its own episodes has the random ones only)."""
    if hasattr(store, "fixed_episodes"):
        check_protocol(protocol, alphabets)
        if protocol != "random":
            drawer_table(store)  # the error that says which data sets have drawers
        return store.fixed_episodes(n, way, shot, query, seed, device, split)
    return FixedEpisodes(store, n, way, shot, query, seed, device, split, protocol, alphabets)
