"""data=tieredimagenet: the three accepted forms, the memory-mapped cache, the errors."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from fakes import NAMES, PER_CLASS, arrays, write_labels
from PIL import Image

import metarun.data.tiered as tiered
from metarun.data import ConfigError, DataError
from metarun.data.images import Preprocess
from metarun.data.store import cache_dir
from metarun.data.tiered import tiered_imagenet


@pytest.fixture(autouse=True)
def small_splits(monkeypatch):
    """The loader refuses splits smaller than the published ones: describe the fixtures'."""
    monkeypatch.setattr(tiered, "SPLIT_CLASSES", dict.fromkeys(("train", "val", "test"), 3))


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)  # as Ren et al. stored them


@pytest.mark.parametrize("form", ["png", "npz", "folder"])
def test_each_form_gives_the_classes_and_pixels(tmp_path, form):
    images, labels = arrays()
    root = tmp_path / form
    root.mkdir()
    if form == "png":
        with open(root / "val_images_png.pkl", "wb") as f:
            pickle.dump([png(a) for a in images], f)
        write_labels(root / "val_labels.pkl", labels)
    elif form == "npz":
        np.savez(root / "val_images.npz", images=images)
        write_labels(root / "val_labels.pkl", labels)
    else:
        for i, (a, c) in enumerate(zip(images, labels)):
            d = root / "val" / NAMES[c]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(d / f"{i:03d}.png")
    store = tiered_imagenet(root, "val", images=Preprocess(20, channels=3))
    assert store.names == NAMES and store.counts.tolist() == [PER_CLASS] * 3
    assert store.image_shape == (3, 20, 20) and store.images.dtype == torch.uint8
    # class 0's images, in their order on disk, are the first rows
    first = torch.from_numpy(images[labels == 0][0]).permute(2, 0, 1)
    assert torch.equal(store.class_images(0)[0], first)


def test_cache_is_a_memory_map_reused_without_decoding(tmp_path, monkeypatch):
    images, labels = arrays()
    np.savez(tmp_path / "test_images.npz", images=images)
    write_labels(tmp_path / "test_labels.pkl", labels)
    store = tiered_imagenet(tmp_path, "test", images=Preprocess(12, channels=3))
    (mapped,) = [  # this split's file (the cache folder is shared by the test session)
        m
        for p in cache_dir().glob("tiered-*.u8")
        if (m := np.load(p, mmap_mode="r")).shape[-1] == 12
    ]
    assert isinstance(mapped, np.memmap) and mapped.shape == (12, 3, 12, 12)
    assert torch.equal(torch.from_numpy(np.array(mapped)), store.images)

    def refuse(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(tiered, "_write_cache", refuse)
    assert torch.equal(
        tiered_imagenet(tmp_path, "test", images=Preprocess(12, channels=3)).images, store.images
    )


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        tiered_imagenet(None)
    with pytest.raises(DataError, match="images_png.pkl.*npz.*folder"):
        tiered_imagenet(tmp_path, "train")
    images, labels = arrays()
    np.savez(tmp_path / "train_images.npz", images=images)
    with pytest.raises(DataError, match="train_labels.pkl"):
        tiered_imagenet(tmp_path, "train")
    write_labels(tmp_path / "train_labels.pkl", labels[:-1])
    with pytest.raises(DataError, match="12 images but"):
        tiered_imagenet(tmp_path, "train")
    (tmp_path / "train_labels.pkl").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataError, match="truncated"):
        tiered_imagenet(tmp_path, "train")
    assert not list(cache_dir().glob("tiered-*.tmp*"))  # no half-written cache left
