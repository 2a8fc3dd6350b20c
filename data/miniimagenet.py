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
the files and the image size. Pickles are Python code to the loader: open only files you
trust.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .images import Preprocess, decode_image
from .store import ClassStore, cached_store, check_split_args, require_root, resize

PICKLE = "mini-imagenet-cache-{split}.pkl"
FORMS = (
    "either images/ with train.csv, val.csv, test.csv (filename,label; from "
    "github.com/twitter/meta-learning-lstm data/miniImagenet/), or the pickle caches "
    "mini-imagenet-cache-train.pkl, -val.pkl, -test.pkl (a dict with image_data and class_dict)"
)


def miniimagenet(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    image_size: int = 84,
    rotations: int = 1,
) -> ClassStore:
    """One split of miniImageNet from `root` (see the module docstring for the forms)."""
    check_split_args(split, image_size, rotations)
    base = require_root(root, "miniimagenet", FORMS)
    if not base.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a folder; it should hold {FORMS}")
    csv_path, pkl_path = base / f"{split}.csv", base / PICKLE.format(split=split)
    if csv_path.is_file() and (base / "images").is_dir():
        store = from_csv(base, csv_path, image_size)
    elif pkl_path.is_file():
        store = from_pickle(pkl_path, image_size)
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


def from_csv(base: Path, csv_path: Path, image_size: int) -> ClassStore:
    classes = read_split_csv(csv_path)
    images = base / "images"
    missing = [n for names in classes.values() for n in names if not (images / n).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) listed in {str(csv_path)!r} are not in {str(images)!r}, "
            f"e.g. {missing[0]!r}; copy the miniImageNet images there"
        )
    prep = Preprocess(size=image_size, channels=3)
    key = {"root": str(base.resolve()), "csv": classes, "prep": prep.as_dict()}

    def build() -> ClassStore:
        per_class = [
            torch.stack([decode_image(images / n, prep) for n in names])
            for names in classes.values()
        ]
        return ClassStore.from_classes(per_class, list(classes))

    return cached_store("miniimagenet", key, build)


def from_pickle(path: Path, image_size: int) -> ClassStore:
    stat = path.stat()
    key = {
        "pickle": str(path.resolve()),
        "size": stat.st_size,
        "mtime": stat.st_mtime_ns,
        "image_size": image_size,
    }

    def build() -> ClassStore:
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
            array, class_dict = data["image_data"], data["class_dict"]
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"cannot read {str(path)!r} as a miniImageNet cache ({err!r}); it should be a "
                "pickled dict with image_data [N, 84, 84, 3] uint8 and class_dict "
                "{class: [indices]}. The file may be truncated: copy it again."
            ) from err
        array = np.asarray(array)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise DataError(
                f"{str(path)!r}: image_data has shape {array.shape}, expected [N, H, W, 3]"
            )
        images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)).permute(0, 3, 1, 2)
        if images.shape[-1] != image_size or images.shape[-2] != image_size:
            images = resize(images, image_size)
        names = sorted(class_dict)
        per_class = [images[torch.as_tensor(list(class_dict[n]), dtype=torch.long)] for n in names]
        return ClassStore.from_classes(per_class, names)

    return cached_store("miniimagenet", key, build)
