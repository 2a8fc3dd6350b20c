"""Nothing lost, nothing mixed, nothing executed: what the data loaders guarantee.

- A decode cache notices edited files (same name, new contents) and never fails a run
  when it cannot be written.
- An incomplete copy of a canonical data set is refused, naming what is missing.
- Folder entries that are not regular image files (hidden names, FIFOs, sockets, broken
  links, folders without images) never become classes, never block, and are named.
- Pickled data files cannot run code.

The stand-ins come from the data sets' own test modules; the real small Omniglot archives
are used when they are there (read-only: damaged copies are built in tmp_path).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import os
import pickle
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HAVE_OMNIGLOT, OMNIGLOT_DIR
from fakes import (
    NAMES,
    arrays,
    csv_form,
    fake_archive,
    make_cub,
    make_tree,
    pickle_form,
    write_labels,
    write_zip,
)
from PIL import Image

import metarun.data.cifar as cifar
import metarun.data.cub as cub_module
import metarun.data.miniimagenet as mini
import metarun.data.omniglot as om
import metarun.data.store as store_module
import metarun.data.tiered as tiered
from metarun.data import DataError, safe_pickle
from metarun.data.folder import class_folders, folder
from metarun.data.images import Preprocess, list_images

SMALL1 = "images_background_small1.zip"
THIRDS = (1 / 3, 1 / 3, 1 / 3)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A decode cache per test, so every test decodes (and checks) from scratch."""
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "cache"))
    om._load_archive.cache_clear()
    yield tmp_path / "cache"
    om._load_archive.cache_clear()


def finishes(load, fifos=(), timeout: float = 30.0):
    """load() run in a thread: a regression that opens a FIFO fails here instead of hanging."""
    result = {}

    def run():
        try:
            result["value"] = load()
        except BaseException as err:  # handed to the test below
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:  # give the blocked reader its end of file, so the process can exit
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"loading blocked for {timeout} s: it opened a FIFO")
    if "error" in result:
        raise result["error"]
    return result["value"]


def edit_image(path: Path) -> None:
    """Other pixels under the same name, with a later modification time."""
    with Image.open(path) as img:
        size, mode = img.size, img.mode
    Image.new(mode, size, 255 if mode in ("1", "L") else (255, 255, 255)).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def omniglot_archive(root: Path, monkeypatch, alphabets=("Greek", "Latin"), **kw) -> Path:
    """A stand-in for images_background_small1.zip (2 characters of 3 drawings per alphabet),
    with the table of official contents describing it."""
    monkeypatch.setitem(om.CONTENTS, SMALL1, dict.fromkeys(("Greek", "Latin"), 2))
    monkeypatch.setattr(om, "DRAWINGS", 3)
    root.mkdir(parents=True, exist_ok=True)
    write_zip(root / SMALL1, alphabets, chars=2, images=3, **kw)
    return root


def rewrite_zip(src: Path, dst: Path, drop) -> Path:
    """A copy of the zip `src` without the members for which drop(name) is true."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if not drop(info.filename):
                zout.writestr(info, zin.read(info))
    return dst


def extract(zip_path: Path, root: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(root)
    return root


def load_small1(root: Path):
    return om._load(root, (SMALL1,), download=False, image_size=28)[0]


# ---------------------------------------------------------------- caches: edits are seen
# each returns (load, edit): a loader of a small stand-in, and an edit of one of its files
# that keeps the file's name


def edited_folder(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "f", classes=3, per_class=2)

    def load():
        return folder(root, "train", images=Preprocess(8, channels=3), ratios=THIRDS)

    return load, lambda: edit_image(sorted((root / load().names[0]).iterdir())[0])


def edited_omniglot_folder(tmp_path, monkeypatch):
    zipped = omniglot_archive(tmp_path / "z", monkeypatch) / SMALL1
    root = extract(zipped, tmp_path / "x")
    return lambda: load_small1(root), lambda: edit_image(
        root / "images_background_small1" / "Greek" / "character01" / "0001_01.png"
    )


def edited_miniimagenet(tmp_path, monkeypatch):
    monkeypatch.setattr(mini, "SPLIT_CLASSES", {"train": 3, "val": 2, "test": 2})
    monkeypatch.setattr(mini, "IMAGES_PER_CLASS", 3)
    root = csv_form(tmp_path / "m")
    return lambda: mini.miniimagenet(
        root, "val", images=Preprocess(12, channels=3)
    ), lambda: edit_image(root / "images" / "n040000.jpg")


def edited_tiered_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(tiered.SPLIT_CLASSES, "val", 3)
    images, labels = arrays()
    for i, (a, c) in enumerate(zip(images, labels)):
        (tmp_path / "t" / "val" / NAMES[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(tmp_path / "t" / "val" / NAMES[c] / f"{i:03d}.png")
    return lambda: tiered.tiered_imagenet(
        tmp_path / "t", "val", images=Preprocess(20, channels=3)
    ), lambda: edit_image(sorted((tmp_path / "t" / "val" / NAMES[0]).iterdir())[0])


def edited_cifar_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", {"train": 2, "test": 1})
    with tarfile.open(fake_archive(tmp_path / "a.tar.gz")) as tar:
        tar.extractall(tmp_path / "c", filter="data")
    test_part = tmp_path / "c" / "cifar-100-python" / "test"

    def edit():
        data = pickle.loads(test_part.read_bytes())
        data["data"] = 255 - data["data"]  # same size: only the modification time tells
        test_part.write_bytes(pickle.dumps(data))
        st = test_part.stat()
        os.utime(test_part, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    return lambda: cifar.cifar_fs(tmp_path / "c", "val", download=False), edit


def edited_cub_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cub_module, "IMAGES", 200)
    root = make_cub(tmp_path / "cub", per_class=1)
    image = root / "CUB_200_2011" / "images" / "002.Species_2" / "bird_2_0.jpg"  # val's first
    return lambda: cub_module.cub(
        root, "val", images=Preprocess(6, channels=3)
    ), lambda: edit_image(image)


@pytest.mark.parametrize(
    "make",
    [
        edited_folder,
        edited_omniglot_folder,
        edited_miniimagenet,
        edited_tiered_folder,
        edited_cifar_folder,
        edited_cub_folder,
    ],
)
def test_an_edited_file_with_the_same_name_is_decoded_again(tmp_path, monkeypatch, make):
    load, edit = make(tmp_path, monkeypatch)
    before = load().images.clone()
    edit()
    om._load_archive.cache_clear()  # only the disk cache may remember
    assert not torch.equal(load().images, before), "served the decode of the old file"


# ---------------------------------------------------------------- caches: never fatal


def test_a_cache_path_that_is_a_file_costs_a_decode_not_the_run(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "cache_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("METARUN_CACHE", str(blocker))
    root = make_tree(tmp_path / "images", classes=3, per_class=2)
    for _ in range(2):  # the second run decodes again, and works again
        store = folder(root, "test", images=Preprocess(8, channels=3), ratios=THIRDS)
        assert store.n_base == 1 and store.counts.tolist() == [2]
    assert "could not write the decode cache" in caplog.text and str(blocker) in caplog.text
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    ],
    ids=["full-disk", "read-only", "torch-writer"],
)
def test_a_failed_cache_write_leaves_no_file_and_returns_the_store(
    tmp_path, monkeypatch, caplog, own_cache, error
):
    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")  # what a full disk leaves behind
        raise error

    monkeypatch.setattr(store_module.torch, "save", failing_save)
    root = make_tree(tmp_path / "images", classes=3, per_class=2)
    store = folder(root, "val", images=Preprocess(8, channels=3), ratios=THIRDS)
    assert store.n_base == 1 and store.images.shape == (2, 3, 8, 8)
    assert str(error) in caplog.text and str(own_cache) in caplog.text
    assert list(own_cache.iterdir()) == []  # no temporary file left


def test_a_read_only_cache_folder_is_not_fatal(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        if os.access(cache, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop this process writing")
        monkeypatch.setenv("METARUN_CACHE", str(cache))
        root = make_tree(tmp_path / "images", classes=3, per_class=2)
        assert folder(root, "val", images=Preprocess(8, channels=3), ratios=THIRDS).n_base == 1
        assert "could not write the decode cache" in caplog.text and list(cache.iterdir()) == []
    finally:
        cache.chmod(0o755)


def tiered_npz(root: Path, monkeypatch) -> Path:
    monkeypatch.setitem(tiered.SPLIT_CLASSES, "test", 3)
    images, labels = arrays()
    root.mkdir(parents=True)
    np.savez(root / "test_images.npz", images=images)
    write_labels(root / "test_labels.pkl", labels)
    return root


def test_tiered_decodes_into_memory_when_its_cache_cannot_be_written(
    tmp_path, monkeypatch, caplog, own_cache
):
    root = tiered_npz(tmp_path / "t", monkeypatch)
    expected = tiered.tiered_imagenet(
        root, "test", images=Preprocess(20, channels=3)
    ).images.clone()
    for name in os.listdir(own_cache):
        os.remove(own_cache / name)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiered.os, "posix_fallocate", no_space, raising=False)
    store = tiered.tiered_imagenet(root, "test", images=Preprocess(20, channels=3))
    assert torch.equal(store.images, expected) and store.names == NAMES
    assert "No space left on device" in caplog.text and "into memory" in caplog.text
    assert list(own_cache.iterdir()) == []  # neither the data file nor its index left behind
    monkeypatch.setenv("METARUN_CACHE", str(root / "test_images.npz"))  # a file, not a folder
    assert torch.equal(
        tiered.tiered_imagenet(root, "test", images=Preprocess(20, channels=3)).images, expected
    )


# ---------------------------------------------------------------- Omniglot: complete or refused


@pytest.mark.parametrize("form", ["zip", "folder"])
@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda m: "/Latin/" in m, "alphabets missing: Latin"),
        (lambda m: "/Greek/character02/" in m, "characters missing: Greek/character02"),
        (lambda m: m.endswith("Greek/character01/0001_03.png"), "Greek/character01 (2)"),
    ],
    ids=["alphabet", "character", "drawing"],
)
def test_an_incomplete_omniglot_archive_is_refused(tmp_path, monkeypatch, form, damage, named):
    whole = omniglot_archive(tmp_path / "whole", monkeypatch) / SMALL1
    damaged = rewrite_zip(whole, tmp_path / "root" / SMALL1, damage)
    root = damaged.parent if form == "zip" else extract(damaged, tmp_path / "extracted")
    with pytest.raises(DataError) as err:
        load_small1(root)
    message = str(err.value)
    assert named in message and "is incomplete" in message
    assert str(root / (SMALL1 if form == "zip" else SMALL1[:-4])) in message
    assert "download it again" in message and f"{om.BASE_URL}/{SMALL1}" in message


def test_an_alphabet_that_is_not_in_the_archive_is_refused(tmp_path, monkeypatch):
    root = omniglot_archive(tmp_path, monkeypatch, alphabets=("Greek", "Klingon", "Latin"))
    with pytest.raises(DataError, match="alphabets not in the official archive: Klingon"):
        load_small1(root)


def test_a_store_decoded_before_the_check_is_not_served(tmp_path, monkeypatch):
    whole = omniglot_archive(tmp_path / "whole", monkeypatch) / SMALL1
    root = rewrite_zip(whole, tmp_path / "root" / SMALL1, lambda m: "/Latin/" in m).parent
    with monkeypatch.context() as old:  # the loader before the check: no check, format 1
        old.setattr(om, "CACHE_FORMAT", 1)
        old.setattr(om, "_check_complete", lambda *args: None)
        assert load_small1(root).n_base == 2  # Greek only: decoded and cached
    om._load_archive.cache_clear()
    with pytest.raises(DataError, match="alphabets missing: Latin"):
        load_small1(root)


needs_real_omniglot = pytest.mark.skipif(
    not HAVE_OMNIGLOT, reason=f"the real small Omniglot archives are not in {OMNIGLOT_DIR}"
)


@needs_real_omniglot
@pytest.mark.parametrize("name", list(om.SMALL_ARCHIVES))
def test_the_real_small_archives_pass_the_check(name):
    path = OMNIGLOT_DIR / name
    with om._ZipReader(path) as reader:
        om._check_complete(path, om._group(reader.members()))  # raises if anything is off


@needs_real_omniglot
def test_a_real_archive_without_an_alphabet_is_refused(tmp_path, own_cache):
    path = rewrite_zip(OMNIGLOT_DIR / SMALL1, tmp_path / SMALL1, lambda m: "/Korean/" in m)
    with pytest.raises(DataError, match=r"alphabets missing: Korean\. The official") as err:
        load_small1(tmp_path)
    assert str(path) in str(err.value) and "data.download=true" in str(err.value)
    assert not list(own_cache.glob("omniglot-*.pt"))  # nothing decoded, nothing cached


@needs_real_omniglot
def test_a_real_archive_with_a_character_short_of_drawings_is_refused(tmp_path):
    with zipfile.ZipFile(OMNIGLOT_DIR / SMALL1) as zf:  # three drawings of one character
        gone = {n for n in zf.namelist() if "/Latin/character05/" in n and n.endswith(".png")}
    drop = set(sorted(gone)[:3])
    rewrite_zip(OMNIGLOT_DIR / SMALL1, tmp_path / SMALL1, lambda m: m in drop)
    with pytest.raises(DataError, match=r"without 20 drawings: Latin/character05 \(17\)"):
        load_small1(tmp_path)


# ---------------------------------------------------------------- the other data sets


def test_miniimagenet_refuses_a_split_short_of_the_published_one(tmp_path, monkeypatch):
    root = csv_form(tmp_path / "m")  # 3 / 2 / 2 classes of 3 images: far from 64 / 16 / 20
    with pytest.raises(DataError) as err:
        mini.miniimagenet(root, "train")
    assert "3 classes instead of 64" in str(err.value)
    assert "3 class(es) without 600 images: n01 (3), n02 (3), n03 (3)" in str(err.value)
    monkeypatch.setattr(mini, "SPLIT_CLASSES", {"train": 3, "val": 2, "test": 2})
    monkeypatch.setattr(mini, "IMAGES_PER_CLASS", 3)
    lines = (root / "val.csv").read_text().splitlines()
    (root / "val.csv").write_text("\n".join(lines[:-1]) + "\n")  # n05 loses a row
    with pytest.raises(DataError, match=r"val split .* 1 class\(es\) without 3 images: n05 \(2\)"):
        mini.miniimagenet(root, "val")


def test_miniimagenet_names_listed_files_that_are_absent_or_not_regular(tmp_path, monkeypatch):
    root = csv_form(tmp_path / "m")
    images = root / "images"
    (images / "n060000.jpg").unlink()
    (images / "n060001.jpg").unlink()
    os.mkfifo(images / "n060001.jpg")
    (images / "n070002.jpg").unlink()
    (images / "n070002.jpg").symlink_to(images / "nowhere.jpg")
    with pytest.raises(DataError) as err:
        finishes(lambda: mini.miniimagenet(root, "test"), [images / "n060001.jpg"])
    message = str(err.value)
    assert "3 of the 6 images listed in" in message
    assert "n060000.jpg (missing)" in message and "n070002.jpg (broken link)" in message
    assert "n060001.jpg (not a regular file: a FIFO)" in message


def test_miniimagenet_pickle_with_a_short_class_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(mini, "SPLIT_CLASSES", {"train": 3, "val": 2, "test": 2})
    monkeypatch.setattr(mini, "IMAGES_PER_CLASS", 3)
    root, data = pickle_form(tmp_path / "p")
    data["class_dict"]["n07"] = data["class_dict"]["n07"][:1]
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(DataError, match=r"without 3 images: n07 \(1\)"):
        mini.miniimagenet(root, "test")


def test_tiered_refuses_missing_classes(tmp_path, monkeypatch):
    root = tiered_npz(tmp_path / "t", monkeypatch)
    monkeypatch.setitem(tiered.SPLIT_CLASSES, "test", 160)
    with pytest.raises(DataError, match="3 classes instead of 160"):
        tiered.tiered_imagenet(root, "test")
    images, labels = arrays()
    with open(root / "test_labels.pkl", "wb") as f:  # the index names a fourth class
        pickle.dump({"label_specific": labels, "label_specific_str": [*NAMES, "n004"]}, f)
    with pytest.raises(DataError, match="classes without images: n004"):
        tiered.tiered_imagenet(root, "test")


def test_cifar_refuses_an_archive_short_of_images(tmp_path, monkeypatch):
    archive = fake_archive(tmp_path / "cifar-100-python.tar.gz")
    with pytest.raises(DataError, match="100 class\\(es\\) without 500 images") as err:
        cifar.fc100(tmp_path, "train", download=False)  # the stand-in is not CIFAR-100
    assert str(archive) in str(err.value) and cifar.URL in str(err.value)
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", {"train": 2, "test": 1})
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    train = tmp_path / "x" / "cifar-100-python" / "train"
    data = pickle.loads(train.read_bytes())
    keep = np.asarray(data["fine_labels"]) != 0  # every "apple" image gone
    data = {k: np.asarray(v)[keep] for k, v in data.items()}
    train.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match=r"train part\) is incomplete.*apple \(0\)"):
        cifar.cifar_fs(tmp_path / "x", "train", download=False)


def test_cub_refuses_a_copy_that_does_not_match_its_index_or_the_count(tmp_path):
    root = make_cub(tmp_path / "cub", per_class=1)
    with pytest.raises(DataError, match="holds 200 images, not CUB-200-2011's 11788"):
        cub_module.cub(root, "train")
    images = root / "CUB_200_2011" / "images"
    listed = [f"{d.name}/{f.name}" for d in sorted(images.iterdir()) for f in d.iterdir()]
    index = "".join(f"{i} {name}\n" for i, name in enumerate(listed, start=1))
    (root / "CUB_200_2011" / "images.txt").write_text(index)
    (images / "003.Species_3" / "bird_3_0.jpg").unlink()
    with pytest.raises(DataError, match="1 listed image\\(s\\) missing: 003.Species_3/bird_3_0"):
        cub_module.cub(root, "train")


# ---------------------------------------------------------------- folder entries


def special_entries(folder_path: Path, monkeypatch) -> list[Path]:
    """A hidden file, a FIFO, a broken link and (where it can be made) a socket, all with
    image names; returns the FIFOs."""
    Image.new("RGB", (5, 5)).save(folder_path / ".hidden.png")
    os.mkfifo(folder_path / "pipe.png")
    (folder_path / "dead.png").symlink_to(folder_path / "no_such_file.png")
    monkeypatch.chdir(folder_path)  # a relative name keeps the socket path short
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.png")
    return [folder_path / "pipe.png"]


def test_a_class_folder_with_special_entries_loads_and_names_them(tmp_path, monkeypatch, caplog):
    root = make_tree(tmp_path / "images", classes=3, per_class=2)
    fifos = special_entries(root / "class_01", monkeypatch)
    (root / ".thumbnails").mkdir()  # a hidden folder of images is no class
    Image.new("RGB", (5, 5)).save(root / ".thumbnails" / "a.png")
    (root / "empty").mkdir()
    os.mkfifo(root / "fifo_class")
    fifos.append(root / "fifo_class")
    (root / "gone").symlink_to(tmp_path / "no_such_folder")
    classes = finishes(lambda: class_folders(root), fifos)
    assert sorted(classes) == ["class_00", "class_01", "class_02"]
    assert [p.name for p in classes["class_01"]] == ["img_0.jpg", "img_1.png"]
    inside, top = str(root / "class_01"), str(root)
    for entry in (".hidden.png (hidden)", "pipe.png (not a regular file: a FIFO)"):
        assert entry in caplog.text
    assert "dead.png (broken link)" in caplog.text and inside in caplog.text
    for entry in (".thumbnails (hidden)", "empty (no images)", "gone (broken link)"):
        assert entry in caplog.text
    assert "fifo_class (not a regular file: a FIFO)" in caplog.text and top in caplog.text
    stores = [
        finishes(
            lambda s=s: folder(root, s, images=Preprocess(8, channels=3), ratios=THIRDS), fifos
        )
        for s in ("train", "val", "test")
    ]
    assert sorted(n for s in stores for n in s.names) == ["class_00", "class_01", "class_02"]


def test_a_predict_folder_lists_only_its_images(tmp_path, monkeypatch, caplog):
    query = tmp_path / "query"
    query.mkdir()
    Image.new("L", (6, 6)).save(query / "a.png")
    (query / "notes.txt").write_text("not an image")
    fifos = special_entries(query, monkeypatch)
    assert [p.name for p in finishes(lambda: list_images(query), fifos)] == ["a.png"]
    assert "notes.txt (not an image)" in caplog.text and "pipe.png" in caplog.text


def test_an_extracted_omniglot_folder_skips_special_entries(tmp_path, monkeypatch, caplog):
    zipped = omniglot_archive(tmp_path / "z", monkeypatch) / SMALL1
    root = extract(zipped, tmp_path / "x")
    archive = root / "images_background_small1"
    fifos = special_entries(archive / "Greek" / "character01", monkeypatch)
    (archive / ".git" / "character01").mkdir(parents=True)  # hidden: no alphabet
    (archive / ".git" / "character01" / "x.png").write_bytes(b"")
    store = finishes(lambda: load_small1(root), fifos)
    assert store.n_base == 4 and store.counts.tolist() == [3] * 4
    assert "pipe.png (not a regular file: a FIFO)" in caplog.text and ".git (hidden)" in caplog.text


def test_cub_and_tiered_folders_skip_special_entries(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cub_module, "IMAGES", 200)
    root = make_cub(tmp_path / "cub", per_class=1)
    fifos = special_entries(root / "CUB_200_2011" / "images" / "002.Species_2", monkeypatch)
    assert (
        finishes(
            lambda: cub_module.cub(root, "val", images=Preprocess(6, channels=3)), fifos
        ).num_classes
        == 50
    )
    assert "pipe.png (not a regular file: a FIFO)" in caplog.text
    monkeypatch.setitem(tiered.SPLIT_CLASSES, "train", 2)
    for c in ("a", "b"):
        (tmp_path / "t" / "train" / c).mkdir(parents=True)
        Image.new("RGB", (5, 5)).save(tmp_path / "t" / "train" / c / "0.png")
    fifos = special_entries(tmp_path / "t" / "train", monkeypatch)
    store = finishes(
        lambda: tiered.tiered_imagenet(tmp_path / "t", "train", images=Preprocess(5, channels=3)),
        fifos,
    )
    assert store.names == ["a", "b"]


# ---------------------------------------------------------------- pickles run no code


class Payload:
    """Unpickled by plain pickle, this runs a shell command that creates `target`."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


# each returns (load, the file's name in errors) for a data set whose pickle carries `payload`


def evil_miniimagenet(root: Path, payload):
    root.mkdir()
    with open(root / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": payload, "class_dict": {}}, f)
    return lambda: mini.miniimagenet(root, "train"), root / "mini-imagenet-cache-train.pkl"


def evil_tiered(root: Path, payload):
    root.mkdir()
    images, labels = arrays()
    np.savez(root / "val_images.npz", images=images)
    with open(root / "val_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": labels, "label_specific_str": payload}, f)
    return lambda: tiered.tiered_imagenet(root, "val"), root / "val_labels.pkl"


def evil_cifar(root: Path, payload):
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        blob = pickle.dumps({"fine_label_names": payload})
        info = tarfile.TarInfo("cifar-100-python/meta")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    return (
        lambda: cifar.cifar_fs(root, "train", download=False),
        f"{root / 'cifar-100-python.tar.gz'}:cifar-100-python/meta",
    )


@pytest.mark.parametrize("make", [evil_miniimagenet, evil_tiered, evil_cifar])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, make):
    live = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(live)))  # the payload is real: plain pickle runs it
    assert live.exists()
    target = tmp_path / "created"
    load, label = make(tmp_path / "data", Payload(target))
    with pytest.raises(DataError) as err:
        load()
    message = str(err.value)
    assert str(label) in message and "not a plain data file" in message
    assert f"{os.system.__module__}.system" in message  # posix.system: os.system's home
    assert not target.exists()


def test_plain_data_pickles_load_in_every_protocol():
    data = {
        "images": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        "labels": np.array([3, 1], dtype=np.int64),
        "png": [np.frombuffer(b"\x89PNG\r\n", dtype=np.uint8)],  # Ren et al.'s entries
        "names": ["n01", "n02"],
        "class_dict": {"n01": [0], "n02": [1]},
        "raw": b"\x00\xff",
        "scalar": np.float32(0.5),
        "set": {1, 2},
        "objects": np.array([b"a", None], dtype=object),
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # 2: Python 2's names (__builtin__)
        loaded = safe_pickle.load(io.BytesIO(pickle.dumps(data, protocol=protocol)), "x")
        assert loaded.keys() == data.keys() and loaded["raw"] == data["raw"]
        assert np.array_equal(loaded["images"], data["images"])
        assert loaded["images"].dtype == np.uint8 and loaded["scalar"] == np.float32(0.5)
        assert loaded["set"] == {1, 2} and loaded["objects"][0] == b"a"


def test_only_text_codecs_may_make_bytes():
    class Rot13:
        def __reduce__(self):
            return (codecs.encode, ("text", "rot13"))

    blob = pickle.dumps(Rot13(), protocol=2)
    with pytest.raises(DataError, match="'rot13' codec"):
        safe_pickle.load(io.BytesIO(blob), "file.pkl")
