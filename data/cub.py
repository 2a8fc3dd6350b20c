"""CUB-200-2011 (Wah et al. 2011): 200 bird species, about 60 images each, resized to 84x84
RGB, with the class split of Chen, Liu, Kira, Wang, Huang (ICLR 2019, "A Closer Look at
Few-shot Classification"): the classes in id order (001 ... 200), class i (counting from
0) is training if i % 2 == 0 (100 classes), validation if i % 4 == 1 (50), test if
i % 4 == 3 (50).

Read from `root`: the official tarball `CUB_200_2011.tgz` or its extracted folder
`CUB_200_2011/` (with `images/<id>.<species>/<files>.jpg`). The tarball (1.1 GB) is not
downloaded here: it is on the Caltech data repository (data.caltech.edu, record
65de6-vp158). Each split is decoded once into the uint8 cache.
"""

from __future__ import annotations

import os
import tarfile
from collections import defaultdict
from pathlib import Path

import torch

from .errors import DataError
from .images import IMAGE_SUFFIXES, Preprocess, decode_image
from .store import ClassStore, cached_store, check_split_args, require_root

TARBALL, FOLDER = "CUB_200_2011.tgz", "CUB_200_2011"
WHERE = (
    f"{TARBALL} (from the Caltech data repository, data.caltech.edu record 65de6-vp158) or "
    f"its extracted folder {FOLDER}/ with images/<id>.<species>/"
)


def split_of(index: int) -> str | None:
    """Chen et al.'s rule for the class at position `index` (0-based) in id order."""
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


def cub(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    image_size: int = 84,
    rotations: int = 1,
) -> ClassStore:
    """One split of CUB-200-2011 (100 / 50 / 50 classes)."""
    check_split_args(split, image_size, rotations)
    base = require_root(root, "cub", WHERE)
    folder, tarball = base / FOLDER / "images", base / TARBALL
    if folder.is_dir():
        source, listing = folder, _list_folder(folder)
    elif tarball.is_file():
        source, listing = tarball, _list_tarball(tarball)
    else:
        raise DataError(f"CUB-200-2011 not found under {str(base)!r}: expected {WHERE}")
    classes = sorted(listing)
    if len(classes) != 200:
        raise DataError(
            f"{str(source)!r} holds {len(classes)} class folders, not CUB-200-2011's 200; the "
            "copy is incomplete or not CUB (Chen et al.'s split needs all 200 in id order)"
        )
    names = [c for i, c in enumerate(classes) if split_of(i) == split]
    prep = Preprocess(size=image_size, channels=3)
    stat = source.stat()
    key = {
        "source": str(source.resolve()),
        "mtime": stat.st_mtime_ns,
        "split": split,
        "files": {n: listing[n] for n in names},
        "prep": prep.as_dict(),
    }

    def build() -> ClassStore:
        if source.is_dir():
            per_class = [
                torch.stack([decode_image(source / n / f, prep) for f in listing[n]]) for n in names
            ]
        else:
            per_class = _decode_tarball(source, names, listing, prep)
        return ClassStore.from_classes(per_class, names)

    store = cached_store("cub", key, build)
    return ClassStore(store.images, store.offsets, store.counts, store.names, rotations)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _list_folder(folder: Path) -> dict[str, list[str]]:
    return {
        d.name: sorted(f.name for f in d.iterdir() if f.is_file() and _is_image(f.name))
        for d in folder.iterdir()
        if d.is_dir()
    }


def _list_tarball(path: Path) -> dict[str, list[str]]:
    listing: dict[str, list[str]] = defaultdict(list)
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")
                if m.isfile() and len(parts) == 4 and parts[:2] == [FOLDER, "images"]:
                    if _is_image(parts[3]):
                        listing[parts[2]].append(parts[3])
    except (OSError, EOFError, tarfile.TarError) as err:
        raise DataError(
            f"cannot read {str(path)!r} ({err!r}): the tarball is corrupt or truncated; fetch it again"
        ) from err
    return {k: sorted(v) for k, v in listing.items()}


def _decode_tarball(path: Path, names, listing, prep: Preprocess) -> list[torch.Tensor]:
    wanted = {f"{FOLDER}/images/{n}/{f}": n for n in names for f in listing[n]}
    found: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if m.name in wanted:
                    data = tar.extractfile(m).read()
                    found[wanted[m.name]][m.name] = decode_image(
                        data, prep, name=f"{path}:{m.name}"
                    )
    except (OSError, EOFError, tarfile.TarError) as err:
        raise DataError(
            f"cannot read {str(path)!r} ({err!r}): the tarball is corrupt or truncated; fetch it again"
        ) from err
    return [torch.stack([found[n][k] for k in sorted(found[n])]) for n in names]
