"""Ensembles of checkpoints (ckpt=[A,B,...]) and test-time augmentation (eval.tta)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from conftest import FAST, compose_with, run_cli
from omegaconf import OmegaConf
from PIL import Image

import metarun
from metarun.algorithms.base import MetaLearner
from metarun.algorithms.ensemble import Ensemble
from metarun.data import ConfigError
from metarun.data.augment import tta_views, warp
from metarun.data.episodes import fixed_episodes
from metarun.data.synthetic import synthetic
from metarun.errors import CheckpointError
from metarun.runners import checkpoint
from metarun.runners.evaluate import evaluate
from metarun.runners.results import episode_set
from metarun.runners.validate import validate


def episodes(n=12, way=5, query=3, seed=0):
    return fixed_episodes(
        synthetic("test"), n, way, 1, query, seed=seed, device="cpu", split="test"
    )


class Projector(MetaLearner):
    """Nearest class mean of the images under a fixed random projection (no batch norm, so
    its scores are far apart and the same in any batch)."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(28 * 28, 16, generator=generator))

    def predict(self, support_x, support_y, query_x, way=None):
        zs, zq = support_x.flatten(2) @ self.weight, query_x.flatten(2) @ self.weight
        onehot = torch.nn.functional.one_hot(support_y, way).float()
        means = onehot.transpose(1, 2) @ zs / onehot.sum(1)[..., None]
        return -(zq[:, :, None] - means[:, None]).pow(2).sum(-1) / 100


# ---------------------------------------------------------------- test-time views


def test_views_start_with_the_image_itself_and_follow_the_seed_alone():
    views = tta_views(5, seed=3)
    assert views.shape == (5, 2, 3)
    assert torch.equal(views[0], torch.eye(2, 3))
    assert torch.equal(views, tta_views(5, seed=3))
    assert not torch.equal(views[1:], tta_views(5, seed=4)[1:])
    assert torch.equal(tta_views(3, seed=3), views[:3])  # more views extend the list
    for theta in views[1:]:  # small maps: near the identity, not equal to it
        assert 0 < (theta - torch.eye(2, 3)).abs().max() < 0.5


class Recorder(MetaLearner):
    """Scores classes by the mean pixel of each query against each support image, and keeps
    every batch of query images it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def predict(self, support_x, support_y, query_x, way=None):
        self.seen.append(query_x.clone())
        s, q = support_x.mean((2, 3, 4)), query_x.mean((2, 3, 4))  # [B, ns], [B, nq]
        return -(q[:, :, None] - s[:, None, :]).abs() * 10


def test_tta_scores_each_episode_under_every_view_and_averages_log_probabilities():
    eps = episodes(n=4)
    learner = Recorder()
    result = evaluate(learner, eps, batch_size=4, tta=3, seed=7)
    views = tta_views(3, seed=7)
    batch = next(eps.batches(4))
    assert len(learner.seen) == 3  # one predict per view, every image under that view
    assert torch.equal(learner.seen[0], batch.query_x)
    for theta, seen in zip(views[1:], learner.seen[1:]):
        assert torch.equal(seen, warp(batch.query_x.flatten(0, 1), theta).view_as(seen))
    # the score: the mean over views of the log-probabilities, labelled by its largest
    plain = Recorder()
    logp = torch.stack(
        [
            plain.predict(
                warp(batch.support_x.flatten(0, 1), t).view_as(batch.support_x),
                batch.support_y,
                warp(batch.query_x.flatten(0, 1), t).view_as(batch.query_x),
            ).log_softmax(-1)
            for t in views
        ]
    ).mean(0)
    expected = (logp.argmax(-1) == batch.query_y).float().mean(-1).double()
    assert result["scores"] == expected.tolist()


def test_tta_does_not_depend_on_the_batch_size_and_one_view_is_the_plain_score():
    eps, learner = episodes(n=10), Projector(0)
    a = evaluate(learner, eps, batch_size=3, tta=4, seed=1)
    b = evaluate(learner, eps, batch_size=10, tta=4, seed=1)
    torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]))
    assert (
        evaluate(learner, eps, batch_size=4, tta=1)["scores"] == evaluate(learner, eps, 4)["scores"]
    )
    with pytest.raises(ConfigError, match="eval.tta=0"):
        evaluate(learner, eps, tta=0)


def test_tta_is_refused_for_regression_and_counts_views_from_one():
    cfg = compose_with("data=sinusoid", "backbone=mlp", "algo=maml", "eval.tta=4")
    with pytest.raises(ConfigError, match="eval.tta=4 averages class probabilities.*regression"):
        validate(cfg)
    with pytest.raises(ConfigError, match="eval.tta"):
        validate(compose_with("eval.tta=0"))
    validate(compose_with("eval.tta=8"))


def test_tta_is_recorded_but_does_not_change_the_episode_set():
    """Runs with and without test-time views are scored on the same episodes, so the
    report pairs them (an ablation of the views)."""
    plain, views = compose_with(), compose_with("eval.tta=8")
    assert episode_set(plain, 600) == episode_set(views, 600)


# ---------------------------------------------------------------- ensembles


def test_an_ensemble_averages_its_members_log_probabilities():
    eps = episodes()
    members = [Projector(0), Projector(1), Projector(2)]
    ensemble = Ensemble(members).eval()
    batch = next(eps.batches(12))
    with torch.no_grad():
        got = ensemble.predict(batch.support_x, batch.support_y, batch.query_x, batch.way)
        each = [
            m.predict(batch.support_x, batch.support_y, batch.query_x, batch.way) for m in members
        ]
    torch.testing.assert_close(got, torch.stack([e.log_softmax(-1) for e in each]).mean(0))
    # copies of one network are that network
    twins = Ensemble([members[0], Projector(0)])
    assert evaluate(twins, eps)["scores"] == evaluate(members[0], eps)["scores"]
    with pytest.raises(ConfigError, match="mode=test and mode=predict"):
        ensemble.meta_train_step(None)


def member_copy(ckpt, path, change=None):
    """A copy of a checkpoint with other weights (and `change` applied to its config)."""
    state = torch.load(ckpt, weights_only=False)
    torch.manual_seed(5)
    state["model"] = {  # other weights; batch norm's statistics stay valid
        k: v + 0.05 * torch.randn_like(v) if k.endswith(("weight", "bias")) else v
        for k, v in state["model"].items()
    }
    if change:
        change(state["config"])
    torch.save(state, path)
    return path


def test_mode_test_scores_several_checkpoints_as_one_ensemble(trained_run, tmp_path):
    best = trained_run / "checkpoints" / "best.pt"
    other = member_copy(best, tmp_path / "other.pt")
    out = tmp_path / "ens"
    run_cli(
        "mode=test",
        f"ckpt=[{best},{other}]",
        "eval.tta=2",
        "logger=none",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    results = json.loads((out / "results.json").read_text())
    assert (
        results["ckpt"] == [str(best), str(other)] and results["algo"] == "ensemble of 2 (protonet)"
    )
    assert results["tta"] == 2 and len(results["steps"]) == 2 and results["episodes"] == 50
    assert 0.6 < results["test_acc"] <= 1  # 5-way: chance is 0.2; the trained run scores ~0.9
    # the same figure in process: the two networks' ensemble on the run's own test episodes
    states = [checkpoint.load(best), checkpoint.load(other)]
    cfg = OmegaConf.create(states[0]["config"])
    eps = fixed_episodes(
        synthetic("test"), 50, 5, 1, 5, seed=cfg.eval.seed, device="cpu", split="test"
    )
    expected = evaluate(checkpoint.ensemble_of(states), eps, tta=2, seed=cfg.eval.seed)
    assert results["test_acc"] == pytest.approx(expected["acc"], abs=1e-12)

    # the Python API and mode=predict take the list too
    support, query = tmp_path / "support", tmp_path / "query"
    store = synthetic("test")
    for c in range(3):
        images = store.class_images(c)
        (support / f"g{c}").mkdir(parents=True)
        Image.fromarray(255 - images[0, 0].numpy()).save(support / f"g{c}" / "0.png")
        for i in (5, 6):
            query.mkdir(exist_ok=True)
            Image.fromarray(255 - images[i, 0].numpy()).save(query / f"g{c}_{i}.png")
    run_cli(
        "mode=predict", f"ckpt=[{best},{other}]", f"support={support}", f"query={query}",
        "logger=none", f"hydra.run.dir={tmp_path / 'pred'}", cwd=tmp_path,
    )  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(rows) == 6 and all(0 < float(r["score"]) <= 1 for r in rows)
    assert isinstance(metarun.load([best, other]), Ensemble)


def test_an_ensemble_of_unlike_checkpoints_is_refused_with_the_reason(trained_run, tmp_path):
    best = trained_run / "checkpoints" / "best.pt"

    def other_data(config):
        config["data"]["rotations"] = 1 if config["data"].get("rotations", 4) != 1 else 4

    elsewhere = member_copy(best, tmp_path / "elsewhere.pt", other_data)
    cases = [
        (f"ckpt=[{best},{best}]", "lists .*best.pt twice"),
        (f"ckpt=[{best},{elsewhere}]", "same data with the same image settings; .* data.rotations"),
        ("ckpt=[]", "ckpt"),
    ]
    for i, (ckpt, message) in enumerate(cases):
        proc = run_cli(
            "mode=test",
            ckpt,
            "logger=none",
            f"hydra.run.dir={tmp_path / str(i)}",
            cwd=tmp_path,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert re.search(message, proc.stderr), proc.stderr
    with pytest.raises(CheckpointError, match="twice"):
        checkpoint.load_learner([best, best])


def test_a_run_with_views_validates_and_tests_with_them_and_mode_test_repeats_it(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(*FAST, "trainer.steps=20", "eval.tta=3", f"hydra.run.dir={run}", cwd=tmp_path)
    trained = json.loads((run / "results.json").read_text())
    assert trained["tta"] == 3 and "3 test-time views" in proc.stderr + proc.stdout
    run_cli(
        "mode=test", f"ckpt={run}", "logger=none", f"hydra.run.dir={tmp_path / 't'}", cwd=tmp_path
    )
    again = json.loads((tmp_path / "t" / "results.json").read_text())
    assert (again["tta"], again["test_acc"]) == (3, trained["test_acc"])
