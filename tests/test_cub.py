"""data=cub: Chen et al.'s 100/50/50 split from the tarball or the extracted folder."""

from __future__ import annotations

import tarfile

import pytest
import torch
from fakes import make_cub
from PIL import Image

import metarun.data.cub as cub_module
from metarun.data import ConfigError, DataError
from metarun.data.cub import cub, split_of
from metarun.data.images import Preprocess


@pytest.fixture(autouse=True)
def small_copy(monkeypatch):
    """The loader refuses copies with fewer than 11,788 images: describe make_cub's."""
    monkeypatch.setattr(cub_module, "IMAGES", 400)


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory):
    return make_cub(tmp_path_factory.mktemp("cub"))


def test_chen_split_rule():
    splits = [split_of(i) for i in range(200)]
    assert [splits.count(s) for s in ("train", "val", "test")] == [100, 50, 50]
    assert splits[:4] == ["train", "val", "train", "test"]


def test_splits_from_the_folder_and_the_tarball_agree(cub_root, tmp_path):
    stores = {
        s: cub(cub_root, s, images=Preprocess(6, channels=3)) for s in ("train", "val", "test")
    }
    assert [stores[s].num_classes for s in ("train", "val", "test")] == [100, 50, 50]
    assert stores["val"].names[0] == "002.Species_2" and stores["test"].names[0] == "004.Species_4"
    assert stores["train"].image_shape == (3, 6, 6) and stores["train"].counts.tolist() == [2] * 100
    tgz = tmp_path / "t"
    tgz.mkdir()
    with tarfile.open(tgz / "CUB_200_2011.tgz", "w:gz") as tar:
        tar.add(cub_root / "CUB_200_2011", arcname="CUB_200_2011")
    from_tar = cub(tgz, "test", images=Preprocess(6, channels=3))
    assert from_tar.names == stores["test"].names
    assert torch.equal(from_tar.images, stores["test"].images)


def test_errors(tmp_path, cub_root):
    with pytest.raises(ConfigError, match="data.root"):
        cub(None)
    with pytest.raises(DataError, match="CUB_200_2011.tgz"):
        cub(tmp_path, "train")
    partial = tmp_path / "partial" / "CUB_200_2011" / "images" / "001.A"
    partial.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(partial / "a.jpg")
    with pytest.raises(DataError, match="1 class folders"):
        cub(tmp_path / "partial", "train")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "CUB_200_2011.tgz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="corrupt or truncated"):
        cub(tmp_path / "trunc", "train")


def test_second_load_reads_the_cache(cub_root, monkeypatch):
    import metarun.data.cub as mod

    first = cub(cub_root, "val", images=Preprocess(5, channels=3))

    def refuse(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(mod, "decode_image", refuse)
    assert torch.equal(cub(cub_root, "val", images=Preprocess(5, channels=3)).images, first.images)
