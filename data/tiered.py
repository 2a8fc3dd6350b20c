"""tieredImageNet (Ren et al., ICLR 2018): 608 ImageNet classes grouped by 34 high-level
categories, split 351 / 97 / 160 classes (20 / 6 / 8 categories), 84x84 RGB, about 779k
images. Read from `root` in one of three forms:

1. Ren et al.'s release: `{split}_images_png.pkl` (one PNG-encoded image per entry) with
   `{split}_labels.pkl` (a dict with `label_specific`, one class index per image, and
   `label_specific_str`, the class names);
2. the decoded form shared by learn2learn-era code: `{split}_images.npz` (`images`, uint8
   [N, 84, 84, 3]) with the same `{split}_labels.pkl`;
3. folders: `{split}/<class>/<image files>`.

The split is the one these files define (the published class lists; metarun cannot ship
the images). The decoded split lives in a memory-mapped uint8 file in the cache
(`$METARUN_CACHE`), written class by class, so once it exists a run maps it and reads only
the images its episodes touch: the resident memory of training does not grow with the
data set. The first decode of forms 1 and 2 loads the source file once (Python's pickle and
numpy's npz cannot be read in parts); form 3 decodes image by image. A cache that cannot be
written (no space, read-only) is not fatal: the split is then decoded into memory.

A split must be complete: as many labels as images, images for every class the labels file
names, and the published class count (`SPLIT_CLASSES`). The pickles are read with
`safe_pickle`, which refuses any file that would run code when loaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from metarun.errors import DataError, summarise

from . import safe_pickle
from .images import RGB_84, Preprocess, decode_image, image_folders
from .params import Rotations
from .store import (
    ClassStore,
    cache_dir,
    cache_key,
    check_counts,
    check_split_args,
    file_stamp,
    require_root,
    resize,
)

log = logging.getLogger(__name__)

FORMS = (
    "{split}_images_png.pkl with {split}_labels.pkl (Ren et al.'s release), "
    "{split}_images.npz with {split}_labels.pkl, or a folder {split}/<class>/<images>"
)
# Ren et al.'s split; a module constant so tests can describe their small stand-ins
SPLIT_CLASSES = {"train": 351, "val": 97, "test": 160}
CACHE_FORMAT = 2  # bump when decoding or its checks change, so older cache files are not used


def tiered_imagenet(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    images: Preprocess = RGB_84,
    rotations: Rotations = 1,
) -> ClassStore:
    """One split of tieredImageNet, memory-mapped from the decoded cache."""
    image_size = images.fixed("tieredimagenet", channels=3)
    check_split_args(split, image_size, rotations)
    base = require_root(root, "tieredimagenet", FORMS)
    png, npz = base / f"{split}_images_png.pkl", base / f"{split}_images.npz"
    labels, folder = base / f"{split}_labels.pkl", base / split
    if png.is_file() or npz.is_file():
        source = png if png.is_file() else npz
        if not labels.is_file():
            raise DataError(f"{str(source)!r} needs its labels file {str(labels)!r} beside it")
        stamps = [str(source.resolve()), file_stamp(source), file_stamp(labels)]
        load_groups = lambda: _array_groups(source, labels, split)  # noqa: E731
    elif folder.is_dir():
        classes = image_folders(folder)
        stamps = {
            "root": str(folder.resolve()),
            "classes": {c: [file_stamp(p) for p in paths] for c, paths in classes.items()},
        }
        load_groups = lambda: _folder_groups(folder, classes, split)  # noqa: E731
    else:
        raise DataError(
            f"no tieredImageNet {split} split under {str(base)!r}; accepted: "
            + FORMS.format(split=split)
        )
    key = cache_key(sources=stamps, image_size=image_size, format=CACHE_FORMAT)
    data_path = cache_dir() / f"tiered-{key}.u8"
    index_path = data_path.with_suffix(".json")
    if not (data_path.is_file() and index_path.is_file()):
        groups = load_groups()
        try:
            _write_cache(groups, image_size, data_path, index_path)
        except OSError as err:  # an unwritable cache must not stop the run
            log.warning(
                "could not write the decode cache %s (%s); decoding the %s split into memory "
                "instead, and again on the next run. Point METARUN_CACHE at a writable folder "
                "with free space to keep it.",
                data_path,
                err,
                split,
            )
            return _in_memory(groups, image_size, rotations)
    return _map(data_path, index_path, image_size, rotations)


def _check_complete(split: str, source: Path, groups) -> None:
    check_counts(
        f"tieredImageNet's {split} split ({source})",
        {name: len(loaders) for name, loaders in groups},
        SPLIT_CLASSES[split],
        None,
        "The published split has 351 / 97 / 160 classes (train / val / test); copy the "
        "split's files again.",
    )


def _folder_groups(folder: Path, classes: dict[str, list[Path]], split: str):
    """(class name, [loader per image]) for the folder form."""
    if not classes:
        raise DataError(f"{str(folder)!r} has no class folders with images")
    groups = [(name, [(lambda p=p: p) for p in paths]) for name, paths in classes.items()]
    _check_complete(split, folder, groups)
    return groups


def _array_groups(source: Path, labels_path: Path, split: str):
    """(class name, [loader per image]) for the two pickle/npz forms."""
    try:
        meta = safe_pickle.load_path(labels_path, encoding="latin1")
        labels = np.asarray(meta["label_specific"]).astype(np.int64)
        names = list(meta.get("label_specific_str", [])) or [
            str(i) for i in range(labels.max() + 1)
        ]
        if source.suffix == ".npz":
            with np.load(source) as z:
                images = z["images"]
        else:
            images = safe_pickle.load_path(source, encoding="latin1")
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(
            f"cannot read tieredImageNet from {str(source)!r} / {str(labels_path)!r} ({err!r}); "
            "the files are truncated or not in the accepted form: copy them again"
        ) from err
    if len(images) != len(labels):
        raise DataError(
            f"{str(source)!r} has {len(images)} images but {str(labels_path)!r} has "
            f"{len(labels)} labels"
        )
    _check_labels(labels_path, labels, names)
    groups = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        groups.append((names[c], [(lambda r=r: images[r]) for r in rows]))
    _check_complete(split, source, groups)
    return groups


def _check_labels(path: Path, labels: np.ndarray, names: list[str]) -> None:
    """The labels file is the split's index: every class it names has images, and every
    label is one of its classes."""
    present = set(np.unique(labels).tolist())
    outside = sorted(c for c in present if not 0 <= c < len(names))
    empty = [name for c, name in enumerate(names) if c not in present]
    if outside or empty:
        raise DataError(
            f"{path} does not match its images: "
            + (f"labels {summarise(outside)} name no class; " if outside else "")
            + (f"classes without images: {summarise(empty)}; " if empty else "")
            + "the copy is incomplete or damaged: copy the split's files again"
        )


def _to_chw(item, prep: Preprocess, size: int) -> torch.Tensor:
    """A path, PNG bytes (possibly as a numpy byte array) or an HWC uint8 array -> [3, S, S]."""
    if isinstance(item, Path):
        return decode_image(item, prep)
    arr = np.asarray(item)
    if arr.ndim == 3:
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8)).permute(2, 0, 1)
        return x if x.shape[-1] == size else resize(x[None], size)[0]
    return decode_image(arr.tobytes() if isinstance(item, np.ndarray) else bytes(item), prep)


def _write_cache(groups, size: int, data_path: Path, index_path: Path) -> None:
    """Decode class by class straight into a memory-mapped file, then write the index; both
    under temporary names, renamed when complete."""
    n = sum(len(loaders) for _, loaders in groups)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_path.with_name(f"{data_path.name}.tmp{os.getpid()}")
    index_tmp = index_path.with_name(f"{index_path.name}.tmp{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
        _reserve(tmp)
        counts, names = _decode_into(out, groups, size)
        out.flush()
        del out
        index_tmp.write_text(json.dumps({"counts": counts, "names": names, "n": n}))
        os.replace(tmp, data_path)
        os.replace(index_tmp, index_path)
    except BaseException:
        for path in (tmp, index_tmp):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now: writing into a memory map of a sparse file on a full
    disk kills the process with SIGBUS, where this raises OSError."""
    if not hasattr(os, "posix_fallocate"):  # macOS: no way to reserve, the map stays sparse
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
                raise


def _decode_into(out: np.ndarray, groups, size: int) -> tuple[list[int], list[str]]:
    """Fill out [N, 3, S, S] class by class; returns each class's count and name."""
    prep = Preprocess(size=size, channels=3)
    row, counts, names = 0, [], []
    for name, loaders in groups:
        for load in loaders:
            out[row] = _to_chw(load(), prep, size).numpy()
            row += 1
        counts.append(len(loaders))
        names.append(name)
    return counts, names


def _in_memory(groups, size: int, rotations: int) -> ClassStore:
    n = sum(len(loaders) for _, loaders in groups)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    counts, names = _decode_into(out, groups, size)
    counts = torch.tensor(counts, dtype=torch.int64)
    return ClassStore(
        torch.from_numpy(out), torch.cumsum(counts, 0) - counts, counts, names, rotations
    )


def _map(data_path: Path, index_path: Path, size: int, rotations: int) -> ClassStore:
    index = json.loads(index_path.read_text())
    # copy-on-write mapping: pages are read from disk when an episode touches them
    images = np.load(data_path, mmap_mode="c")
    if images.shape != (index["n"], 3, size, size):
        raise DataError(f"cache file {str(data_path)!r} is damaged; delete it to rebuild")
    counts = torch.tensor(index["counts"], dtype=torch.int64)
    offsets = torch.cumsum(counts, 0) - counts
    return ClassStore(torch.from_numpy(images), offsets, counts, index["names"], rotations)
