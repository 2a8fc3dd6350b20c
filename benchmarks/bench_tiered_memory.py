"""Peak memory of data=tieredimagenet's memory-mapped cache, on a stand-in of known size.

No tieredImageNet on this machine, so the script writes a stand-in in the npz form (random
84x84 RGB images, `--images` of them in 200 classes), then, each in a fresh process:
1. the first load, which decodes into the memory-mapped cache;
2. a later load (the cache exists) followed by `--batches` meta-batches of 5-way 5-shot
   15-query episodes, 4 per batch.
It prints each process's peak resident memory above what it held after imports, next to
the decoded data's size. The first decode holds the npz source in memory once (numpy reads
an npz member whole); later runs map the cache and touch only the sampled images.

Run: python -m benchmarks.bench_tiered_memory [--images 20000] [--batches 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
import torch
from metarun.data import tiered
from metarun.data.episodes import EpisodeSampler
from metarun.data.tiered import tiered_imagenet
tiered.SPLIT_CLASSES["train"] = 200  # the stand-in's classes (the loader expects Ren et al.'s 351)
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = peak_mb()
store = tiered_imagenet(sys.argv[1], "train")
batches = int(sys.argv[2])
if batches:
    sampler = EpisodeSampler(store, 5, 5, 15, seed=0)
    for _ in range(batches):
        sampler.sample(4)
print(json.dumps({"start_mb": start, "peak_mb": peak_mb(), "images": len(store.images)}))
"""


def child(root: Path, batches: int, env: dict) -> dict:
    import json

    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(batches)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "tiered", Path(tmp) / "cache"
        root.mkdir()
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.images, 84, 84, 3), dtype=np.uint8)
        labels = np.arange(args.images) % 200
        np.savez(root / "train_images.npz", images=images)
        import pickle

        with open(root / "train_labels.pkl", "wb") as f:
            pickle.dump(
                {"label_specific": labels, "label_specific_str": [f"c{i}" for i in range(200)]}, f
            )
        del images
        decoded_mb = args.images * 84 * 84 * 3 / 2**20
        env = {**os.environ, "METARUN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        first = child(root, 0, env)
        later = child(root, args.batches, env)
    print(
        f"stand-in: {args.images} images of 84x84x3 in 200 classes = {decoded_mb:,.0f} MB decoded"
    )
    print(
        f"first load (decode into the cache): peak {first['peak_mb'] - first['start_mb']:,.0f} MB "
        "above the process after imports (the npz source is read whole once)"
    )
    print(
        f"later load + {args.batches} meta-batches (5w5s q15, 4 tasks): peak "
        f"{later['peak_mb'] - later['start_mb']:,.0f} MB above the process after imports"
    )


if __name__ == "__main__":
    main()
