"""CUB-200-2011 (Wah et al. 2011): 200 bird species, about 60 images each, resized to 84x84
RGB, with the class split of Chen, Liu, Kira, Wang, Huang (ICLR 2019, "A Closer Look at
Few-shot Classification"): the classes in id order (001 ... 200), class i (counting from
0) is training if i % 2 == 0 (100 classes), validation if i % 4 == 1 (50), test if
i % 4 == 3 (50).

Read from `root`: the official tarball `CUB_200_2011.tgz` or its extracted folder
`CUB_200_2011/` (with `images/<id>.<species>/<files>.jpg`). The tarball (1.1 GB) is not
downloaded here: it is on the Caltech data repository (data.caltech.edu, record
65de6-vp158). Each split is decoded once into the uint8 cache.

The copy must be complete: 200 classes and 11,788 images (`CLASSES`, `IMAGES`), and when
the data set's own index `images.txt` is there, exactly the images it lists.
"""

from __future__ import annotations

import os
import tarfile
from collections import defaultdict
from pathlib import Path

import torch

from metarun.errors import DataError, summarise

from .images import RGB_84, Preprocess, decode_image, image_folders, is_image
from .params import Rotations
from .store import ClassStore, cached_store, check_split_args, file_stamp, require_root

TARBALL, FOLDER = "CUB_200_2011.tgz", "CUB_200_2011"
WHERE = (
    f"{TARBALL} (from the Caltech data repository, data.caltech.edu record 65de6-vp158) or "
    f"its extracted folder {FOLDER}/ with images/<id>.<species>/"
)
# the published contents; module constants so tests can describe their small stand-in
CLASSES, IMAGES = 200, 11788
INDEX = "images.txt"  # "<id> <class folder>/<file>" per image


def split_of(index: int) -> str | None:
    """Chen et al.'s rule for the class at position `index` (0-based) in id order."""
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


def cub(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    images: Preprocess = RGB_84,
    rotations: Rotations = 1,
) -> ClassStore:
    """One split of CUB-200-2011 (100 / 50 / 50 classes)."""
    image_size = images.fixed("cub", channels=3)
    check_split_args(split, image_size, rotations)
    base = require_root(root, "cub", WHERE)
    folder, tarball = base / FOLDER / "images", base / TARBALL
    if folder.is_dir():
        source, (listing, index) = folder, _list_folder(folder)
    elif tarball.is_file():
        source, (listing, index) = tarball, _list_tarball(tarball)
    else:
        raise DataError(f"CUB-200-2011 not found under {str(base)!r}: expected {WHERE}")
    _check_complete(source, listing, index)
    classes = sorted(listing)
    names = [c for i, c in enumerate(classes) if split_of(i) == split]
    prep = Preprocess(size=image_size, channels=3)
    if source.is_dir():
        stamps = {n: [file_stamp(source / n / f) for f in listing[n]] for n in names}
    else:
        stamps = {"tarball": file_stamp(source), "files": {n: listing[n] for n in names}}
    key = {"source": str(source.resolve()), "split": split, "files": stamps, "prep": prep.as_dict()}

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


def _check_complete(source: Path, listing: dict[str, list[str]], index: list[str] | None):
    """With the index, exactly the images it lists; then all 200 classes (Chen et al.'s split
    needs them in id order) and all 11,788 images."""
    fix = f"Extract {TARBALL} again (data.caltech.edu record 65de6-vp158)."
    present = {f"{c}/{f}" for c, files in listing.items() for f in files}
    if index is not None:
        missing, extra = sorted(set(index) - present), sorted(present - set(index))
        if missing or extra:
            raise DataError(
                f"{source} does not match its {INDEX}: "
                + (
                    f"{len(missing)} listed image(s) missing: {summarise(missing)}; "
                    if missing
                    else ""
                )
                + (f"{len(extra)} image(s) not listed: {summarise(extra)}; " if extra else "")
                + fix
            )
    if len(listing) != CLASSES:
        raise DataError(
            f"{source} holds {len(listing)} class folders with images, not CUB-200-2011's "
            f"{CLASSES}; the copy is incomplete or not CUB (Chen et al.'s split needs all "
            f"{CLASSES} in id order). {fix}"
        )
    if len(present) != IMAGES:
        raise DataError(
            f"{source} holds {len(present)} images, not CUB-200-2011's {IMAGES}; the copy is "
            f"incomplete. {fix}"
        )


def _list_folder(folder: Path) -> tuple[dict[str, list[str]], list[str] | None]:
    """Class folder -> image file names, and the index's entries when images.txt is there."""
    listing = {c: [p.name for p in paths] for c, paths in image_folders(folder).items()}
    index_path = folder.parent / INDEX
    index = _read_index(index_path.read_text()) if index_path.is_file() else None
    return listing, index


def _read_index(text: str) -> list[str]:
    return [line.split(maxsplit=1)[1].strip() for line in text.splitlines() if line.strip()]


def _list_tarball(path: Path) -> tuple[dict[str, list[str]], list[str] | None]:
    listing: dict[str, list[str]] = defaultdict(list)
    index = None
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                parts = m.name.split("/")
                if m.isfile() and m.name == f"{FOLDER}/{INDEX}":
                    index = _read_index(tar.extractfile(m).read().decode())
                elif m.isfile() and len(parts) == 4 and parts[:2] == [FOLDER, "images"]:
                    if is_image(Path(parts[3])) and not parts[3].startswith("."):
                        listing[parts[2]].append(parts[3])
    except (OSError, EOFError, tarfile.TarError) as err:
        raise DataError(
            f"cannot read {str(path)!r} ({err!r}): the tarball is corrupt or truncated; fetch it again"
        ) from err
    return {k: sorted(v) for k, v in listing.items()}, index


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
