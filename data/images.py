"""Image decoding with Pillow and numpy (torchvision is not a dependency), and listing
folders of images.

One function turns an image file into the uint8 tensor layout every class
store uses, so training data and `mode=predict` inputs go through the same
preprocessing. The listing functions are the only way the loaders read a folder: they
look at each entry with `stat` alone, so a FIFO (which blocks whoever opens it), a socket,
a device or a broken link is skipped without being opened, and every entry that is not
data (those, hidden names, folders without images) is named in one warning per folder.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metarun.errors import ConfigError, DataError, summarise

from .params import PositiveInt

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass(frozen=True)
class Preprocess:
    """How a raw image file becomes a stored uint8 tensor [C, H, W]: the `images` sub-node
    of every image data set's config (its size, channels and ink), which the loaders take,
    the backbones read (`${data.images.channels}`) and mode=predict applies to new files."""

    size: PositiveInt = 28
    channels: Literal[1, 3] = 1
    invert: bool = False  # Omniglot: dark strokes on white -> strokes = 255

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"data.images.size must be a positive integer, got {self.size!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ConfigError(
                f"data.images.channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}"
            )
        if not isinstance(self.invert, bool):
            raise ConfigError(f"data.images.invert must be true or false, got {self.invert!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def fixed(self, data: str, channels: int, invert: bool = False) -> int:
        """For a data set whose images have a format of their own (Omniglot: grayscale,
        inverted): the decode size, or a ConfigError when another format is asked."""
        for key, have, want in (
            ("channels", self.channels, channels),
            ("invert", self.invert, invert),
        ):
            if have != want:
                raise ConfigError(
                    f"data={data} images are {'grayscale' if channels == 1 else 'RGB'}"
                    f"{', inverted' if invert else ''}: data.images.{key} must be "
                    f"{str(want).lower()}, got {str(have).lower()} (data=folder decodes any format)"
                )
        return self.size

    def __call__(self, source: str | Path | bytes, name: str | None = None) -> torch.Tensor:
        return decode_image(source, self, name=name)


# the formats the loaders default to (frozen, so shared defaults are safe)
INK_28 = Preprocess(28, channels=1, invert=True)  # Omniglot-like: white strokes on black
RGB_84 = Preprocess(84, channels=3)
RGB_32 = Preprocess(32, channels=3)


def decode_image(
    source: str | Path | bytes, prep: Preprocess, name: str | None = None
) -> torch.Tensor:
    """Decode one image (a path or raw bytes) to uint8 [C, size, size]."""
    label = name or str(source)[:200]
    try:
        raw = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(raw) as img:
            img = img.convert("L" if prep.channels == 1 else "RGB")
            img = img.resize((prep.size, prep.size), Image.Resampling.LANCZOS)
            arr = np.array(img, dtype=np.uint8)  # a writable copy
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"cannot decode image {label!r}: {err}. The file is corrupt or not an image; "
            "replace it with a valid copy (or delete the archive and download it again)."
        ) from err
    if prep.invert:
        arr = 255 - arr
    if arr.ndim == 2:  # [H, W] -> [1, H, W]
        arr = arr[None]
    else:  # [H, W, C] -> [C, H, W]
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Listing:
    """What is directly inside a folder, each part sorted by name."""

    files: list[Path]  # regular files, or links to regular files
    folders: list[Path]  # sub-folders, or links to folders
    skipped: list[str]  # "name (why)" for every other entry


def scan_folder(folder: Path) -> Listing:
    """Sort the entries of `folder` into files, folders and skipped entries, without opening
    any of them (see the module docstring)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        raise DataError(
            f"cannot list the folder {folder} ({err.strerror or err}); check that it exists and "
            "is readable"
        ) from err
    files, folders, skipped = [], [], []
    for entry in entries:
        kind = "hidden" if entry.name.startswith(".") else entry_kind(entry)
        if kind == "file":
            files.append(Path(entry.path))
        elif kind == "folder":
            folders.append(Path(entry.path))
        else:
            skipped.append(f"{entry.name} ({kind})")
    return Listing(files, folders, skipped)


def entry_kind(entry: os.DirEntry | Path) -> str:
    """'file' or 'folder' (following links), else why the entry holds no data."""
    try:
        mode = entry.stat().st_mode  # follows a link: a link to a regular file is fine
    except FileNotFoundError:
        return "broken link" if entry.is_symlink() else "missing"
    except OSError as err:  # a link loop, no permission
        return f"unreadable: {err.strerror or err}"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    what = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file: {what}"


_warned: set[tuple[str, tuple[str, ...]]] = set()


def warn_skipped(folder: Path, skipped: list[str]) -> None:
    """One warning naming what was skipped in `folder`; once per process, since every split
    of a data set lists the same folders."""
    key = (str(folder), tuple(skipped))
    if skipped and key not in _warned:
        _warned.add(key)
        log.warning(
            "skipped %d entr%s of %s: %s",
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            folder,
            summarise(skipped, 10),
        )


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; the other entries are named in
    a warning."""
    listing = scan_folder(folder)
    images = [p for p in listing.files if is_image(p)]
    others = [f"{p.name} (not an image)" for p in listing.files if not is_image(p)]
    warn_skipped(
        folder, listing.skipped + others + [f"{p.name} (a folder)" for p in listing.folders]
    )
    return images


def list_folders(folder: Path) -> list[Path]:
    """Sub-folders directly inside `folder`, sorted by name; the other entries are named in a
    warning."""
    listing = scan_folder(folder)
    warn_skipped(folder, listing.skipped + [f"{p.name} (not a folder)" for p in listing.files])
    return listing.folders


def image_folders(base: Path) -> dict[str, list[Path]]:
    """Folder name -> its image files, for every sub-folder of `base` that holds images (the
    layout `base/<class>/<images>`). The entries that become no class are named in a
    warning: hidden ones, special files, broken links, sub-folders without images, and
    images lying in `base` itself when there are classes. Other files in `base` (split
    lists, notes) are left alone."""
    listing = scan_folder(base)
    classes, skipped = {}, list(listing.skipped)
    for sub in listing.folders:
        images = list_images(sub)
        if images:
            classes[sub.name] = images
        else:
            skipped.append(f"{sub.name} (no images)")
    if classes:
        skipped += [
            f"{p.name} (an image outside the class folders)" for p in listing.files if is_image(p)
        ]
    warn_skipped(base, skipped)
    return classes


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32 in [0, 1]."""
    return images.float().div_(255.0)
