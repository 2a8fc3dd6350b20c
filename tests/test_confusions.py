"""The test's mistakes by class: test_confusions.csv (which class each wrong query was taken
for) and test_classes.csv (each class's queries and errors), named by the data set's
classes, consistent with the test accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from conftest import run_cli

from metarun.algorithms.base import MetaLearner
from metarun.data import ClassStore, FixedEpisodes
from metarun.data.sinusoid import sinusoid
from metarun.runners.evaluate import confusion_counts, evaluate
from metarun.runners.results import write_confusions


def tagged_store(classes=6, images=4, rotations=1) -> ClassStore:
    """Each image's pixel [0, 0] holds its base class's index."""
    per_class = []
    for c in range(classes):
        x = torch.zeros(images, 1, 4, 4, dtype=torch.uint8)
        x[:, 0, 0, 0] = c
        per_class.append(x)
    return ClassStore.from_classes(
        per_class, [f"alpha/char{c}" for c in range(classes)], rotations=rotations
    )


class MistakesTwoForThree(MetaLearner):
    """Reads the class tags: every query goes to its own class, except that a query of base
    class 2 goes to base class 3 whenever both are in the episode."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def predict(self, support_x, support_y, query_x, way=None):
        tag = lambda x: (x[..., 0, 0, 0] * 255).round().long()  # noqa: E731
        s, q = tag(support_x), tag(query_x)  # [B, ns], [B, nq] (shot 1: support in label order)
        by_class = s.gather(1, support_y.argsort(1))  # [B, way] each label's tag
        logits = (q[:, :, None] == by_class[:, None, :]).float()
        target = (by_class == 3).float()  # [B, way]: the label of class 3, if present
        moved = (q == 2) & (target.sum(1, keepdim=True) > 0)
        logits = torch.where(moved[..., None], 2 * target[:, None, :], logits)
        return logits


def expected_mistakes(episodes: FixedEpisodes) -> tuple[int, int]:
    """Queries of class 2 in episodes that also hold class 3, and all queries."""
    both = ((episodes.classes == 2).any(1) & (episodes.classes == 3).any(1)).sum()
    return int(both) * episodes.query, episodes.n * episodes.way * episodes.query


def test_evaluate_counts_each_class_and_each_confused_pair():
    episodes = FixedEpisodes(tagged_store(), 40, 3, 1, 2, seed=0)
    result = evaluate(MistakesTwoForThree(), episodes, confusions=True)
    wrong, queries = expected_mistakes(episodes)
    assert 0 < wrong < queries  # the seed gives episodes with and without the pair
    assert result["confusions"] == [[2, 3, wrong]]
    assert result["class_errors"][2] == wrong
    assert sum(result["class_errors"].values()) == wrong
    assert sum(result["class_queries"].values()) == queries
    # every class that appeared is counted, by how many of its queries the episodes held
    appearances = torch.bincount(episodes.classes.flatten(), minlength=6) * episodes.query
    assert result["class_queries"] == {c: int(n) for c, n in enumerate(appearances) if n}
    assert abs(result["acc"] - (1 - wrong / queries)) < 1e-6
    # validation asks for the score only: no counting by class
    plain = evaluate(MistakesTwoForThree(), episodes)
    assert "confusions" not in plain and plain["acc"] == result["acc"]


def test_confusion_counts_orders_pairs_by_frequency_then_ids():
    queried = torch.tensor([0, 0, 1, 1, 1, 2, 2, 5])
    wrong = torch.tensor([[1, 2], [0, 1], [1, 2], [2, 0], [2, 1], [0, 5]])
    out = confusion_counts(queried, wrong)
    assert out["confusions"] == [[1, 2, 2], [0, 1, 1], [0, 5, 1], [2, 0, 1], [2, 1, 1]]
    assert out["class_queries"] == {0: 2, 1: 3, 2: 2, 5: 1}
    assert out["class_errors"] == {0: 2, 1: 2, 2: 2, 5: 0}
    none = confusion_counts(queried, torch.zeros(0, 2, dtype=torch.int64))
    assert none["confusions"] == [] and set(none["class_errors"].values()) == {0}


def test_class_names_say_the_rotation():
    store = tagged_store(classes=3, rotations=4)
    assert store.class_name(1) == "alpha/char1"
    assert store.class_name(3 + 1) == "alpha/char1 rotated 90"
    assert store.class_name(2 * 3 + 2) == "alpha/char2 rotated 180"
    unnamed = ClassStore.from_classes([torch.zeros(2, 1, 4, 4, dtype=torch.uint8)], [], 1)
    assert unnamed.class_name(0) == "class 0"


def test_files_name_the_classes_and_agree_with_the_counts(tmp_path):
    store = tagged_store()
    episodes = FixedEpisodes(store, 30, 4, 1, 3, seed=1)
    result = evaluate(MistakesTwoForThree(), episodes, confusions=True)
    record, pairs = write_confusions(tmp_path, store, result)
    with open(tmp_path / record["file"]) as f:
        confusions = list(csv.DictReader(f))
    with open(tmp_path / record["classes_file"]) as f:
        classes = list(csv.DictReader(f))
    wrong, queries = expected_mistakes(episodes)
    assert record["errors"] == wrong and record["queries"] == queries
    assert confusions == [
        {
            "true_class": "alpha/char2",
            "predicted_class": "alpha/char3",
            "count": str(wrong),
            "share_of_errors": "1.0",
        }
    ]
    assert record["top"] == [
        {"true": "alpha/char2", "predicted": "alpha/char3", "count": wrong, "share_of_errors": 1.0}
    ]
    assert pairs == [["alpha/char2", "alpha/char3", wrong, 1.0]]
    # hardest first: class 2 is the only one with errors; the rotated ones are named so
    assert classes[0]["class"] == "alpha/char2" and int(classes[0]["errors"]) == wrong
    assert all(int(row["errors"]) == 0 for row in classes[1:])
    assert sum(int(row["queries"]) for row in classes) == queries
    # a rotated class (ids 6..11 with two rotations) is named with its turn
    rotated = {
        "class_queries": {0: 2, 7: 2},
        "class_errors": {0: 0, 7: 1},
        "confusions": [[7, 0, 1]],
    }
    record, pairs = write_confusions(tmp_path, tagged_store(rotations=2), rotated)
    assert pairs == [["alpha/char1 rotated 180", "alpha/char0", 1, 1.0]]
    with open(tmp_path / record["classes_file"]) as f:
        assert [r["class"] for r in csv.DictReader(f)] == ["alpha/char1 rotated 180", "alpha/char0"]


def test_regression_has_no_confusions():
    class Zero(MetaLearner):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def predict(self, support_x, support_y, query_x, way=None):
            return torch.zeros(*query_x.shape[:2], 1)

    result = evaluate(Zero(), sinusoid("test").fixed_episodes(4, 1, 5, 5, seed=0), confusions=True)
    assert "confusions" not in result and "class_queries" not in result


def test_a_run_writes_them_beside_its_results(trained_run: Path, tmp_path):
    results = json.loads((trained_run / "results.json").read_text())
    record = results["confusions"]
    with open(trained_run / "test_confusions.csv") as f:
        confusions = list(csv.DictReader(f))
    with open(trained_run / "test_classes.csv") as f:
        classes = list(csv.DictReader(f))
    queries = results["episodes"] * results["way"] * results["query"]
    assert record["queries"] == queries == sum(int(r["queries"]) for r in classes)
    errors = sum(int(r["count"]) for r in confusions)
    assert record["errors"] == errors == sum(int(r["errors"]) for r in classes)
    assert abs(results["test_acc"] - (1 - errors / queries)) < 1e-6
    assert all(r["true_class"].startswith("glyph") for r in confusions)
    counts = [int(r["count"]) for r in confusions]
    assert counts == sorted(counts, reverse=True)
    assert [c["count"] for c in record["top"]] == counts[:5]
    # mode=test of the same checkpoint writes the same files
    run_cli(
        "mode=test",
        f"ckpt={trained_run / 'checkpoints' / 'best.pt'}",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert (tmp_path / "test_confusions.csv").read_text() == (
        trained_run / "test_confusions.csv"
    ).read_text()
