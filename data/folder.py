"""Any folder of images as a few-shot data set: `root/<class>/<image files>`.

>>> train = folder("/my/images", split="train")                       # split by ratios
>>> test = folder("/my/images", split="test", split_files={"train": "train.txt",
...               "val": "val.txt", "test": "test.txt"})              # or by class lists

Classes are the sub-folders of `root` that hold at least one image file (png, jpg, jpeg,
bmp, gif, webp); hidden entries, special files (FIFOs, sockets, devices), broken links and
folders without images are skipped and named in a warning (`images.image_folders`). They
are split into train/val/test either by `ratios` (a shuffle of the class names with `seed`,
then cut) or by `split_files`: one text file per split listing its class folder names, one
per line (paths relative to `root` or absolute). Images are converted to grayscale
(`channels=1`) or RGB (`channels=3`) and resized to `image_size` square. Each split is decoded once and cached as uint8 (see `store.cached_store`), keyed by
the root, the split's class list with each file's name, size and modification time (so an
edited image is decoded again), and the preprocessing.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from metarun.errors import ConfigError, DataError, summarise

from .images import RGB_84, Preprocess, decode_image, image_folders, is_image, scan_folder
from .params import NonNegativeInt, Rotations
from .store import SPLITS, ClassStore, cached_store, check_split_args, file_stamp

LAYOUT = "root/<class name>/<image files>"


def folder(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    images: Preprocess = RGB_84,
    ratios: Sequence[float] = (0.64, 0.16, 0.20),
    split_files: Mapping[str, str] | None = None,
    seed: NonNegativeInt = 0,
    rotations: Rotations = 1,
) -> ClassStore:
    """One split of the class folders under `root` (see the module docstring)."""
    check_split_args(split, images.size, rotations)
    base = resolve_root(root)
    classes = class_folders(base)
    names = (
        split_from_files(base, classes, split_files)[split]
        if split_files
        else split_by_ratios(sorted(classes), ratios, seed)[split]
    )
    files = {name: classes[name] for name in names}
    prep = images
    key = {
        "root": str(base.resolve()),
        "split": split,
        "files": {n: [file_stamp(p) for p in fs] for n, fs in files.items()},
        "prep": prep.as_dict(),
    }

    def build() -> ClassStore:
        per_class = [
            torch.stack([decode_image(p, prep) for p in paths]) for paths in files.values()
        ]
        return ClassStore.from_classes(per_class, list(files))

    store = cached_store("folder", key, build)
    return ClassStore(store.images, store.offsets, store.counts, store.names, rotations)


def resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ConfigError(
            "data=folder needs data.root=DIR: a folder with one sub-folder of images per "
            f"class ({LAYOUT}); or set METARUN_DATA"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(
            f"data.root={str(root)!r} is not a folder; point it at {LAYOUT} "
            "(one sub-folder of images per class)"
        )
    return base


def class_folders(base: Path) -> dict[str, list[Path]]:
    """Class name -> its image files, for every sub-folder of `base` that holds images."""
    classes = image_folders(base)
    if not classes:
        loose = [p for p in scan_folder(base).files if is_image(p)]
        hint = (
            f" (found {len(loose)} images directly in it: move them into one sub-folder per class)"
            if loose
            else ""
        )
        raise DataError(
            f"no class folders with images under {str(base)!r}{hint}; expected {LAYOUT}"
        )
    return classes


def split_by_ratios(names: list[str], ratios: Sequence[float], seed: int) -> dict[str, list[str]]:
    """A seeded shuffle of the class names, cut into train/val/test by `ratios`."""
    ratios = [float(r) for r in ratios]
    if len(ratios) != 3 or min(ratios) < 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"data.ratios must be three non-negative fractions (train, val, test) summing to 1, "
            f"got {list(ratios)}"
        )
    shuffled = list(names)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n_train = round(ratios[0] * n)
    n_val = round(ratios[1] * n)
    parts = {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }
    empty = [s for s, part in parts.items() if not part]
    if empty:
        raise ConfigError(
            f"{n} class folders split by data.ratios={list(ratios)} leave no class for "
            f"{', '.join(empty)}; add classes or change data.ratios"
        )
    return {s: sorted(part) for s, part in parts.items()}


def split_from_files(
    base: Path, classes: Mapping[str, list[Path]], split_files: Mapping[str, str]
) -> dict[str, list[str]]:
    """Class lists read from one text file per split (one class folder name per line)."""
    missing = [s for s in SPLITS if s not in split_files]
    if missing:
        raise ConfigError(
            f"data.split_files needs a file for each of {', '.join(SPLITS)}; missing "
            f"{', '.join(missing)}"
        )
    parts, owner = {}, {}
    for split in SPLITS:
        path = Path(split_files[split]).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise DataError(f"split file {str(path)!r} for the {split} split does not exist")
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DataError(
                f"{str(path)!r} lists class(es) with no image folder under {str(base)!r}: "
                f"{summarise(unknown)}"
            )
        for n in names:
            if n in owner and owner[n] != split:
                raise ConfigError(f"class {n!r} is in both the {owner[n]} and {split} split files")
            owner[n] = split
        if not names:
            raise DataError(f"split file {str(path)!r} lists no classes")
        parts[split] = sorted(set(names))
    return parts
