"""data=cifarfs and data=fc100 from a tiny stand-in for the official CIFAR-100 archive."""

from __future__ import annotations

import hashlib
import tarfile

import pytest
import torch
from fakes import COARSE, FINE, fake_archive

import metarun.data.cifar as cifar
from metarun.data import DataError
from metarun.data.cifar import CIFAR_FS, FC100, cifar_fs, fc100
from metarun.data.images import Preprocess


@pytest.fixture(autouse=True)
def small_archive(monkeypatch):
    """The loader refuses archives smaller than CIFAR-100: describe fake_archive's default."""
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", {"train": 2, "test": 1})


@pytest.fixture
def root(tmp_path):
    fake_archive(tmp_path / "cifar-100-python.tar.gz")
    return tmp_path


def test_split_lists_are_64_16_20_disjoint_cifar100_classes():
    sets = [set(CIFAR_FS[s]) for s in ("train", "val", "test")]
    assert [len(x) for x in sets] == [64, 16, 20]
    assert sets[0] | sets[1] | sets[2] == set(FINE)
    fc = [set(FC100[s]) for s in ("train", "val", "test")]
    assert [len(x) for x in fc] == [12, 4, 4] and fc[0] | fc[1] | fc[2] == set(range(20))


def test_cifar_fs_splits(root):
    for split, n in (("train", 64), ("val", 16), ("test", 20)):
        store = cifar_fs(root, split, download=False)
        assert store.names == CIFAR_FS[split] and store.counts.tolist() == [3] * n
        assert store.image_shape == (3, 32, 32) and store.images.dtype == torch.uint8
        # every image of a class carries that class's label as its pixel value
        for i, name in enumerate(store.names):
            assert (store.class_images(i) == FINE.index(name)).all()


def test_fc100_splits_by_superclass(root):
    seen = set()
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        store = fc100(root, split, download=False)
        assert store.num_classes == n and not seen & set(store.names)
        seen |= set(store.names)
        assert {COARSE[FINE.index(c)] for c in store.names} == set(FC100[split])
    assert seen == set(FINE)


def test_resize_and_extracted_folder(tmp_path):
    archive = fake_archive(tmp_path / "a.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    store = cifar_fs(tmp_path / "x", "val", download=False, images=Preprocess(8, channels=3))
    assert store.image_shape == (3, 8, 8)


def test_download_with_md5_and_errors(tmp_path, monkeypatch):
    served = fake_archive(tmp_path / "served.tar.gz")
    monkeypatch.setattr(cifar, "URL", served.as_uri())
    with pytest.raises(DataError, match="md5"):  # the real checksum does not match the stand-in
        cifar_fs(tmp_path / "r1", "test")
    assert not any((tmp_path / "r1").iterdir())  # nothing half-written left
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(served.read_bytes()).hexdigest())
    assert cifar_fs(tmp_path / "r1", "test").num_classes == 20
    with pytest.raises(DataError, match="data.download=false"):
        fc100(tmp_path / "empty", "test", download=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cifar-100-python.tar.gz").write_bytes(served.read_bytes()[:500])
    with pytest.raises(DataError, match="corrupt or incomplete"):
        fc100(bad, "train", download=False)


def test_second_load_reads_the_cache(root, monkeypatch):
    first = fc100(root, "val", download=False)

    def refuse(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cifar, "_decode", refuse)
    again = fc100(root, "val", download=False)
    assert torch.equal(first.images, again.images) and first.names == again.names
