"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017):
64 training, 16 validation and 20 test classes of 600 images each, 84x84 RGB.

There is no stable public download (the common copies sit on Google Drive), so this loader
reads the two forms people have on disk, from `root`:

1. `images/` (the ImageNet files, any names) with `train.csv`, `val.csv`, `test.csv`: the
   Ravi & Larochelle split files, a header line then `filename,label` rows (the files are in
   github.com/twitter/meta-learning-lstm, data/miniImagenet/);
2. the per-split pickle caches shared with learn2learn and torchmeta-era code:
   `mini-imagenet-cache-{train,val,test}.pkl`, each a dict with `image_data` (uint8 array
   [N, 84, 84, 3]) and `class_dict` (class name -> list of row indices).

Either way each split is decoded once into the uint8 cache (store.cached_store), keyed by
the files' stamps and the image size. A split must be complete: every file its csv lists
present, and the published 64 / 16 / 20 classes of 600 images (`SPLIT_CLASSES`,
`IMAGES_PER_CLASS`). The pickles are read with `safe_pickle`, which refuses any file that
would run code when loaded.
"""

from __future__ import annotations

import csv
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from metarun.errors import DataError, summarise

from . import safe_pickle
from .images import RGB_84, Preprocess, decode_image, entry_kind
from .params import Rotations
from .store import (
    ClassStore,
    cached_store,
    check_counts,
    check_split_args,
    file_stamp,
    require_root,
    resize,
)

PICKLE = "mini-imagenet-cache-{split}.pkl"
FORMS = (
    "either images/ with train.csv, val.csv, test.csv (filename,label; from "
    "github.com/twitter/meta-learning-lstm data/miniImagenet/), or the pickle caches "
    "mini-imagenet-cache-train.pkl, -val.pkl, -test.pkl (a dict with image_data and class_dict)"
)
# Ravi & Larochelle's split; module constants so tests can describe their small stand-ins
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600


def miniimagenet(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    images: Preprocess = RGB_84,
    rotations: Rotations = 1,
) -> ClassStore:
    """One split of miniImageNet from `root` (see the module docstring for the forms)."""
    image_size = images.fixed("miniimagenet", channels=3)
    check_split_args(split, image_size, rotations)
    base = require_root(root, "miniimagenet", FORMS)
    if not base.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a folder; it should hold {FORMS}")
    csv_path, pkl_path = base / f"{split}.csv", base / PICKLE.format(split=split)
    if csv_path.is_file() and (base / "images").is_dir():
        store = from_csv(base, csv_path, split, image_size)
    elif pkl_path.is_file():
        store = from_pickle(pkl_path, split, image_size)
    else:
        raise DataError(
            f"no miniImageNet {split} split under {str(base)!r}: found neither "
            f"images/ with {split}.csv nor {PICKLE.format(split=split)}. Accepted: {FORMS}"
        )
    return ClassStore(store.images, store.offsets, store.counts, store.names, rotations)


def read_split_csv(path: Path) -> dict[str, list[str]]:
    """label -> file names, in the order of the file (the header line is skipped)."""
    classes: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        raise DataError(f"{str(path)!r} should start with the header 'filename,label'")
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 2:
            raise DataError(f"{str(path)!r} line {i}: expected 'filename,label', got {row!r}")
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    if not classes:
        raise DataError(f"{str(path)!r} lists no images")
    return classes


def from_csv(base: Path, csv_path: Path, split: str, image_size: int) -> ClassStore:
    classes = read_split_csv(csv_path)
    images = base / "images"
    _check_listed_files(csv_path, images, classes)
    _check_complete(split, csv_path, classes)
    prep = Preprocess(size=image_size, channels=3)
    key = {
        "root": str(base.resolve()),
        "files": {c: [file_stamp(images / n) for n in names] for c, names in classes.items()},
        "prep": prep.as_dict(),
    }

    def build() -> ClassStore:
        per_class = [
            torch.stack([decode_image(images / n, prep) for n in names])
            for names in classes.values()
        ]
        return ClassStore.from_classes(per_class, list(classes))

    return cached_store("miniimagenet", key, build)


def _check_listed_files(csv_path: Path, images: Path, classes: dict[str, list[str]]) -> None:
    """Every file the csv lists is a regular file in images/, listed once: the csv is the
    split's index, so anything less is an incomplete copy."""
    listed = [n for names in classes.values() for n in names]
    bad = [f"{n} ({kind})" for n in listed if (kind := entry_kind(images / n)) != "file"]
    if bad:
        raise DataError(
            f"{len(bad)} of the {len(listed)} images listed in {csv_path} are not in {images}: "
            f"{summarise(bad)}. Copy the miniImageNet images there (all of them: a split "
            "trained or tested on fewer images is not the published benchmark)."
        )
    twice = sorted(n for n, k in Counter(listed).items() if k > 1)
    if twice:
        raise DataError(
            f"{csv_path} lists {len(twice)} image(s) more than once: {summarise(twice)}; "
            "fetch the split file again"
        )


def _check_complete(split: str, source: Path, classes: dict) -> None:
    check_counts(
        f"miniImageNet's {split} split ({source})",
        {c: len(rows) for c, rows in classes.items()},
        SPLIT_CLASSES[split],
        IMAGES_PER_CLASS,
        "The published split has 64 / 16 / 20 classes of 600 images (train / val / test); "
        "copy the missing files again (the split files are in "
        "github.com/twitter/meta-learning-lstm, data/miniImagenet/).",
    )


def from_pickle(path: Path, split: str, image_size: int) -> ClassStore:
    key = {"pickle": str(path.resolve()), "stamp": file_stamp(path), "image_size": image_size}

    def build() -> ClassStore:
        array, class_dict = _read_pickle(path, split)
        images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)).permute(0, 3, 1, 2)
        if images.shape[-1] != image_size or images.shape[-2] != image_size:
            images = resize(images, image_size)
        names = sorted(class_dict)
        per_class = [images[torch.as_tensor(list(class_dict[n]), dtype=torch.long)] for n in names]
        return ClassStore.from_classes(per_class, names)

    return cached_store("miniimagenet", key, build)


def _read_pickle(path: Path, split: str) -> tuple[np.ndarray, dict]:
    """image_data [N, H, W, 3] and class_dict {class: [row indices]}, checked."""
    try:
        data = safe_pickle.load_path(path)
        array, class_dict = np.asarray(data["image_data"]), dict(data["class_dict"])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"cannot read {str(path)!r} as a miniImageNet cache ({err!r}); it should be a "
            "pickled dict with image_data [N, 84, 84, 3] uint8 and class_dict "
            "{class: [indices]}. The file may be truncated: copy it again."
        ) from err
    if array.ndim != 4 or array.shape[-1] != 3:
        raise DataError(f"{str(path)!r}: image_data has shape {array.shape}, expected [N, H, W, 3]")
    rows = [int(i) for r in class_dict.values() for i in r]
    if any(not 0 <= i < len(array) for i in rows) or len(set(rows)) != len(rows):
        raise DataError(
            f"{path}: class_dict names rows beyond image_data's {len(array)} images, or a row "
            "twice; the file is truncated or damaged: copy it again"
        )
    _check_complete(split, path, class_dict)
    return array, class_dict
