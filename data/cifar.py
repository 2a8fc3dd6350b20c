"""CIFAR-FS and FC100: few-shot splits of CIFAR-100's 100 classes (600 images each, the
official train and test images together), 32x32 RGB.

- CIFAR-FS (Bertinetto, Henriques, Torr, Vedaldi, ICLR 2019): a random class split,
  64 / 16 / 20 classes (the class lists of the paper's released split, written below).
- FC100 (Oreshkin, Rodriguez, Lacoste, NeurIPS 2018): split by CIFAR-100's 20 superclasses,
  12 / 4 / 4 (60 / 20 / 20 classes), so that test classes share no superclass with training.

Both are built from the official python archive `cifar-100-python.tar.gz`, read from
`root` (the archive or its extracted `cifar-100-python/` folder) and downloaded with an md5
check when missing. The 100 classes are decoded once into the uint8 cache. The archive must
be complete (100 classes, 500 training and 100 test images each: `IMAGES_PER_CLASS`), and
its pickles are read with `safe_pickle`, which refuses any file that would run code.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from metarun.errors import DataError

from . import safe_pickle
from .download import download_root, fetch
from .images import RGB_32, Preprocess
from .params import Rotations
from .store import ClassStore, cached_store, check_counts, check_split_args, file_stamp, resize

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBERS = ("meta", "train", "test")
# CIFAR-100: 100 classes of 500 training + 100 test images (50000 + 10000); module constants
# so tests can describe their small stand-in
CLASSES = 100
IMAGES_PER_CLASS = {"train": 500, "test": 100}

CIFAR_FS = {
    "train": (
        "train skyscraper turtle raccoon spider orange castle keyboard clock pear girl seal "
        "elephant apple aquarium_fish bus mushroom possum squirrel chair tank plate wolf road "
        "mouse boy shrew couch sunflower tiger caterpillar lion streetcar lawn_mower tulip "
        "forest dolphin cockroach bear porcupine bee hamster lobster bowl can bottle trout "
        "snake bridge pine_tree skunk lizard cup kangaroo oak_tree dinosaur rabbit orchid "
        "willow_tree ray palm_tree mountain house cloud"
    ).split(),
    "val": (
        "otter motorcycle television lamp crocodile shark butterfly beaver beetle tractor "
        "flatfish maple_tree camel crab sea cattle"
    ).split(),
    "test": (
        "baby bed bicycle chimpanzee fox leopard man pickup_truck plain poppy rocket rose "
        "snail sweet_pepper table telephone wardrobe whale woman worm"
    ).split(),
}
# CIFAR-100 superclass (coarse label) indices of each FC100 split
FC100 = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}


def cifar_fs(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    download: bool = True,
    images: Preprocess = RGB_32,
    rotations: Rotations = 1,
) -> ClassStore:
    """One CIFAR-FS split (64 / 16 / 20 classes)."""
    store, _ = _check_and_load(root, split, download, images.fixed("cifarfs", channels=3))
    return _select(store, [store.names.index(n) for n in CIFAR_FS[split]], rotations)


def fc100(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    download: bool = True,
    images: Preprocess = RGB_32,
    rotations: Rotations = 1,
) -> ClassStore:
    """One FC100 split (superclasses 12 / 4 / 4: 60 / 20 / 20 classes)."""
    store, coarse = _check_and_load(root, split, download, images.fixed("fc100", channels=3))
    keep = set(FC100[split])
    return _select(store, [i for i, c in enumerate(coarse) if c in keep], rotations)


def _check_and_load(root, split: str, download: bool, image_size: int):
    """All 100 classes (named by their fine label) and each class's superclass index."""
    check_split_args(split, image_size)
    folder = download_root(root)
    source = _find(folder)
    if source is None:
        explain = lambda reason: (  # noqa: E731
            f"CIFAR-100 missing: neither {ARCHIVE} nor {FOLDER}/ in {folder}; {reason}. "
            f"Fetch {URL} into {folder}, or set data.root= to a folder that holds it "
            "(data.download=true fetches it when the network is reachable)."
        )
        if not download:
            raise DataError(explain("data.download=false, so nothing was fetched"))
        fetch(URL, folder / ARCHIVE, MD5, explain)
        source = folder / ARCHIVE
    stamps = (
        [file_stamp(source / name) for name in MEMBERS] if source.is_dir() else file_stamp(source)
    )
    key = {"source": str(source.resolve()), "stamps": stamps, "image_size": image_size}
    store = cached_store("cifar100", key, lambda: _decode(source, image_size))
    # the cached store names each class "fine:coarse"
    fine = [n.rsplit(":", 1)[0] for n in store.names]
    coarse = [int(n.rsplit(":", 1)[1]) for n in store.names]
    return ClassStore(store.images, store.offsets, store.counts, fine, 1), coarse


def _find(folder: Path) -> Path | None:
    if (folder / ARCHIVE).is_file():
        return folder / ARCHIVE
    if (folder / FOLDER).is_dir():
        return folder / FOLDER
    return None


def _read_member(source: Path, name: str) -> dict:
    try:
        if source.is_dir():
            return safe_pickle.load_path(source / name, encoding="latin1")
        with tarfile.open(source, "r:gz") as tar:
            member = tar.extractfile(f"{FOLDER}/{name}")
            if member is None:
                raise KeyError(name)
            return safe_pickle.load(member, f"{source}:{FOLDER}/{name}", encoding="latin1")
    except (OSError, EOFError, KeyError, tarfile.TarError, pickle.UnpicklingError) as err:
        raise DataError(
            f"cannot read {name!r} from {str(source)!r} ({err!r}): the CIFAR-100 archive is "
            f"corrupt or incomplete; delete it and fetch it again from {URL} (md5 {MD5})"
        ) from err


def _decode(source: Path, image_size: int) -> ClassStore:
    meta = _read_member(source, "meta")
    fine_names = list(meta["fine_label_names"])
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        d = _read_member(source, part)
        images.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        fine.append(np.asarray(d["fine_labels"]))
        coarse.append(np.asarray(d["coarse_labels"]))
        _check_part(source, part, fine_names, images[-1], fine[-1], coarse[-1])
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate(images)))
    if image_size != 32:
        x = resize(x, image_size)
    fine_all, coarse_all = np.concatenate(fine), np.concatenate(coarse)
    per_class, names = [], []
    for c, name in enumerate(fine_names):
        rows = np.flatnonzero(fine_all == c)
        if len(rows) == 0:
            raise DataError(f"{str(source)!r} has no images of class {name!r}: incomplete archive")
        per_class.append(x[torch.from_numpy(rows)])
        names.append(f"{name}:{int(coarse_all[rows[0]])}")
    return ClassStore.from_classes(per_class, names)


def _check_part(source: Path, part: str, names: list, images, fine, coarse) -> None:
    """One part of the archive holds every class's published number of images."""
    if not len(images) == len(fine) == len(coarse):
        raise DataError(
            f"{source}: the {part} part has {len(images)} images but {len(fine)} fine and "
            f"{len(coarse)} coarse labels; the archive is damaged: delete it and fetch it "
            f"again from {URL} (md5 {MD5})"
        )
    counts = np.bincount(fine[(fine >= 0) & (fine < len(names))], minlength=len(names))
    check_counts(
        f"the CIFAR-100 archive {source} ({part} part)",
        dict(zip(names, counts.tolist())),
        CLASSES,
        IMAGES_PER_CLASS[part],
        f"Delete it and fetch it again from {URL} (md5 {MD5}; data.download=true fetches it).",
    )


def _select(store: ClassStore, ids: list[int], rotations: int) -> ClassStore:
    picked = store.select(ids)
    return ClassStore(picked.images, picked.offsets, picked.counts, picked.names, rotations)
