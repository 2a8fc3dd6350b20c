"""Image decoding with Pillow and numpy (torchvision is not a dependency).

One function turns an image file into the uint8 tensor layout every class
store uses, so training data and `mode=predict` inputs go through the same
preprocessing.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass(frozen=True)
class Preprocess:
    """How a raw image file becomes a stored uint8 tensor [C, H, W]."""

    size: int = 28
    channels: int = 1
    invert: bool = False  # Omniglot: dark strokes on white -> strokes = 255

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, source: str | Path | bytes, name: str | None = None) -> torch.Tensor:
        return decode_image(source, self, name=name)


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


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32 in [0, 1]."""
    return images.float().div_(255.0)
