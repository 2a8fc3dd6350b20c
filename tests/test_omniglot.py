"""Omniglot loading: splits, rotations, caching, download and clear errors.

Most tests run on tiny fake archives with the real layout; one test reads the
real small archives when they are available (read-only, never written to).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch
from fakes import FULL, expect, make_root, write_zip

import metarun.data.omniglot as om
from metarun.data.images import Preprocess
from metarun.data.omniglot import DEFAULT_VAL_ALPHABETS, DataError, omniglot, omniglot_small

SMALL = {
    "images_background_small1.zip": ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"),
    "images_background_small2.zip": (
        "Greek",
        "Japanese_(katakana)",
        "Latin",
        "Sanskrit",
        "Tagalog",
    ),
}
OFFICIAL = om.CONTENTS  # before any test replaces it with the fakes' contents
REAL_DIR = Path(
    os.environ.get(
        "METARUN_OMNIGLOT_DIR",
        Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot",
    )
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METARUN_DATA", raising=False)
    expect(monkeypatch, {**SMALL, **FULL})
    om._load_archive.cache_clear()
    yield tmp_path / "cache"
    om._load_archive.cache_clear()


@pytest.fixture
def small_root(tmp_path) -> Path:
    return make_root(tmp_path / "root", SMALL)


@pytest.fixture
def full_root(tmp_path, monkeypatch) -> Path:
    expect(monkeypatch, FULL, images=3)
    return make_root(tmp_path / "full", FULL, images=3)


def same(a, b) -> bool:
    return (
        a.names == b.names and torch.equal(a.images, b.images) and torch.equal(a.counts, b.counts)
    )


def boom(*args, **kw):
    raise AssertionError("decoded again instead of reading the cache")


# ---------------------------------------------------------------- small set


def test_small_splits_counts_and_dedup(small_root):
    # 8 distinct alphabets x 2 characters; Greek and Latin are in both zips and count once
    counts = {}
    for split, alphabets in om.SMALL_SPLITS.items():
        plain = omniglot_small(small_root, split, rotations=1)
        rotated = omniglot_small(small_root, split)
        assert {n.split("/")[0] for n in plain.names} == set(alphabets)
        assert len(set(plain.names)) == plain.n_base == 2 * len(alphabets)
        assert rotated.num_classes == 4 * plain.n_base and rotated.rotations == 4
        assert plain.counts.tolist() == [20] * plain.n_base
        counts[split] = plain.n_base
    assert counts == {"train": 10, "val": 2, "test": 4}


def test_images_are_uint8_bright_strokes_on_black(small_root):
    store = omniglot_small(small_root, "val")
    assert store.images.dtype == torch.uint8
    assert store.images.shape == (2 * 20, 1, 28, 28)
    assert store.class_images(3).shape == (20, 1, 28, 28)  # a rotated class
    img = store.images[0, 0].float()
    assert img.mean() < 128 and img.max() > 200  # strokes 255 on background 0
    assert img[0, 0] == 0 and img[-1, -1] == 0
    assert omniglot_small(
        small_root, "val", images=Preprocess(14, channels=1, invert=True)
    ).image_shape == (1, 14, 14)


def test_order_is_deterministic(small_root, tmp_path, monkeypatch):
    a = omniglot_small(small_root, "train")
    assert a.names == sorted(a.names) and a.names[0] == "Balinese/character01"
    om._load_archive.cache_clear()
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "other_cache"))  # decode from scratch
    assert same(a, omniglot_small(small_root, "train"))


def test_cache_outside_root_and_reused(small_root, isolated_cache, monkeypatch):
    before = sorted(small_root.rglob("*"))
    first = omniglot_small(small_root, "train")
    assert sorted(small_root.rglob("*")) == before  # nothing written into the data root
    assert len(list(isolated_cache.glob("omniglot-*.pt"))) == 2  # one per archive
    om._load_archive.cache_clear()  # drop the in-process memo: only the disk cache is left
    monkeypatch.setattr(om, "_decode_archive", boom)
    assert same(first, omniglot_small(small_root, "train"))


def test_splits_share_one_decode_and_size_is_in_the_key(small_root, monkeypatch):
    calls = []
    real = om._decode_archive
    monkeypatch.setattr(om, "_decode_archive", lambda *a: calls.append(a) or real(*a))
    for split in ("train", "val", "test"):
        omniglot_small(small_root, split)
    assert len(calls) == 2  # each archive once, for all three splits
    omniglot_small(small_root, "train", images=Preprocess(14, channels=1, invert=True))
    assert len(calls) == 4


def test_extracted_folders_match_zips(small_root, tmp_path):
    extracted = tmp_path / "extracted"
    for name in SMALL:
        with zipfile.ZipFile(small_root / name) as zf:
            zf.extractall(extracted)
    for split in ("train", "val", "test"):
        assert same(
            omniglot_small(small_root, split), omniglot_small(extracted, split, download=False)
        )


def test_root_defaults_to_metarun_data(small_root, monkeypatch):
    monkeypatch.setenv("METARUN_DATA", str(small_root))
    assert omniglot_small(split="val", download=False).n_base == 2


# ---------------------------------------------------------------- full set


def test_full_alphabet_split(full_root):
    train = omniglot(full_root, "train", rotations=1)
    val = omniglot(full_root, "val", rotations=1)
    test = omniglot(full_root, "test")
    assert {n.split("/")[0] for n in train.names} == {"Greek", "Latin"}
    assert {n.split("/")[0] for n in val.names} == set(DEFAULT_VAL_ALPHABETS)
    assert (train.n_base, val.n_base, test.n_base, test.num_classes) == (4, 10, 4, 16)
    custom = omniglot(full_root, "val", rotations=1, val_alphabets=["Greek"])
    assert custom.names == ["Greek/character01", "Greek/character02"]


def test_unknown_val_alphabet(full_root):
    with pytest.raises(ValueError, match="Klingon") as err:
        omniglot(full_root, "train", val_alphabets=["Greek", "Klingon"])
    assert "Bengali" in str(err.value)  # lists the valid names


def test_character_split(full_root):
    def split(name, seed=0, sizes=(10, 4, 3)):
        return omniglot(
            full_root, name, rotations=1, split_by="character", character_split=sizes, seed=seed
        ).names

    parts = [split(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [10, 4, 3]
    assert len(set().union(*parts)) == 17  # disjoint; 1 of the 18 characters unused
    assert {n.split("/")[0] for n in set().union(*parts)} & {"Angelic", "Tengwar"}  # both archives
    assert split("train") == parts[0]  # same seed, same split
    assert split("train", seed=1) != parts[0]
    with pytest.raises(ValueError, match="19"):
        split("train", sizes=(10, 5, 4))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"split": "training"}, "split must be one of 'train', 'val', 'test'"),
        ({"rotations": 3}, "rotations"),
        ({"images": Preprocess(28, channels=3)}, "images.channels must be 1"),
        ({"split_by": "drawer"}, "split_by must be one of 'alphabet', 'character'"),
    ],
)
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        omniglot(tmp_path, **{"split": "train", **kw})


def test_missing_files_without_download(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(DataError) as err:
        omniglot_small(root, download=False)
    msg = str(err.value)
    for name in SMALL:
        assert name in msg and f"{om.BASE_URL}/{name}" in msg
    assert str(root) in msg and "data.root=" in msg and "data.download=" in msg
    assert not root.exists()


def serve(small_root: Path, monkeypatch, md5: dict | None = None) -> None:
    """Point BASE_URL at a local folder holding the fake zips (file:// URLs)."""
    monkeypatch.setattr(om, "BASE_URL", small_root.as_uri())
    real = {n: hashlib.md5((small_root / n).read_bytes()).hexdigest() for n in SMALL}
    monkeypatch.setattr(om, "MD5", md5 or real)


def test_download(small_root, tmp_path, monkeypatch):
    serve(small_root, monkeypatch)
    root = tmp_path / "new" / "data"
    assert omniglot_small(root, "test").n_base == 4
    assert sorted(p.name for p in root.iterdir()) == sorted(SMALL)  # no temp files left


def test_download_md5_mismatch(small_root, tmp_path, monkeypatch):
    serve(small_root, monkeypatch, md5=dict.fromkeys(SMALL, "0" * 32))
    root = tmp_path / "new"
    with pytest.raises(DataError, match="images_background_small1.zip") as err:
        omniglot_small(root)
    actual = hashlib.md5((small_root / "images_background_small1.zip").read_bytes()).hexdigest()
    assert "0" * 32 in str(err.value) and actual in str(err.value)
    assert list(root.iterdir()) == []  # the bad download was discarded


def test_download_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(om, "BASE_URL", (tmp_path / "nowhere").as_uri())
    with pytest.raises(DataError) as err:
        omniglot_small(tmp_path / "root")
    msg = str(err.value)
    assert "failed" in msg and "data.root=" in msg and "data.download=" in msg
    assert all(f"{om.BASE_URL}/{name}" in msg for name in SMALL)
    assert list((tmp_path / "root").iterdir()) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_zip(small_root, damage):
    path = small_root / "images_background_small1.zip"
    data = path.read_bytes()
    path.write_bytes(b"garbage" * 100 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt") as err:
        omniglot_small(small_root, download=False)
    assert str(path) in str(err.value) and "download it again" in str(err.value)


def test_corrupt_image(tmp_path):
    member = "images_background_small2/Tagalog/character02/0002_07.png"
    root = make_root(
        tmp_path / "root", {"images_background_small1.zip": SMALL["images_background_small1.zip"]}
    )
    write_zip(
        root / "images_background_small2.zip",
        SMALL["images_background_small2.zip"],
        bad_member=member,
    )
    with pytest.raises(DataError, match="character02/0002_07.png") as err:
        omniglot_small(root, "test", download=False)
    assert str(root / "images_background_small2.zip") in str(err.value)


# ---------------------------------------------------------------- real data


def test_real_small_archives(monkeypatch):
    if not all((REAL_DIR / name).is_file() for name in SMALL):
        pytest.skip(
            f"the real small Omniglot zips are not in {REAL_DIR} (set METARUN_OMNIGLOT_DIR)"
        )
    monkeypatch.setattr(om, "CONTENTS", OFFICIAL)  # the real archives pass the real check
    monkeypatch.setattr(om, "DRAWINGS", 20)
    plain = {s: omniglot_small(REAL_DIR, s, rotations=1, download=False) for s in om.SMALL_SPLITS}
    rotated = {s: omniglot_small(REAL_DIR, s, download=False) for s in om.SMALL_SPLITS}
    names = [n for store in plain.values() for n in store.names]
    assert len(names) == len(set(names)) == 242
    assert len({n.split("/")[0] for n in names}) == 8
    assert {s: st.n_base for s, st in plain.items()} == {"train": 179, "val": 24, "test": 39}
    assert {s: st.num_classes for s, st in rotated.items()} == {
        "train": 716,
        "val": 96,
        "test": 156,
    }
    assert all(st.counts.tolist() == [20] * st.n_base for st in plain.values())
    assert plain["val"].images.float().mean() < 128  # strokes bright on a black background
