"""Can two characters of an alphabet be told apart at all? A check that does not depend on
any meta-learner (README, "Why Early Aramaic stops near 92%").

For each pair of characters, a small convolutional network is trained on the drawings of
both characters by 19 of the 20 drawers (random small affine distortions, as
trainer.augment=affine), then classifies the two drawings of the 20th drawer; each drawer is
held out in turn, so every pair is scored on 40 drawings it never trained on. A pair that
such a network, trained on 19 drawings of each, cannot separate is beyond a one-shot learner
too. It also prints the least error a learner can make in within-alphabet one-shot episodes
when it cannot tell the given pairs apart (see `floor`).

    python docs/analysis/lookalike_pairs.py --root DIR_WITH_THE_ZIPS [--size 56]

It reads omniglot_small's test split (Early Aramaic and Tagalog) through metarun's loader,
never downloads (--root must hold the two archives), and uses the test alphabet's labels:
it is an analysis of the data, not a choice of learner settings.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.augment import random_affine
from metarun.data.images import Preprocess, to_float
from metarun.data.omniglot import omniglot_small

PAIRS = "character04:character20,character03:character17,character13:character14"


def small_cnn(width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(1 if i == 0 else width, width, 3, padding=1)]
        layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


def held_out_drawer_accuracy(a: torch.Tensor, b: torch.Tensor, steps: int) -> tuple[int, int]:
    """a, b: float [drawers, 1, H, W], row i drawn by the same person in both. Right answers
    and drawings scored, over every held-out drawer."""
    right = 0
    for held in range(len(a)):
        torch.manual_seed(held)
        generator = torch.Generator().manual_seed(held)
        keep = [i for i in range(len(a)) if i != held]
        x = torch.cat([a[keep], b[keep]])
        y = torch.cat([torch.zeros(len(keep)), torch.ones(len(keep))]).long()
        net = small_cnn()
        optimizer = torch.optim.Adam(net.parameters(), 1e-3)
        for _ in range(steps):
            loss = F.cross_entropy(net(random_affine(x, generator)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            guess = net(torch.cat([a[held : held + 1], b[held : held + 1]])).argmax(-1)
        right += int(guess[0] == 0) + int(guess[1] == 1)
    return right, 2 * len(a)


def floor(characters: int, way: int, pairs: int) -> float:
    """Least expected error of within-alphabet `way`-way one-shot episodes (one query per
    class; classes drawn uniformly from `characters`) for a learner that tells every
    character apart except `pairs` disjoint pairs, where it guesses: a pair costs one wrong
    query in expectation when both of its characters are in the episode (each of its two
    queries half the time, or, assigned together, both or neither), of `way` queries."""
    both = way * (way - 1) / (characters * (characters - 1))
    return pairs * both / way


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder with the two small archives")
    parser.add_argument("--alphabet", default="Early_Aramaic")
    parser.add_argument("--pairs", default=PAIRS, help="a:b,c:d,... character names")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=300, help="training steps per drawer")
    parser.add_argument("--way", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = omniglot_small(
        args.root,
        "test",
        download=False,
        rotations=1,
        images=Preprocess(size=args.size, channels=1, invert=True),
    )
    characters = store.alphabets.count(args.alphabet)

    def drawings(character: str) -> torch.Tensor:
        class_id = store.names.index(f"{args.alphabet}/{character}")
        start = int(store.offsets[class_id])
        order = store.drawers[start : start + int(store.counts[class_id])].argsort()
        return to_float(store.class_images(class_id)[order])

    print(f"{args.alphabet}: {characters} characters; {args.size}x{args.size} images")
    for pair in args.pairs.split(","):
        first, second = pair.split(":")
        right, n = held_out_drawer_accuracy(drawings(first), drawings(second), args.steps)
        low, high = wilson(right, n)
        print(
            f"{first} vs {second}: {right}/{n} held-out drawings right, "
            f"{100 * right / n:.1f}% (95% interval {100 * low:.1f}-{100 * high:.1f}%)",
            flush=True,
        )
    for pairs in (1, 2):
        print(
            f"{args.way}-way within-alphabet one-shot error, {pairs} pair(s) told apart by "
            f"chance, all else right: {100 * floor(characters, args.way, pairs):.2f}%"
        )


if __name__ == "__main__":
    main()
