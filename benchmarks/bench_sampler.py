"""Episodes per second: metarun's EpisodeSampler against a per-image PIL pipeline.

Both are measured in the same run on the same classes, so their ratio is
meaningful on any machine; the absolute numbers are not.

metarun:  `EpisodeSampler(store, way, shot=1, query=5).sample(32)`, tensor indexing
          on a store decoded once (the decode happens before timing).
baseline: the shape of learn2learn 0.2.0's TaskDataset pipeline, written here from
          its description: Python `random.sample` picks the classes and the images,
          then every image is decoded from its PNG bytes with PIL, resized to 28
          (LANCZOS), made a tensor and turned by its class's random multiple of
          90 degrees; the task is stacked, labelled and split into support/query.
          The PNG bytes are read from the archives once, before timing.

Run: python -m benchmarks.bench_sampler [--device cpu] [--quick] [--omniglot-root DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.timing import interleaved
from metarun.data import ClassStore, DataError, Episodes, EpisodeSampler
from metarun.data.omniglot import SMALL_ARCHIVES, omniglot_small
from metarun.data.synthetic import synthetic

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ((5, 1, 5), (20, 1, 5))  # (way, shot, query)
META_BATCH = 32
IMAGE_SIZE = 28
# learn2learn 0.2.0 on these same images, 2-core machine: an outside figure, not measured here
L2L_REFERENCE = {5: 52.0, 20: 15.0}  # way -> episodes/s
TARGET_X = 100  # the project's target: at least 100x the learn2learn reference
REPEATS = 5  # timed blocks per side; the medians over these are reported
BLOCK_S = 0.6  # seconds per block (at least one meta-batch), so each side gets about 3 s


# ---------------------------------------------------------------- data


def omniglot_root(arg: str | None) -> Path:
    """--omniglot-root, else $METARUN_OMNIGLOT_DIR, else the shared folder next to the repo."""
    return Path(
        arg or os.environ.get("METARUN_OMNIGLOT_DIR") or REPO.parent / "shared/data/omniglot"
    )


def load_data(root: Path) -> tuple[ClassStore, list[list[bytes]], str]:
    """The train split as a decoded store, the same classes as PNG bytes, and a description."""
    try:
        store = omniglot_small(root, split="train", download=False)
    except DataError:
        store = synthetic(split="train", rotations=4)
        what = (
            f"SYNTHETIC glyphs (no Omniglot archives in {root}); the baseline decodes "
            f"28x28 PNGs instead of 105x105 ones, so its figure is flattering"
        )
        return store, encode_pngs(store), what
    return store, read_pngs(root, store.names), f"Omniglot small, train split, from {root}"


def read_pngs(root: Path, names: list[str]) -> list[list[bytes]]:
    """Raw PNG bytes of each class in `names`, in the store's class and image order."""
    by_class: dict[str, list[bytes]] = {}
    for archive in SMALL_ARCHIVES:
        # Greek and Latin are in both archives with identical files: the first copy wins
        for name, files in archive_pngs(root / archive).items():
            by_class.setdefault(name, files)
    return [by_class[name] for name in names]


def archive_pngs(path: Path) -> dict[str, list[bytes]]:
    """{"Alphabet/characterNN": PNG bytes sorted by file name} of one zip or extracted folder."""
    stem = path.name.removesuffix(".zip")
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            files = {
                n[len(stem) + 1 :]: zf.read(n)
                for n in zf.namelist()
                if n.startswith(stem + "/") and n.endswith(".png")
            }
    else:
        folder = path.with_name(stem)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}
    grouped: dict[str, list[bytes]] = {}
    for member in sorted(files):
        parts = member.split("/")
        if len(parts) == 3 and not parts[2].startswith("."):
            grouped.setdefault(f"{parts[0]}/{parts[1]}", []).append(files[member])
    return grouped


def encode_pngs(store: ClassStore) -> list[list[bytes]]:
    """PNG bytes of every stored image, per base class (the synthetic fallback)."""
    out = []
    for start, count in zip(store.offsets.tolist(), store.counts.tolist()):
        out.append([png_bytes(img) for img in store.images[start : start + count]])
    return out


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 [1, H, W], strokes 255 -> PNG with dark strokes on white, like Omniglot's files."""
    buf = io.BytesIO()
    Image.fromarray(255 - image[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- the baseline pipeline


def decode(raw: bytes) -> torch.Tensor:
    """PNG bytes -> float [1, 28, 28] with strokes 1: open, resize, to tensor, invert."""
    with Image.open(io.BytesIO(raw)) as img:
        img = img.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return 1.0 - torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class PerImagePipeline:
    """Episodes built one image at a time from PNG bytes, with Python's `random`."""

    def __init__(self, pngs: list[list[bytes]], way: int, shot: int, query: int, device, seed=0):
        self.pngs, self.way, self.shot, self.query = pngs, way, shot, query
        self.device = device
        self.rng = random.Random(seed)

    def task(self) -> tuple[torch.Tensor, list[int]]:
        """One episode's images [way, shot+query, 1, 28, 28] and its global class ids."""
        k, n_base = self.shot + self.query, len(self.pngs)
        images, classes = [], []
        for c in self.rng.sample(range(n_base), self.way):
            turns = self.rng.randrange(4)  # one random rotation per class, as a new class
            classes.append(turns * n_base + c)
            for i in self.rng.sample(range(len(self.pngs[c])), k):
                images.append(torch.rot90(decode(self.pngs[c][i]), turns, dims=(-2, -1)))
        return torch.stack(images).view(self.way, k, *images[0].shape), classes

    def sample(self, batch_size: int) -> Episodes:
        tasks = [self.task() for _ in range(batch_size)]
        x = torch.stack([t[0] for t in tasks])  # [B, way, k, C, H, W]
        n, way, k, shape = x.shape[0], x.shape[1], x.shape[2], x.shape[3:]
        labels = torch.arange(way)[None, :, None].expand(n, way, k)  # remapped to 0..way-1
        s = self.shot
        return Episodes(
            x[:, :, :s].reshape(n, way * s, *shape),
            labels[:, :, :s].reshape(n, way * s),
            x[:, :, s:].reshape(n, way * (k - s), *shape),
            labels[:, :, s:].reshape(n, way * (k - s)),
            torch.tensor([t[1] for t in tasks]),
        ).to(self.device)


def measure(store, pngs, way, shot, query, device, quick: bool) -> dict:
    """One config: metarun and baseline episodes/s, their ratio, and the reference ratio."""
    sampler = EpisodeSampler(store, way, shot=shot, query=query, device=device, seed=0)
    pipeline = PerImagePipeline(pngs, way, shot, query, device, seed=0)
    # quick: a smoke test of the code path, not a measurement
    repeats, block_s = (1, 0.1) if quick else (REPEATS, BLOCK_S)
    ours, base = interleaved(
        lambda: sampler.sample(META_BATCH),
        lambda: pipeline.sample(META_BATCH),
        repeats,
        block_s,
        1,
        device,
    )
    ours_rate = META_BATCH * 1000 / statistics.median(ours)
    base_rate = META_BATCH * 1000 / statistics.median(base)
    reference = L2L_REFERENCE[way]
    return {
        "benchmark": "sampler",
        "config": f"{way}-way {shot}-shot {query}-query, meta-batch {META_BATCH}",
        "unit": "episodes/s",
        "metarun": ours_rate,
        "baseline": base_rate,
        "ratio": ours_rate / base_rate,
        "l2l_reference": reference,
        "x_vs_l2l_reference": ours_rate / reference,
        "target_episodes_per_s": TARGET_X * reference,
        "met_target": ours_rate >= TARGET_X * reference,
        "repeats": repeats,
        "samples_ms_per_meta_batch": {"metarun": ours, "baseline": base},
    }


# ---------------------------------------------------------------- 84x84 RGB (miniImageNet's shape)

RGB_CONFIG = (5, 5, 15)  # way, shot, query
RGB_META_BATCH = 4
RGB_CLASSES, RGB_PER_CLASS = 64, 60  # miniImageNet's training split has 64 classes of 600


def rgb_data(seed: int = 0) -> tuple[ClassStore, np.ndarray]:
    """Random 84x84 RGB images: a class store (uint8 [N, 3, 84, 84]) and the same pixels as
    one HWC uint8 array, the layout of the miniImageNet pickle caches."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (RGB_CLASSES * RGB_PER_CLASS, 3, 84, 84), generator=g)
    images = images.to(torch.uint8)
    per_class = list(images.split(RGB_PER_CLASS))
    store = ClassStore.from_classes(per_class, [f"c{i}" for i in range(RGB_CLASSES)])
    return store, images.permute(0, 2, 3, 1).contiguous().numpy()


class PerItemArrayPipeline:
    """The shape of learn2learn 0.2.0's MiniImagenet + TaskDataset: Python `random` picks
    classes and images, each image is indexed out of the in-memory HWC array, made a float
    tensor in [0, 1] and transposed to CHW; the task is stacked and split."""

    def __init__(self, array: np.ndarray, way: int, shot: int, query: int, device, seed=0):
        self.array, self.way, self.shot, self.query = array, way, shot, query
        self.device, self.rng = device, random.Random(seed)

    def item(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.array[index]).permute(2, 0, 1).float().div(255.0)

    def sample(self, batch_size: int) -> Episodes:
        k = self.shot + self.query
        tasks, classes = [], []
        for _ in range(batch_size):
            picked = self.rng.sample(range(RGB_CLASSES), self.way)
            rows = [
                c * RGB_PER_CLASS + i
                for c in picked
                for i in self.rng.sample(range(RGB_PER_CLASS), k)
            ]
            tasks.append(torch.stack([self.item(r) for r in rows]).view(self.way, k, 3, 84, 84))
            classes.append(picked)
        x = torch.stack(tasks)
        n, s = x.shape[0], self.shot
        labels = torch.arange(self.way)[None, :, None].expand(n, self.way, k)
        return Episodes(
            x[:, :, :s].reshape(n, self.way * s, 3, 84, 84),
            labels[:, :, :s].reshape(n, self.way * s),
            x[:, :, s:].reshape(n, self.way * (k - s), 3, 84, 84),
            labels[:, :, s:].reshape(n, self.way * (k - s)),
            torch.tensor(classes),
        ).to(self.device)


def measure_rgb(device, quick: bool) -> dict:
    """84x84 RGB, 5-way 5-shot 15-query, meta-batch 4: metarun against the per-item
    pipeline, same run, same images (random pixels: no miniImageNet on this machine)."""
    way, shot, query = RGB_CONFIG
    store, array = rgb_data()
    sampler = EpisodeSampler(store, way, shot=shot, query=query, device=device, seed=0)
    pipeline = PerItemArrayPipeline(array, way, shot, query, device, seed=0)
    repeats, block_s = (1, 0.1) if quick else (REPEATS, BLOCK_S)
    ours, base = interleaved(
        lambda: sampler.sample(RGB_META_BATCH),
        lambda: pipeline.sample(RGB_META_BATCH),
        repeats,
        block_s,
        1,
        device,
    )
    ours_rate = RGB_META_BATCH * 1000 / statistics.median(ours)
    base_rate = RGB_META_BATCH * 1000 / statistics.median(base)
    return {
        "benchmark": "sampler_84",
        "config": f"84x84 RGB {way}-way {shot}-shot {query}-query, meta-batch {RGB_META_BATCH}",
        "unit": "episodes/s",
        "metarun": ours_rate,
        "baseline": base_rate,
        "ratio": ours_rate / base_rate,
        "repeats": repeats,
        "data": f"random 84x84 RGB images, {RGB_CLASSES} classes x {RGB_PER_CLASS}",
        "device": str(device),
    }


# ---------------------------------------------------------------- entry points


def run(device: str = "cpu", quick: bool = False, omniglot_dir: str | None = None) -> list[dict]:
    """Measure every config; print a few lines per config and return one record each."""
    device = torch.device(device)
    store, pngs, what = load_data(omniglot_root(omniglot_dir))
    print(f"sampler data: {what}; {store.num_classes} classes with rotations; device {device}")
    records = []
    for way, shot, query in CONFIGS:
        record = measure(store, pngs, way, shot, query, device, quick)
        record.update(data=what, device=str(device))
        print_record(record)
        records.append(record)
    r = measure_rgb(device, quick)
    print(f"  {r['config']} ({r['data']}):")
    print(
        f"    metarun   {r['metarun']:10,.0f} episodes/s   baseline {r['baseline']:,.1f}   "
        f"ratio {r['ratio']:,.0f}x"
    )
    records.append(r)
    return records


def print_record(r: dict) -> None:
    met = "met" if r["met_target"] else "MISSED"
    print(f"  {r['config']}:")
    print(f"    metarun   {r['metarun']:10,.0f} episodes/s (median of {r['repeats']} blocks)")
    print(f"    baseline  {r['baseline']:10,.1f} episodes/s")
    print(f"    ratio     {r['ratio']:10,.0f}x metarun/baseline")
    print(
        f"    {r['x_vs_l2l_reference']:,.0f}x vs learn2learn reference "
        f"({r['l2l_reference']:.0f} episodes/s, not measured here); "
        f"target {r['target_episodes_per_s']:,.0f} episodes/s (>= {TARGET_X}x): {met}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true", help="short timings, for a smoke test")
    parser.add_argument(
        "--omniglot-root",
        default=None,
        help="folder with the small Omniglot zips (default $METARUN_OMNIGLOT_DIR, "
        "else ../shared/data/omniglot next to the repo); synthetic data if absent",
    )
    return parser


def main() -> None:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args()
    run(args.device, args.quick, args.omniglot_root)


if __name__ == "__main__":
    main()
