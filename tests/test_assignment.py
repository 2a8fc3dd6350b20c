"""eval.assignment: each query labelled on its own ("independent") or an episode's queries
assigned together, each class its equal share ("balanced", transductive)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_with, read_jsonl, run_cli

from metarun.algorithms.base import MetaLearner
from metarun.data import ClassStore, ConfigError, FixedEpisodes
from metarun.data.episodes import fixed_episodes
from metarun.data.sinusoid import sinusoid
from metarun.runners.evaluate import assign, balanced_labels, evaluate
from metarun.runners.report import collect, comparisons, groups_of
from metarun.runners.results import episode_set, results_record
from metarun.runners.validate import validate


def tagged_store(classes=8, images=6) -> ClassStore:
    """Each image's pixel [0, 0] holds its class's index."""
    per_class = []
    for c in range(classes):
        x = torch.zeros(images, 1, 4, 4, dtype=torch.uint8)
        x[:, 0, 0, 0] = c
        per_class.append(x)
    return ClassStore.from_classes(per_class, [f"c{c}" for c in range(classes)], rotations=1)


class Confused(MetaLearner):
    """Reads the class tags: a query scores 1 for its own class, 0 for the others, except
    that a query of the episode's class 0 scores 1.5 for class 1. On its own that query
    goes to class 1; assigned together with the others, class 1 is taken by its own query
    (1 + 1 > 1.5 + 0), so the balanced assignment labels every query right."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a learner has parameters
        self.scale = scale

    def predict(self, support_x, support_y, query_x, way=None):
        way = int(support_y.max()) + 1 if way is None else way
        tag = lambda x: (x[..., 0, 0, 0] * 255).round().long()  # noqa: E731
        s, q = tag(support_x), tag(query_x)  # [B, ns], [B, nq]
        by_class = torch.stack(
            [
                s.gather(1, (support_y == c).long().argmax(1, keepdim=True))[:, 0]
                for c in range(way)
            ],
            1,
        )  # [B, way]: each class's tag
        logits = (q[:, :, None] == by_class[:, None, :]).float()
        confused = q == by_class[:, :1]  # queries of class 0
        logits[..., 1] += 1.5 * confused
        return self.scale * logits


class Flat(MetaLearner):
    """Predicts 0 for every query point (a regression learner's output shape)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def predict(self, support_x, support_y, query_x, way=None):
        return torch.zeros(*query_x.shape[:2], 1)


def best_by_search(logp: torch.Tensor, query: int) -> float:
    """The largest total log-probability of a labelling that gives each class `query` of
    the n queries, by trying every one (small n only)."""
    n, way = logp.shape
    slots = [c for c in range(way) for _ in range(query)]
    return max(
        float(sum(logp[i, c] for i, c in enumerate(order)))
        for order in set(itertools.permutations(slots))
    )


@pytest.mark.parametrize(("way", "query"), [(4, 1), (5, 1), (3, 2), (2, 3)])
def test_balanced_labels_give_each_class_its_share_and_are_the_most_probable(way, query):
    gen = torch.Generator().manual_seed(way * 10 + query)
    logits = 3 * torch.randn(6, way * query, way, generator=gen)
    labels = balanced_labels(logits, query)
    logp = torch.log_softmax(logits.double(), -1)
    for episode, chosen in zip(logp, labels):
        assert torch.bincount(chosen, minlength=way).tolist() == [query] * way
        total = float(episode.gather(1, chosen[:, None]).sum())
        assert total == pytest.approx(best_by_search(episode, query), abs=1e-9)


def test_the_labels_follow_the_queries_not_their_order():
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(4, 12, 4, generator=gen)
    order = torch.randperm(12, generator=gen)
    assert torch.equal(balanced_labels(logits, 3)[:, order], balanced_labels(logits[:, order], 3))


def test_scores_that_are_not_finite_count_as_the_least_likely():
    logits = torch.tensor([[[float("nan"), 0.0], [5.0, float("-inf")]]])
    assert balanced_labels(logits, 1).tolist() == [[1, 0]]


def test_independent_leaves_the_logits_and_balanced_fixes_a_double_claim():
    logits = torch.tensor([[[1.0, 1.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    assert assign(logits, 3, 1, "independent") is logits
    assert logits.argmax(-1).tolist() == [[1, 1, 2]]  # two queries claim class 1
    assert assign(logits, 3, 1, "balanced").argmax(-1).tolist() == [[0, 1, 2]]


def test_scores_of_another_shape_or_an_unknown_assignment_are_refused():
    with pytest.raises(ConfigError, match="needs 2 queries of each of the 3 classes"):
        assign(torch.zeros(1, 6, 4), 3, 2, "balanced")  # a fourth column: not one per class
    with pytest.raises(ConfigError, match="choose independent or balanced"):
        assign(torch.zeros(1, 3, 3), 3, 1, "hungarian")


@pytest.mark.parametrize(("way", "query"), [(3, 1), (5, 1), (4, 3)])
def test_evaluate_scores_by_the_assignment_asked_for(way, query):
    episodes = FixedEpisodes(tagged_store(), 12, way, 1, query, seed=0)
    learner = Confused()
    independent = evaluate(learner, episodes)
    balanced = evaluate(learner, episodes, assignment="balanced")
    assert independent["acc"] == pytest.approx((way - 1) / way)
    assert balanced["acc"] == pytest.approx(1.0)
    assert evaluate(learner, episodes, batch_size=5, assignment="balanced") == balanced


def test_balanced_assignment_is_refused_for_regression():
    tasks = fixed_episodes(sinusoid("test"), 3, 1, 5, 5)
    with pytest.raises(ConfigError, match="regression: use eval.assignment=independent"):
        evaluate(Flat(), tasks, assignment="balanced")
    with pytest.raises(ConfigError, match="is regression: use eval.assignment=independent"):
        validate(
            compose_with("data=sinusoid", "algo=maml", "backbone=mlp", "eval.assignment=balanced")
        )
    with pytest.raises(ConfigError, match="is regression: use trainer.val_assignment=indep"):
        validate(
            compose_with(
                "data=sinusoid", "algo=maml", "backbone=mlp", "trainer.val_assignment=balanced"
            )
        )
    with pytest.raises(ConfigError, match="eval.assignment"):
        validate(compose_with("eval.assignment=hungarian"))
    with pytest.raises(ConfigError, match="trainer.val_assignment='hungarian'; choose .* or null"):
        validate(compose_with("trainer.val_assignment=hungarian"))


def test_results_and_the_episode_definition_record_the_assignment():
    result = {"metric": "acc", "acc": 0.5, "ci95": 0.1, "episodes": 10}
    balanced = compose_with("eval.assignment=balanced")
    plain = compose_with()
    assert results_record(balanced, result)["assignment"] == "balanced"
    assert results_record(plain, result)["assignment"] == "independent"
    assert episode_set(balanced, 10)["assignment"] == "balanced"
    assert episode_set(balanced, 10) != episode_set(plain, 10)


def test_train_and_test_runs_record_it_and_the_report_never_pairs_the_two(tmp_path):
    """mode=train validates and tests with the balanced assignment; mode=test scores its
    checkpoint query by query; the report sees two scorings of the same episodes and does
    not pair them."""
    sweep = tmp_path / "runs"
    run_cli(*FAST, "eval.assignment=balanced", f"hydra.run.dir={sweep / 'train'}", cwd=tmp_path)
    trained = json.loads((sweep / "train" / "results.json").read_text())
    assert trained["assignment"] == "balanced"
    assert trained["test_episodes"]["set"]["assignment"] == "balanced"
    out = run_cli(
        "mode=test",
        f"ckpt={sweep / 'train'}",
        "logger=none",
        "eval.assignment=independent",
        f"hydra.run.dir={sweep / 'test'}",
        cwd=tmp_path,
    )
    tested = json.loads((sweep / "test" / "results.json").read_text())
    assert tested["assignment"] == "independent"
    assert "assigned together" not in out.stderr + out.stdout
    same = dict(trained["test_episodes"]["set"], assignment="independent")
    assert tested["test_episodes"]["set"] == same  # the same episodes, scored otherwise
    pairs, unpaired = comparisons(
        groups_of(collect([str(sweep / "train"), str(sweep / "test")])[0])
    )
    assert pairs == [] and len(unpaired) == 1


def val_rows(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_acc"]) for r in read_jsonl(run / "metrics.jsonl") if "val_acc" in r]


def test_validation_can_assign_otherwise_than_the_test(tmp_path):
    """trainer.val_assignment scores validation (and so chooses best.pt) one way while the
    test keeps eval.assignment: with balanced tests and independent validation, a run
    validates exactly as an all-independent run of the same seed, and tests balanced."""
    runs = {
        "independent": [],
        "balanced": ["eval.assignment=balanced"],
        "mixed": ["eval.assignment=balanced", "trainer.val_assignment=independent"],
    }
    for name, extra in runs.items():
        run_cli(*FAST, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    val = {name: val_rows(tmp_path / name) for name in runs}
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in runs}
    assert len(val["mixed"]) == 2 and val["mixed"] == val["independent"]
    assert val["mixed"] != val["balanced"]  # the balanced one is another score of the same weights
    assert results["mixed"]["best_step"] == results["independent"]["best_step"]
    assert results["mixed"]["best_val_acc"] == results["independent"]["best_val_acc"]
    assert results["mixed"]["assignment"] == "balanced"
    assert results["mixed"]["val_assignment"] == "independent"
    assert "val_assignment" not in results["balanced"]  # validated as it tests
