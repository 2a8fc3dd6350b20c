"""data=miniimagenet from tiny fixtures in both accepted on-disk forms."""

from __future__ import annotations

import pickle

import pytest
import torch
from fakes import SPLIT_CLASSES, csv_form, pickle_form

import metarun.data.miniimagenet as mini
from metarun.data import ConfigError, DataError
from metarun.data.images import Preprocess
from metarun.data.miniimagenet import miniimagenet


@pytest.fixture(autouse=True)
def small_splits(monkeypatch):
    """The loader refuses splits smaller than the published ones: describe the fixtures'."""
    monkeypatch.setattr(mini, "SPLIT_CLASSES", {s: len(c) for s, c in SPLIT_CLASSES.items()})
    monkeypatch.setattr(mini, "IMAGES_PER_CLASS", 3)


@pytest.mark.parametrize("form", ["csv", "pickle"])
def test_both_forms_give_disjoint_splits_with_the_right_counts(tmp_path, form):
    root = csv_form(tmp_path / "m") if form == "csv" else pickle_form(tmp_path / "m")[0]
    stores = {s: miniimagenet(root, s, images=Preprocess(12, channels=3)) for s in SPLIT_CLASSES}
    for split, store in stores.items():
        assert sorted(store.names) == SPLIT_CLASSES[split]
        assert store.counts.tolist() == [3] * len(SPLIT_CLASSES[split])
        assert store.image_shape == (3, 12, 12) and store.images.dtype == torch.uint8
        assert store.images.float().std() > 5  # pixel values, not normalised or blank
    names = [set(s.names) for s in stores.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


def test_pickle_rows_keep_their_class_and_pixels_at_84(tmp_path):
    root, test_data = pickle_form(tmp_path / "p")
    store = miniimagenet(root, "test")
    first = torch.from_numpy(test_data["image_data"][0]).permute(2, 0, 1)
    assert store.names[0] == "n06" and torch.equal(store.images[0], first)


def test_cache_is_reused(tmp_path, monkeypatch):
    root = csv_form(tmp_path / "c")
    first = miniimagenet(root, "val", images=Preprocess(10, channels=3))
    import metarun.data.miniimagenet as mod

    monkeypatch.setattr(
        mod, "decode_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again"))
    )
    assert torch.equal(
        miniimagenet(root, "val", images=Preprocess(10, channels=3)).images, first.images
    )


def test_errors_name_the_files_and_the_accepted_forms(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        miniimagenet(None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="images/ with train.csv.*pickle"):
        miniimagenet(empty, "train")
    root = csv_form(tmp_path / "bad")
    (root / "images" / "n040001.jpg").unlink()
    with pytest.raises(DataError, match="n040001.jpg"):
        miniimagenet(root, "val")
    (root / "images" / "n060002.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="n060002.jpg"):
        miniimagenet(root, "test")
    (root / "train.csv").write_text("name,class\nx.jpg,n01\n")
    with pytest.raises(DataError, match="filename,label"):
        miniimagenet(root, "train")
    p = tmp_path / "trunc"
    p.mkdir()
    (p / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"image_data": 1})[:-3])
    with pytest.raises(DataError, match="truncated"):
        miniimagenet(p, "train")
