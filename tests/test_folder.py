"""data=folder: any root/<class>/<images> tree, split by ratios or by class-list files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from fakes import make_tree
from PIL import Image

from metarun.data import ConfigError, DataError, EpisodeSampler
from metarun.data.folder import folder
from metarun.data.images import Preprocess


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "images")


def test_ratios_split_classes_disjointly_with_the_right_counts(tree):
    stores = {
        s: folder(tree, s, images=Preprocess(8, channels=3), ratios=(0.6, 0.2, 0.2))
        for s in ("train", "val", "test")
    }
    counts = {s: st.num_classes for s, st in stores.items()}
    assert counts == {"train": 6, "val": 2, "test": 2}
    names = [set(st.names) for st in stores.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set().union(*names) == {f"class_{c:02d}" for c in range(10)}
    st = stores["train"]
    assert st.images.dtype == torch.uint8 and st.image_shape == (3, 8, 8)
    assert st.counts.tolist() == [4] * 6 and len(st.images) == 24
    assert st.images.max() > 200 and st.images.min() < 50  # full 0-255 range kept


def test_the_split_is_seeded(tree):
    a = folder(tree, "test", images=Preprocess(8, channels=3), seed=0).names
    assert folder(tree, "test", images=Preprocess(8, channels=3), seed=0).names == a
    assert any(
        folder(tree, "test", images=Preprocess(8, channels=3), seed=s).names != a for s in (1, 2, 3)
    )


def test_grayscale_and_resizing(tmp_path):
    root = make_tree(tmp_path / "g", classes=3, mode="L")
    st = folder(root, "train", images=Preprocess(5, channels=1), ratios=(0.34, 0.33, 0.33))
    assert st.image_shape == (1, 5, 5)


def test_split_files(tree):
    (tree / "train.txt").write_text("class_00\nclass_01\nclass_02\n# a comment\n\n")
    (tree / "val.txt").write_text("class_03\n")
    (tree / "test.txt").write_text("class_04\nclass_05\n")
    files = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
    st = folder(tree, "test", images=Preprocess(8, channels=3), split_files=files)
    assert st.names == ["class_04", "class_05"]
    assert (
        folder(tree, "train", images=Preprocess(8, channels=3), split_files=files).num_classes == 3
    )


def test_second_load_comes_from_the_cache(tree, monkeypatch):
    first = folder(tree, "train", images=Preprocess(8, channels=3))
    import metarun.data.folder as mod

    def refuse(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(mod, "decode_image", refuse)
    again = folder(tree, "train", images=Preprocess(8, channels=3))
    assert torch.equal(first.images, again.images) and first.names == again.names
    with pytest.raises(AssertionError, match="decoded again"):  # another size: a new key
        folder(tree, "train", images=Preprocess(9, channels=3))


def test_errors_name_the_problem(tmp_path, tree):
    with pytest.raises(ConfigError, match="data.root"):
        folder(None, "train")
    with pytest.raises(DataError, match="not a folder"):
        folder(tmp_path / "nowhere", "train")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.png")
    with pytest.raises(DataError, match="one sub-folder per class"):
        folder(flat, "train")
    with pytest.raises(ConfigError, match="ratios"):
        folder(tree, "train", ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="leave no class for val"):
        folder(tree, "train", ratios=(0.95, 0.0, 0.05))
    (tree / "t.txt").write_text("class_00\nnot_a_class\n")
    (tree / "v.txt").write_text("class_00\n")
    files = {"train": "t.txt", "val": "v.txt", "test": "t.txt"}
    with pytest.raises(DataError, match="not_a_class"):
        folder(tree, "train", split_files=files)
    (tree / "t.txt").write_text("class_00\n")
    with pytest.raises(ConfigError, match="class_00.*both"):
        folder(tree, "train", split_files=files)
    with pytest.raises(ConfigError, match="missing test"):
        folder(tree, "train", split_files={"train": "t.txt", "val": "v.txt"})
    bad = tree / "class_03" / "img_9.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="img_9.png"):  # whichever split holds class_03
        for split in ("train", "val", "test"):
            folder(tree, split, images=Preprocess(7, channels=3))


def test_a_class_with_too_few_images_is_named(tmp_path):
    root = make_tree(tmp_path / "few", classes=6)
    for p in sorted((root / "class_02").iterdir())[1:]:
        p.unlink()
    st = folder(
        root, "train", images=Preprocess(8, channels=3), ratios=(1 / 3, 1 / 3, 1 / 3), seed=0
    )
    if "class_02" not in st.names:  # find the split that holds it
        st = next(
            s
            for s in (
                folder(root, x, images=Preprocess(8, channels=3), ratios=(1 / 3, 1 / 3, 1 / 3))
                for x in ("val", "test")
            )
            if "class_02" in s.names
        )
    with pytest.raises(ConfigError, match="class_02"):
        EpisodeSampler(st, 2, 1, 1)


def test_cli_trains_on_a_folder(tmp_path, tree):
    run = tmp_path / "run"
    run_cli(
        "data=folder",
        f"data.root={tree}",
        "data.images.size=16",
        "way=2",
        "shot=1",
        "query=2",
        "trainer.steps=4",
        "trainer.val_every=2",
        "trainer.val_episodes=4",
        "trainer.log_every=2",
        "eval.episodes=6",
        "logger=none",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    results = json.loads((run / "results.json").read_text())
    assert results["data"] == "folder" and results["episodes"] == 6
    assert 0 <= results["test_acc"] <= 1
