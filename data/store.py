"""Class stores: a whole split decoded once into one uint8 tensor.

Images of all classes are concatenated into `images` [N, C, H, W]; class `c`
owns rows `offsets[c] : offsets[c] + counts[c]`. Classes may differ in size.
Rotation augmentation (Omniglot's x4 classes) is index arithmetic: class id
`k * n_base + b` is base class `b` rotated by `k * 90` degrees, and the
rotation is applied to the sampled images only, never stored.

A store may also know who drew each image (`drawers`, Omniglot's `<id>_<drawer>.png`) and
group its classes by the prefix of their names (`alphabets`, Omniglot's
"<Alphabet>/<characterNN>"): what Lake's within-alphabet episodes need (data/episodes.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metarun.errors import ConfigError, DataError, summarise

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Mixed into every cached_store key: bump when decoding or its completeness checks change,
# so that no store decoded under older rules (say, from an incomplete copy) is served.
STORE_FORMAT = 2


def check_split_args(split: str, image_size: int, rotations: int = 1) -> None:
    """The arguments every data set's loader takes: a split name, a positive image size
    and a rotation count; a ConfigError naming the bad one."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    if rotations not in (1, 2, 4):
        raise ConfigError(f"rotations must be 1, 2 or 4, got {rotations!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"data.images.size must be a positive integer, got {image_size!r}")


def require_root(root, data: str, holding: str) -> Path:
    """A loader's data.root, expanded; a ConfigError naming what it should hold when unset."""
    if root is None:
        raise ConfigError(f"data={data} needs data.root=DIR holding {holding}")
    return Path(root).expanduser()


def alphabet_of(name: str) -> str:
    """A class name's group: up to its first "/" (Omniglot's "<Alphabet>/<characterNN>")."""
    return name.split("/", 1)[0]


@dataclass
class ClassStore:
    images: torch.Tensor  # uint8 [N, C, H, W]
    offsets: torch.Tensor  # int64 [n_base]
    counts: torch.Tensor  # int64 [n_base]
    names: list[str] = field(default_factory=list)  # one per base class
    rotations: int = 1  # 1 (none) or 4 (0/90/180/270 degrees as new classes)
    drawers: torch.Tensor | None = None  # int64 [N]: who drew each image (None: unknown)

    def __post_init__(self) -> None:
        if self.rotations not in (1, 2, 4):
            raise ConfigError(f"rotations must be 1, 2 or 4, got {self.rotations}")
        if self.rotations > 1 and self.images.shape[-1] != self.images.shape[-2]:
            raise ConfigError(f"rotations need square images, got {tuple(self.images.shape[-2:])}")
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ConfigError("ClassStore.images must be a uint8 tensor [N, C, H, W]")
        if self.drawers is not None and self.drawers.shape != self.images.shape[:1]:
            raise ConfigError("ClassStore.drawers must hold one id per image, shape [N]")

    @classmethod
    def from_classes(
        cls,
        per_class: list[torch.Tensor],
        names: list[str],
        rotations: int = 1,
        drawers: list[torch.Tensor] | None = None,
    ):
        """Build from a list of uint8 tensors [n_i, C, H, W], one per class (and, if
        known, int64 tensors [n_i] of who drew each image)."""
        counts = torch.tensor([len(x) for x in per_class], dtype=torch.int64)
        offsets = torch.cumsum(counts, 0) - counts
        who = None if drawers is None else torch.cat(drawers).to(torch.int64)
        return cls(torch.cat(per_class), offsets, counts, list(names), rotations, who)

    @property
    def n_base(self) -> int:
        return len(self.counts)

    @property
    def num_classes(self) -> int:
        return self.n_base * self.rotations

    @property
    def min_samples(self) -> int:
        return int(self.counts.min()) if self.n_base else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def alphabets(self) -> list[str]:
        """Each base class's group: its name up to the first "/" (Omniglot's class names
        are "<Alphabet>/<characterNN>", so this is the character's alphabet)."""
        return [alphabet_of(name) for name in self.names]

    def class_name(self, class_id: int) -> str:
        """A (possibly rotated) class's name: its base class's name, with the turn when it is
        a rotation ("Greek/character01 rotated 90"); "class N" for a store without names."""
        base, rot = class_id % self.n_base, class_id // self.n_base
        name = self.names[base] if base < len(self.names) else f"class {base}"
        return f"{name} rotated {rot * 360 // self.rotations}" if rot else name

    def to(self, device: str | torch.device) -> ClassStore:
        return ClassStore(
            self.images.to(device),
            self.offsets.to(device),
            self.counts.to(device),
            self.names,
            self.rotations,
            None if self.drawers is None else self.drawers.to(device),
        )

    def select(self, base_ids: list[int], rotations: int | None = None) -> ClassStore:
        """A store holding only the given base classes (used to cut splits)."""
        spans = list(zip(self.offsets[base_ids].tolist(), self.counts[base_ids].tolist()))
        parts = [self.images[o : o + n] for o, n in spans]
        drawers = None if self.drawers is None else [self.drawers[o : o + n] for o, n in spans]
        names = [self.names[i] for i in base_ids]
        return ClassStore.from_classes(
            parts, names, self.rotations if rotations is None else rotations, drawers
        )

    def class_images(self, class_id: int) -> torch.Tensor:
        """All images of one (possibly rotated) class, uint8 [n, C, H, W]."""
        base, rot = class_id % self.n_base, class_id // self.n_base
        o, n = int(self.offsets[base]), int(self.counts[base])
        return rotate(
            self.images[o : o + n], torch.full((n,), rot, device=self.device), self.rotations
        )

    def state(self) -> dict:
        return {
            "images": self.images,
            "offsets": self.offsets,
            "counts": self.counts,
            "names": self.names,
            "rotations": self.rotations,
            "drawers": self.drawers,
        }


def rotate(images: torch.Tensor, rot: torch.Tensor, rotations: int) -> torch.Tensor:
    """Rotate square images [..., C, H, W] by rot[...] * (360 / rotations) degrees.

    `rot` holds one rotation per image and may broadcast over the trailing
    leading dims (e.g. one per class for [tasks, way, samples, C, H, W]).
    A rotation is a fixed permutation of pixel positions, so all images turn
    in one `gather`: no per-image loop, no data-dependent shapes, no host sync.
    """
    if rotations == 1:
        return images
    *lead, c, h, w = images.shape
    perm = pixel_permutations(h, rotations, str(images.device))  # [rotations, H*W]
    index = perm[rot][..., None, :].expand(*lead, c, h * w)  # a view: no per-image index copy
    return images.reshape(*lead, c, h * w).gather(-1, index).view(*lead, c, h, w)


@functools.lru_cache(maxsize=16)
def pixel_permutations(side: int, rotations: int, device: str) -> torch.Tensor:
    """perm[k] lists, for each output pixel, the input pixel of a k/rotations turn."""
    grid = torch.arange(side * side).view(side, side)
    turns = 4 // rotations
    return torch.stack([torch.rot90(grid, k * turns).flatten() for k in range(rotations)]).to(
        device
    )


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size] (antialiased bilinear), in chunks."""
    out = []
    for chunk in images.split(256):
        x = torch.nn.functional.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", antialias=True
        )
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images


# ---------------------------------------------------------------- disk cache


def cache_dir() -> Path:
    """Where decoded stores live: $METARUN_CACHE or ~/.cache/metarun (never the data root)."""
    return Path(os.environ.get("METARUN_CACHE") or Path.home() / ".cache" / "metarun").expanduser()


def cache_key(**parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def cached_store(name: str, key: dict, build: Callable[[], ClassStore]) -> ClassStore:
    """Load a decoded store from the cache, or build it and write it there atomically.

    `key` must change whenever the decoded result would: loaders put a `file_stamp` of
    every source file in it, not just the file names."""
    path = cache_dir() / f"{name}-{cache_key(**key, store_format=STORE_FORMAT)}.pt"
    store = _read_cached(path)
    if store is None:
        store = build()
        _write_cached(store, path)
    return store


def _read_cached(path: Path) -> ClassStore | None:
    try:
        if not path.is_file():
            return None
        return ClassStore(**torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # a stale, broken or unreadable cache file is rebuilt, never fatal
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return None


def _write_cached(store: ClassStore, path: Path) -> None:
    """Write under a temporary name, then rename. A cache that cannot be written (not a
    folder, read-only, a full disk) costs a decode on the next run, never this run."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(store.state(), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning(
            "could not write the decode cache %s (%s); continuing with the decoded data, which "
            "the next run decodes again. Point METARUN_CACHE at a writable folder with free "
            "space to keep it.",
            path,
            err,
        )


def file_stamp(path: Path, name: str | None = None) -> tuple[str, int, int]:
    """(name, size, mtime_ns) of a source file, for cache keys: an edited file keeps its
    name but not its size and modification time, so its split is decoded again."""
    try:
        st = path.stat()
    except OSError as err:
        raise DataError(
            f"cannot read {path} ({err.strerror or err}); restore the file, or run again once "
            "it is in place"
        ) from err
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path} is not a regular file; replace it with the image or data file")
    return (path.name if name is None else name, st.st_size, st.st_mtime_ns)


def check_counts(
    what: str, found: Mapping[str, int], classes: int, per_class: int | None, fix: str
) -> None:
    """Refuse a canonical data set's split that lacks classes or images: training and testing
    on less than the published split would give numbers no one else can compare against.

    found: class name -> number of images; classes, per_class: the published counts."""
    problems = []
    if len(found) != classes:
        problems.append(f"{len(found)} classes instead of {classes}")
    if per_class is not None:
        off = [f"{name} ({n})" for name, n in found.items() if n != per_class]
        if off:
            problems.append(f"{len(off)} class(es) without {per_class} images: {summarise(off)}")
    if problems:
        raise DataError(f"{what} is incomplete: {'; '.join(problems)}. {fix}")
