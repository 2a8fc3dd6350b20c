"""docs/analysis/lookalike_pairs.py's arithmetic: the least within-alphabet error of a
learner that cannot tell some pairs of characters apart, against a simulation."""

from __future__ import annotations

import importlib.util

import torch
from conftest import REPO

spec = importlib.util.spec_from_file_location(
    "lookalike_pairs", REPO / "docs" / "analysis" / "lookalike_pairs.py"
)
lookalike = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lookalike)


def simulated_error(characters: int, way: int, pairs: int, episodes: int = 40000) -> float:
    """Episodes of `way` of `characters` classes, one query each; the first `pairs` disjoint
    pairs (0-1, 2-3, ...) are told apart by a coin: each query of a pair whose partner is in
    the episode goes to either of the two with probability 1/2."""
    g = torch.Generator().manual_seed(0)
    chosen = torch.rand(episodes, characters, generator=g).argsort(1)[:, :way]
    present = torch.zeros(episodes, characters, dtype=torch.bool)
    present.scatter_(1, chosen, True)
    wrong = torch.zeros(episodes)
    for p in range(pairs):
        both = present[:, 2 * p] & present[:, 2 * p + 1]
        coins = torch.rand(episodes, 2, generator=g) < 0.5
        wrong += both * coins.sum(1)
    return float((wrong / way).mean())


def test_floor_matches_a_simulation_of_the_episodes():
    for characters, way, pairs in ((22, 20, 1), (22, 20, 2), (17, 5, 1), (10, 10, 3)):
        expected = lookalike.floor(characters, way, pairs)
        assert abs(simulated_error(characters, way, pairs) - expected) < 0.004
    # every character in every episode: each pair costs one query in way
    assert lookalike.floor(10, 10, 3) == 3 / 10
    assert abs(lookalike.floor(22, 20, 1) - 380 / 462 / 20) < 1e-12


def test_wilson_interval_holds_the_rate():
    low, high = lookalike.wilson(21, 40)
    assert low < 21 / 40 < high and 0 < low and high < 1
    low, high = lookalike.wilson(40, 40)
    assert abs(high - 1) < 1e-12 and low > 0.9
