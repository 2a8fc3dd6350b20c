"""Small stand-ins for each data set's files on disk, shared by the data tests (not a test module)."""

from __future__ import annotations

import functools
import io
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import metarun.data.omniglot as om
from metarun.data.omniglot import DEFAULT_VAL_ALPHABETS

# CIFAR-100's fine label names in label order, and each one's superclass index
FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house "
    "kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle "
    "mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew "
    "skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf "
    "woman worm"
).split()


COARSE = [
    4,
    1,
    14,
    8,
    0,
    6,
    7,
    7,
    18,
    3,
    3,
    14,
    9,
    18,
    7,
    11,
    3,
    9,
    7,
    11,
    6,
    11,
    5,
    10,
    7,
    6,
    13,
    15,
    3,
    15,
    0,
    11,
    1,
    10,
    12,
    14,
    16,
    9,
    11,
    5,
    5,
    19,
    8,
    8,
    15,
    13,
    14,
    17,
    18,
    10,
    16,
    4,
    17,
    4,
    2,
    0,
    17,
    4,
    18,
    17,
    10,
    3,
    2,
    12,
    12,
    16,
    12,
    1,
    9,
    19,
    2,
    10,
    0,
    1,
    16,
    12,
    9,
    13,
    15,
    13,
    16,
    19,
    2,
    4,
    6,
    19,
    5,
    5,
    8,
    19,
    18,
    1,
    2,
    15,
    6,
    0,
    17,
    8,
    14,
    13,
]


def fake_archive(path, per_class=(2, 1)):
    """cifar-100-python.tar.gz with `per_class` train/test images per class: pixel value
    = class label, so every image tells where it came from."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:gz") as tar:

        def add(name, obj):
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        add("meta", {"fine_label_names": FINE, "coarse_label_names": [f"s{i}" for i in range(20)]})
        for part, n in zip(("train", "test"), per_class):
            labels = [c for c in range(100) for _ in range(n)]
            data = np.repeat(np.array(labels, dtype=np.uint8)[:, None], 3072, axis=1)
            add(
                part,
                {"data": data, "fine_labels": labels, "coarse_labels": [COARSE[c] for c in labels]},
            )
    path.write_bytes(tar_bytes.getvalue())
    return path


def make_cub(base, per_class=2):
    rng = np.random.default_rng(0)
    images = base / "CUB_200_2011" / "images"
    for i in range(1, 201):
        d = images / f"{i:03d}.Species_{i}"
        d.mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(
                d / f"bird_{i}_{k}.jpg"
            )
    return base


def make_tree(root, classes=10, per_class=4, size=(12, 10), mode="RGB"):
    """Class folders of small random images (a different colour per class)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode).save(d / f"img_{i}.{'png' if i % 2 else 'jpg'}")
    return root


SPLIT_CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}


def csv_form(root, per_class=3, size=20):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for split, classes in SPLIT_CLASSES.items():
        lines = ["filename,label"]
        for c in classes:
            for i in range(per_class):
                name = f"{c}{i:04d}.jpg"
                arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / "images" / name)
                lines.append(f"{name},{c}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def pickle_form(root, per_class=3, side=84):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for split, classes in SPLIT_CLASSES.items():
        n = per_class * len(classes)
        data = {
            "image_data": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
            "class_dict": {
                c: list(range(k * per_class, (k + 1) * per_class)) for k, c in enumerate(classes)
            },
        }
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump(data, f)
    return root, data


FULL = {
    "images_background.zip": (*DEFAULT_VAL_ALPHABETS, "Greek", "Latin"),
    "images_evaluation.zip": ("Angelic", "Tengwar"),
}


@functools.cache
def drawing(label: str) -> bytes:
    """A 105x105 1-bit PNG, black stroke on white, different for every label."""
    seed = zlib.crc32(label.encode())
    img = Image.new("1", (105, 105), 1)
    x, y = 10 + seed % 60, 10 + (seed >> 8) % 60
    ImageDraw.Draw(img).line([(x, y), (x + 30, y + 25), (x + 5, y + 30)], fill=0, width=5)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_zip(
    path: Path, alphabets, chars: int = 2, images: int = 20, bad_member: str = ""
) -> None:
    """A fake archive with the real layout <stem>/<Alphabet>/characterNN/<id>_<drawer>.png."""
    stem = path.name[:-4]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{stem}/", b"")
        for alphabet in alphabets:
            for c in range(1, chars + 1):
                folder = f"{stem}/{alphabet}/character{c:02d}"
                for i in range(1, images + 1):
                    member = f"{folder}/{c:04d}_{i:02d}.png"
                    # keyed without the archive: same drawing in both zips, like the real files
                    label = f"{alphabet}/{c}/{i}"
                    zf.writestr(member, b"not a png" if member == bad_member else drawing(label))


def make_root(root: Path, archives: dict, **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, alphabets in archives.items():
        write_zip(root / name, alphabets, **kw)
    return root


def expect(monkeypatch, archives: dict, chars: int = 2, images: int = 20) -> None:
    """Make the loader's table of official contents describe the fakes (write_zip's layout)."""
    fakes = {name: dict.fromkeys(alphabets, chars) for name, alphabets in archives.items()}
    monkeypatch.setattr(om, "CONTENTS", {**om.CONTENTS, **fakes})
    monkeypatch.setattr(om, "DRAWINGS", images)


NAMES = ["n001", "n002", "n003"]


PER_CLASS = 4


def arrays(side=20, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), PER_CLASS)[::-1].copy()  # classes not in order on disk
    images = rng.integers(0, 256, (len(labels), side, side, 3), dtype=np.uint8)
    return images, labels


def write_labels(path, labels):
    with open(path, "wb") as f:
        pickle.dump({"label_specific": labels, "label_specific_str": NAMES}, f)
