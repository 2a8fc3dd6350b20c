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
numpy's npz cannot be read in parts); form 3 decodes image by image.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .images import Preprocess, decode_image, list_images
from .store import ClassStore, cache_dir, cache_key, check_split_args, require_root, resize

FORMS = (
    "{split}_images_png.pkl with {split}_labels.pkl (Ren et al.'s release), "
    "{split}_images.npz with {split}_labels.pkl, or a folder {split}/<class>/<images>"
)


def tiered_imagenet(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    image_size: int = 84,
    rotations: int = 1,
) -> ClassStore:
    """One split of tieredImageNet, memory-mapped from the decoded cache."""
    check_split_args(split, image_size, rotations)
    base = require_root(root, "tieredimagenet", FORMS)
    png, npz = base / f"{split}_images_png.pkl", base / f"{split}_images.npz"
    labels, folder = base / f"{split}_labels.pkl", base / split
    if png.is_file() or npz.is_file():
        source = png if png.is_file() else npz
        if not labels.is_file():
            raise DataError(f"{str(source)!r} needs its labels file {str(labels)!r} beside it")
        sources = [source, labels]
    elif folder.is_dir():
        source, sources = folder, [folder]
    else:
        raise DataError(
            f"no tieredImageNet {split} split under {str(base)!r}; accepted: "
            + FORMS.format(split=split)
        )
    key = cache_key(
        sources=[(str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in sources],
        image_size=image_size,
        format=1,
    )
    data_path = cache_dir() / f"tiered-{key}.u8"
    index_path = data_path.with_suffix(".json")
    if not (data_path.is_file() and index_path.is_file()):
        if source is folder:
            groups = _folder_groups(folder)
        else:
            groups = _array_groups(source, labels)
        _write_cache(groups, image_size, data_path, index_path)
    return _map(data_path, index_path, image_size, rotations)


def _folder_groups(folder: Path):
    """(class name, [loader per image]) for the folder form."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and list_images(d))
    if not classes:
        raise DataError(f"{str(folder)!r} has no class folders with images")
    return [(d.name, [(lambda p=p: p) for p in list_images(d)]) for d in classes]


def _array_groups(source: Path, labels_path: Path):
    """(class name, [loader per image]) for the two pickle/npz forms."""
    try:
        with open(labels_path, "rb") as f:
            meta = pickle.load(f, encoding="latin1")
        labels = np.asarray(meta["label_specific"]).astype(np.int64)
        names = list(meta.get("label_specific_str", [])) or [
            str(i) for i in range(labels.max() + 1)
        ]
        if source.suffix == ".npz":
            with np.load(source) as z:
                images = z["images"]
        else:
            with open(source, "rb") as f:
                images = pickle.load(f, encoding="latin1")
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
    groups = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        name = names[c] if c < len(names) else str(c)
        groups.append((name, [(lambda r=r: images[r]) for r in rows]))
    return groups


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
    prep = Preprocess(size=size, channels=3)
    n = sum(len(loaders) for _, loaders in groups)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_path.with_suffix(f".tmp{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    row, counts, names = 0, [], []
    try:
        for name, loaders in groups:
            for load in loaders:
                out[row] = _to_chw(load(), prep, size).numpy()
                row += 1
            counts.append(len(loaders))
            names.append(name)
        out.flush()
        del out
        os.replace(tmp, data_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    index_tmp = index_path.with_suffix(f".tmp{os.getpid()}")
    index_tmp.write_text(json.dumps({"counts": counts, "names": names, "n": n}))
    os.replace(index_tmp, index_path)


def _map(data_path: Path, index_path: Path, size: int, rotations: int) -> ClassStore:
    index = json.loads(index_path.read_text())
    # copy-on-write mapping: pages are read from disk when an episode touches them
    images = np.load(data_path, mmap_mode="c")
    if images.shape != (index["n"], 3, size, size):
        raise DataError(f"cache file {str(data_path)!r} is damaged; delete it to rebuild")
    counts = torch.tensor(index["counts"], dtype=torch.int64)
    offsets = torch.cumsum(counts, 0) - counts
    return ClassStore(torch.from_numpy(images), offsets, counts, index["names"], rotations)
