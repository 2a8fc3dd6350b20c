"""Omniglot (Lake et al., Science 2015) as class stores, one character per class.

>>> train = omniglot(split="train")            # full set, 4 rotations -> 4 x classes
>>> val = omniglot_small("/data/omniglot", split="val", download=False)

Archives are read straight from their zips (or from extracted folders of the
same name). Each archive is decoded once into a store of all its characters,
cached on disk by `cached_store` (never inside the data root) and memoised in
the process, so train/val/test are cheap cuts of the same decoded tensor.
Rotations are not decoded: the split's `ClassStore` derives them by index.

An archive must hold exactly the official contents (`CONTENTS`: its alphabets, characters
character01..characterN, `DRAWINGS` drawings each); anything else is refused when it is
decoded, naming what is missing, so no run trains or tests on part of Omniglot.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from metarun.errors import ConfigError, DataError, summarise

from .download import download_root, fetch
from .episodes import PROTOCOLS
from .images import INK_28, Preprocess, decode_image, list_folders, list_images
from .params import NonNegativeInt, Rotations
from .store import (
    SPLITS,
    ClassStore,
    alphabet_of,
    cache_dir,
    cache_key,
    cached_store,
    check_split_args,
    file_stamp,
)

log = logging.getLogger(__name__)

# Raw files of github.com/brendenlake/omniglot; a module constant so tests can point it elsewhere.
BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
    "images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd",
}
BACKGROUND, EVALUATION = "images_background.zip", "images_evaluation.zip"
SMALL_ARCHIVES = ("images_background_small1.zip", "images_background_small2.zip")

SPLIT_BY = ("alphabet", "character")
# Five background alphabets held out for validation when splitting the full set by alphabet.
DEFAULT_VAL_ALPHABETS = ("Bengali", "Futurama", "Hebrew", "Korean", "Tifinagh")
# The recommended split of the 8 alphabets of the two small archives (242 characters).
SMALL_SPLITS = {
    "train": ("Balinese", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit"),  # 179
    "val": ("Greek",),  # 24
    "test": ("Early_Aramaic", "Tagalog"),  # 39
}
# bump when the decoded layout or the checks change, so old cache files are ignored (for
# one, stores decoded from incomplete archives before the CONTENTS check; 3: the store
# keeps each image's drawer, which Lake's within-alphabet episodes need)
CACHE_FORMAT = 3

# The official archives: alphabet -> number of characters; every character has DRAWINGS
# drawings. Module constants, so that tests can describe their small stand-ins.
DRAWINGS = 20
_SMALL1 = {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40, "Latin": 26}
_SMALL2 = {"Greek": 24, "Japanese_(katakana)": 47, "Latin": 26, "Sanskrit": 42, "Tagalog": 17}
_BACKGROUND = {
    "Alphabet_of_the_Magi": 20,
    "Anglo-Saxon_Futhorc": 29,
    "Arcadian": 26,
    "Armenian": 41,
    "Asomtavruli_(Georgian)": 40,
    "Balinese": 24,
    "Bengali": 46,
    "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
    "Braille": 26,
    "Burmese_(Myanmar)": 34,
    "Cyrillic": 33,
    "Early_Aramaic": 22,
    "Futurama": 26,
    "Grantha": 43,
    "Greek": 24,
    "Gujarati": 48,
    "Hebrew": 22,
    "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
    "Japanese_(hiragana)": 52,
    "Japanese_(katakana)": 47,
    "Korean": 40,
    "Latin": 26,
    "Malay_(Jawi_-_Arabic)": 40,
    "Mkhedruli_(Georgian)": 41,
    "N_Ko": 33,
    "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14,
    "Sanskrit": 42,
    "Syriac_(Estrangelo)": 23,
    "Tagalog": 17,
    "Tifinagh": 55,
}
_EVALUATION = {
    "Angelic": 20,
    "Atemayar_Qelisayer": 26,
    "Atlantean": 26,
    "Aurek-Besh": 26,
    "Avesta": 26,
    "Ge_ez": 26,
    "Glagolitic": 45,
    "Gurmukhi": 45,
    "Kannada": 41,
    "Keble": 26,
    "Malayalam": 47,
    "Manipuri": 40,
    "Mongolian": 30,
    "Old_Church_Slavonic_(Cyrillic)": 45,
    "Oriya": 46,
    "Sylheti": 28,
    "Syriac_(Serto)": 23,
    "Tengwar": 25,
    "Tibetan": 42,
    "ULOG": 26,
}
CONTENTS = {
    "images_background.zip": _BACKGROUND,  # 30 alphabets, 964 characters
    "images_evaluation.zip": _EVALUATION,  # 20 alphabets, 659 characters
    "images_background_small1.zip": _SMALL1,  # 5 alphabets, 136 characters
    "images_background_small2.zip": _SMALL2,  # 5 alphabets, 156 characters
}


# ---------------------------------------------------------------- public API


def omniglot(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    download: bool = True,
    rotations: Rotations = 4,
    images: Preprocess = INK_28,
    split_by: str = "alphabet",
    val_alphabets: Sequence[str] = DEFAULT_VAL_ALPHABETS,
    character_split: Sequence[NonNegativeInt] = (1100, 100, 423),
    seed: NonNegativeInt = 0,
) -> ClassStore:
    """One split of full Omniglot (1623 characters, 20 drawings each).

    split_by="alphabet": train = background alphabets minus `val_alphabets`,
    val = `val_alphabets`, test = the 20 evaluation alphabets.
    split_by="character": all characters of both archives, shuffled by `seed`,
    cut into `character_split` = (n_train, n_val, n_test) characters.
    """
    image_size = images.fixed("omniglot", channels=1, invert=True)
    check_split_args(split, image_size, rotations)
    _check_choice("split_by", split_by, SPLIT_BY)
    folder = download_root(root)
    if split_by == "character":
        store = _union(_load(folder, (BACKGROUND, EVALUATION), download, image_size))
        ids = _character_split(store.n_base, character_split, seed)[split]
    elif split == "test":
        store = _load(folder, (EVALUATION,), download, image_size)[0]
        ids = list(range(store.n_base))
    else:
        store = _load(folder, (BACKGROUND,), download, image_size)[0]
        held_out = _check_val_alphabets(val_alphabets, store.names)
        ids = [
            i
            for i, name in enumerate(store.names)
            if (alphabet_of(name) in held_out) == (split == "val")
        ]
    return _cut(store, ids, rotations, f"Omniglot {split!r} split (split_by={split_by!r})")


def omniglot_small(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    download: bool = True,
    rotations: Rotations = 4,
    images: Preprocess = INK_28,
) -> ClassStore:
    """One split of the two official small background sets (8 alphabets, 242 characters).

    Greek and Latin are in both archives with identical files and count once.
    """
    image_size = images.fixed("omniglot_small", channels=1, invert=True)
    check_split_args(split, image_size, rotations)
    store = _union(_load(download_root(root), SMALL_ARCHIVES, download, image_size))
    keep = set(SMALL_SPLITS[split])
    ids = [i for i, name in enumerate(store.names) if alphabet_of(name) in keep]
    return _cut(
        store, ids, rotations, f"small Omniglot {split!r} split ({', '.join(sorted(keep))})"
    )


# their stores know each image's drawer and each character's alphabet, so they support
# Lake's within-alphabet evaluation episodes as well (runners/validate.py reads this)
omniglot.eval_protocols = omniglot_small.eval_protocols = PROTOCOLS


# ---------------------------------------------------------------- arguments


def _check_choice(what: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_val_alphabets(val_alphabets: Sequence[str], names: list[str]) -> set[str]:
    """The held-out alphabets as a set; every one must be a background alphabet."""
    if isinstance(val_alphabets, str):  # a lone name, not its characters
        val_alphabets = [val_alphabets]
    known = sorted({alphabet_of(n) for n in names})
    unknown = [a for a in val_alphabets if a not in known]
    if unknown:
        raise ConfigError(
            f"val_alphabets {unknown} are not background alphabets of Omniglot; "
            f"choose from: {', '.join(known)}"
        )
    return set(val_alphabets)


def _character_split(total: int, sizes: Sequence[int], seed: int) -> dict[str, list[int]]:
    """Shuffle all `total` characters with `seed` and cut consecutive runs of `sizes`."""
    sizes = [int(n) for n in sizes]
    if len(sizes) != 3 or min(sizes) < 0:
        raise ConfigError(
            f"character_split must be 3 non-negative counts (train, val, test), got {sizes}"
        )
    if sum(sizes) > total:
        raise ConfigError(
            f"character_split {sizes} asks for {sum(sizes)} characters but the archives hold {total}"
        )
    # the store is sorted by name, so the same seed always gives the same split
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    # each split keeps name order, like the alphabet splits
    return {s: sorted(perm[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}


# ---------------------------------------------------------------- stores


def _cut(store: ClassStore, ids: list[int], rotations: int, what: str) -> ClassStore:
    if not ids:
        raise ConfigError(
            f"the {what} has no characters; check the split settings and the archives"
        )
    return store.select(ids, rotations=rotations)


def _union(stores: list[ClassStore]) -> ClassStore:
    """All classes of `stores` in name order, each name once (the first store's copy wins)."""
    if len(stores) == 1:
        return stores[0]  # an archive store is already sorted and unique
    shifts = torch.cumsum(torch.tensor([0] + [len(s.images) for s in stores[:-1]]), 0)
    merged = ClassStore(
        torch.cat([s.images for s in stores]),  # [sum N, 1, S, S]
        torch.cat([s.offsets + shift for s, shift in zip(stores, shifts)]),
        torch.cat([s.counts for s in stores]),
        [name for s in stores for name in s.names],
        drawers=torch.cat([s.drawers for s in stores]),  # [sum N]
    )
    first: dict[str, int] = {}
    for i, name in enumerate(merged.names):
        first.setdefault(name, i)
    return merged.select([first[name] for name in sorted(first)])


def _load(
    folder: Path, archives: Sequence[str], download: bool, image_size: int
) -> list[ClassStore]:
    """One decoded store (rotations=1) per archive, fetching missing archives first."""
    paths = _ensure_archives(folder, archives, download)
    return [_load_archive(path, _fingerprint(path), image_size, str(cache_dir())) for path in paths]


@functools.lru_cache(maxsize=8)
def _load_archive(path: Path, fingerprint: tuple, image_size: int, cache: str) -> ClassStore:
    """Decoded store of one archive, from the disk cache when the archive is unchanged.

    `cache` only keys the memo: a different cache folder must not reuse a store.
    """
    prep = Preprocess(size=image_size, channels=1, invert=True)
    key = {"fingerprint": fingerprint, "preprocess": prep.as_dict(), "format": CACHE_FORMAT}
    return cached_store(f"omniglot-{_stem(path)}", key, lambda: _decode_archive(path, prep))


def _stem(path: Path) -> str:
    return path.name[:-4] if path.name.endswith(".zip") else path.name


def _fingerprint(path: Path) -> tuple:
    """A zip's file stamp, or a digest of the stamps of every drawing in an extracted folder
    (so an edited, added or removed drawing means a new decode)."""
    if path.is_file():
        return file_stamp(path)
    stamps = [file_stamp(path / m, m) for m in _FolderReader(path).members()]
    return (path.name, len(stamps), cache_key(stamps=stamps))


# ---------------------------------------------------------------- decoding


def _decode_archive(path: Path, prep: Preprocess) -> ClassStore:
    """Decode every drawing of one archive: class = "<Alphabet>/<characterNN>", and keep
    who drew each image (the file name's `_<drawer>`)."""
    log.info("decoding %s once; later runs read the cache in %s", path, cache_dir())
    reader = _ZipReader(path) if path.is_file() else _FolderReader(path)
    with reader:
        classes = _group(reader.members())
        if not classes:
            raise DataError(
                f"{path} holds no images in the Omniglot layout "
                f"{_stem(path)}/<Alphabet>/<characterNN>/<image>.png; delete it and download it again."
            )
        _check_complete(path, classes)
        drawers = [
            torch.tensor([_drawer(reader, m) for m in members]) for members in classes.values()
        ]
        per_class = [
            torch.stack([_decode_member(reader, m, prep) for m in members])  # [n, 1, S, S]
            for members in classes.values()
        ]
    return ClassStore.from_classes(per_class, list(classes), drawers=drawers)


def _drawer(reader, member: str) -> int:
    """The drawer of `<Alphabet>/<characterNN>/<id>_<drawer>.png`: the number after the
    last underscore (one person drew one image of every character of an alphabet)."""
    stem = member.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    number = stem.rsplit("_", 1)[-1]
    if "_" not in stem or not number.isdigit():
        raise DataError(
            f"in Omniglot archive {reader.path}: {reader.label(member)} is not named "
            "<id>_<drawer>.png as Omniglot's drawings are; delete the archive and download "
            "it again (data.download=true fetches it)"
        )
    return int(number)


def _group(members: list[str]) -> dict[str, list[str]]:
    """{"Alphabet/characterNN": sorted member paths}, in name order."""
    classes: dict[str, list[str]] = {}
    for member in members:
        parts = member.split("/")
        # hidden names are no data: macOS "._x.png" files, ".git" folders
        if len(parts) == 3 and not any(p.startswith(".") for p in parts):
            classes.setdefault(f"{parts[0]}/{parts[1]}", []).append(member)
    return {name: sorted(classes[name]) for name in sorted(classes)}


def _check_complete(path: Path, classes: dict[str, list[str]]) -> None:
    """Refuse an archive whose alphabets, characters or drawings differ from the official
    archive's: a run on part of it would be scored on other tasks than everyone else's."""
    name = _stem(path) + ".zip"
    lost, more = _differences(CONTENTS[name], classes)
    if lost or more:
        n_chars = sum(CONTENTS[name].values())
        raise DataError(
            f"Omniglot archive {path} "
            + ("is incomplete: " if lost else "holds more than the official archive: ")
            + "; ".join(lost + more)
            + f". The official {name} holds {len(CONTENTS[name])} alphabets, {n_chars} "
            f"characters of {DRAWINGS} drawings each. Delete it and download it again "
            f"(data.download=true fetches it from {_url(name)})."
        )


def _differences(expected: dict[str, int], classes: dict[str, list[str]]):
    """What is missing from `classes` and what they hold beyond `expected`, as phrases."""
    want = {f"{a}/character{i:02d}" for a, n in expected.items() for i in range(1, n + 1)}
    alphabets = {alphabet_of(c) for c in classes}
    gone = sorted(set(expected) - alphabets)
    chars = sorted(c for c in want - set(classes) if alphabet_of(c) not in gone)
    short = [f"{c} ({len(m)})" for c, m in classes.items() if c in want and len(m) != DRAWINGS]
    foreign = sorted(alphabets - set(expected))
    extra = sorted(c for c in set(classes) - want if alphabet_of(c) in expected)
    missing = [
        ("alphabets missing", gone),
        ("characters missing", chars),
        (f"characters without {DRAWINGS} drawings", short),
    ]
    beyond = [
        ("alphabets not in the official archive", foreign),
        ("characters not in the official archive", extra),
    ]
    return _phrases(missing), _phrases(beyond)


def _phrases(pairs) -> list[str]:
    return [f"{what}: {summarise(items)}" for what, items in pairs if items]


def _decode_member(reader, member: str, prep: Preprocess) -> torch.Tensor:
    try:
        return decode_image(reader.read(member), prep, name=reader.label(member))  # [1, S, S]
    except DataError as err:
        raise DataError(f"in Omniglot archive {reader.path}: {err}") from err


def _corrupt(path: Path, err: Exception) -> DataError:
    return DataError(
        f"Omniglot archive {path} is corrupt or truncated ({type(err).__name__}: {err}). "
        f"Delete it and download it again (data.download=true fetches it)."
    )


class _ZipReader:
    """Images of `<stem>/<Alphabet>/<character>/<file>.png` inside a zip, read without extracting."""

    def __init__(self, path: Path):
        self.path, self.prefix = path, _stem(path) + "/"
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise _corrupt(path, err) from err

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def members(self) -> list[str]:
        return [
            n[len(self.prefix) :]
            for n in self.zip.namelist()
            if n.startswith(self.prefix) and n.lower().endswith(".png")
        ]

    def label(self, member: str) -> str:
        return self.prefix + member

    def read(self, member: str) -> bytes:
        try:
            return self.zip.read(self.prefix + member)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # bad CRC, cut-off data
            raise _corrupt(self.path, err) from err


class _FolderReader:
    """The same layout, extracted: `<root>/<stem>/<Alphabet>/<character>/<file>.png`."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def members(self) -> list[str]:
        # listed level by level with stat alone: a FIFO named x.png is skipped, not opened
        return [
            f"{alphabet.name}/{char.name}/{p.name}"
            for alphabet in list_folders(self.path)
            for char in list_folders(alphabet)
            for p in list_images(char)
            if p.suffix.lower() == ".png"
        ]

    def label(self, member: str) -> str:
        return member

    def read(self, member: str) -> bytes:
        try:
            return (self.path / member).read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {self.path / member}: {err}") from err


# ---------------------------------------------------------------- files and download


def _ensure_archives(folder: Path, archives: Sequence[str], download: bool) -> list[Path]:
    """Path of each archive (zip preferred, else its extracted folder), downloading missing ones."""
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"the Omniglot root {folder} is a file, not a folder; set data.root= to a folder"
        )
    missing = [name for name in archives if _find(folder, name) is None]
    if missing and not download:
        raise DataError(
            _missing_message(folder, missing, "data.download=false, so nothing was fetched")
        )
    for name in missing:
        _download(folder, name, missing)
    return [_find(folder, name) for name in archives]


def _find(folder: Path, name: str) -> Path | None:
    # the zip is one stat to fingerprint and is what the md5 table describes, so it wins
    zipped, extracted = folder / name, folder / name[:-4]
    if zipped.is_file():
        return zipped
    return extracted if extracted.is_dir() else None


def _url(name: str) -> str:
    return f"{BASE_URL.rstrip('/')}/{name}"


def _missing_message(folder: Path, missing: Sequence[str], reason: str) -> str:
    where = f"{folder}" + ("" if folder.is_dir() else " (the folder does not exist)")
    urls = "\n".join(f"  {_url(name)}" for name in missing)
    return (
        f"Omniglot files missing: {', '.join(missing)} in {where}; {reason}.\n"
        f"Fetch them from:\n{urls}\n"
        f"and put them (zips or their extracted folders) in {folder}, or set data.root= to a "
        f"folder that holds them (data.download=true fetches them when the network is reachable)."
    )


def _download(folder: Path, name: str, missing: Sequence[str]) -> None:
    """Fetch one archive (md5-checked, moved into place only when complete)."""
    fetch(_url(name), folder / name, MD5.get(name), lambda r: _missing_message(folder, missing, r))
