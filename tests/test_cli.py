"""The `metarun` command end to end, in subprocesses, on the synthetic data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, HAVE_OMNIGLOT, OMNIGLOT_DIR, read_jsonl, run_cli, run_dirs
from PIL import Image

import metarun
from metarun.data.synthetic import synthetic

RESULT_KEYS = {
    "test_acc",
    "ci95",
    "episodes",
    "way",
    "shot",
    "query",
    "algo",
    "data",
    "steps",
    "seconds",
}


def test_train_writes_the_documented_run_dir(trained_run):
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    results = json.loads((trained_run / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["algo"] == "protonet" and results["data"] == "synthetic"
    assert (results["way"], results["shot"], results["query"]) == (5, 1, 5)
    assert results["episodes"] == 50 and results["steps"] == 40 and results["seconds"] > 0
    # 5-way: chance is 0.2; 40 steps on these glyphs reach well above 0.6 (about 0.9 seen)
    assert 0.6 < results["test_acc"] <= 1.0 and 0 < results["ci95"] < 0.1
    rows = read_jsonl(trained_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert {"loss", "acc", "lr", "seconds"} <= set(rows[0]) and "val_acc" in rows[1]
    for name in ("last.pt", "best.pt"):
        state = torch.load(trained_run / "checkpoints" / name, weights_only=False)
        assert {"model", "optimizer", "step", "best_val", "rng", "sampler", "config"} <= set(state)
    assert torch.load(trained_run / "checkpoints" / "last.pt", weights_only=False)["step"] == 40


def test_mode_test_reproduces_the_training_score_and_accepts_new_shapes(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.pt"
    run_cli(
        "mode=test",
        f"ckpt={ckpt}",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'same'}",
        cwd=tmp_path,
    )
    same = json.loads((tmp_path / "same" / "results.json").read_text())
    trained = json.loads((trained_run / "results.json").read_text())
    # same weights, same fixed test episodes -> the very same accuracy
    assert same["test_acc"] == trained["test_acc"] and same["episodes"] == 50

    run_cli(
        "mode=test",
        f"ckpt={ckpt}",
        "way=3",
        "shot=2",
        "eval.episodes=30",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'new'}",
        cwd=tmp_path,
    )
    new = json.loads((tmp_path / "new" / "results.json").read_text())
    assert (new["way"], new["shot"], new["episodes"]) == (3, 2, 30)
    assert new["test_acc"] > 1 / 3


def test_mode_test_refuses_changing_the_model(trained_run, tmp_path):
    proc = run_cli(
        "mode=test",
        f"ckpt={trained_run / 'checkpoints' / 'best.pt'}",
        "algo.distance=cosine",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "algo.distance= cannot be changed" in proc.stderr


def export_glyphs(folder, class_ids, per_class, offset=0):
    """Save synthetic test-split glyphs as PNGs the way a user would draw them: dark ink on white."""
    store = synthetic("test")
    for c in class_ids:
        images = store.class_images(c)[offset : offset + per_class]
        for i, image in enumerate(images):
            path = (
                folder / f"glyph{c}" / f"{i}.png"
                if folder.name == "support"
                else folder / f"c{c}_{i}.png"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((255 - image[0]).numpy()).save(path)
    return store


def test_mode_predict_writes_predictions(trained_run, tmp_path):
    classes = [0, 1, 2, 3, 4]
    export_glyphs(tmp_path / "support", classes, 1)
    export_glyphs(tmp_path / "query", classes, 3, offset=5)
    out = tmp_path / "out"
    proc = run_cli(
        "mode=predict",
        f"ckpt={trained_run / 'checkpoints' / 'best.pt'}",
        f"support={tmp_path / 'support'}",
        f"query={tmp_path / 'query'}",
        "logger=none",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 15 and set(rows[0]) == {"query", "prediction", "score"}
    assert all(0 < float(r["score"]) <= 1 for r in rows)
    correct = sum(r["prediction"] == "glyph" + r["query"].split("_")[0][1:] for r in rows)
    assert correct >= 9, rows  # chance is 3 of 15
    assert "predictions" in proc.stdout


def test_mode_predict_assigns_the_queries_together_when_asked(trained_run, tmp_path):
    """eval.assignment=balanced: one image of each class in the query folder gets each class
    once, and each row's score is its class's probability, as with the default."""
    classes = [0, 1, 2, 3, 4, 5]
    export_glyphs(tmp_path / "support", classes, 1)
    export_glyphs(tmp_path / "query", classes, 1, offset=5)

    def predict(assignment: str, folder: str, check: bool = True):
        return run_cli(
            "mode=predict",
            f"ckpt={trained_run / 'checkpoints' / 'best.pt'}",
            f"support={tmp_path / 'support'}",
            f"query={tmp_path / 'query'}",
            "logger=none",
            f"eval.assignment={assignment}",
            f"hydra.run.dir={tmp_path / folder}",
            cwd=tmp_path,
            check=check,
        )

    rows = {}
    for assignment in ("independent", "balanced"):
        predict(assignment, assignment)
        with open(tmp_path / assignment / "predictions.csv") as f:
            rows[assignment] = {r["query"]: r for r in csv.DictReader(f)}
    balanced = [r["prediction"] for r in rows["balanced"].values()]
    assert sorted(balanced) == sorted(f"glyph{c}" for c in classes)
    for query, row in rows["balanced"].items():
        other = rows["independent"][query]
        if row["prediction"] == other["prediction"]:
            assert row["score"] == other["score"]
        else:  # a less likely class than the query's own best
            assert float(row["score"]) < float(other["score"])
    # a query folder that cannot be shared out evenly: refused, nothing written
    export_glyphs(tmp_path / "query", [0], 2, offset=6)  # adds c0_1.png: 7 images, 6 classes
    proc = predict("balanced", "uneven", check=False)
    assert proc.returncode != 0 and "multiple of 6" in proc.stderr
    assert not (tmp_path / "uneven" / "predictions.csv").exists()
    proc = predict("together", "unknown", check=False)
    assert proc.returncode != 0 and "eval.assignment" in proc.stderr


def test_python_api_load_and_predict(trained_run, tmp_path):
    learner = metarun.load(trained_run / "checkpoints" / "best.pt")
    # the preprocessing turns a user's PNG into exactly the stored tensor
    store = export_glyphs(tmp_path / "support", [7], 1)
    assert torch.equal(
        learner.preprocess(tmp_path / "support" / "glyph7" / "0.png"), store.class_images(7)[0]
    )
    support = torch.stack([store.class_images(c)[0] for c in range(4)]).float()[None] / 255
    query = torch.stack([store.class_images(c)[1] for c in range(4)]).float()[None] / 255
    logits = learner.predict(support, torch.arange(4)[None], query, 4)
    assert logits.shape == (1, 4, 4)


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tmp_path):
    args = [*FAST, "trainer.steps=60", "trainer.ckpt_every=10", "trainer.val_every=30"]
    run_cli(*args, f"paths.output_root={tmp_path / 'a'}", cwd=tmp_path)
    (full,) = run_dirs(tmp_path / "a")

    cmd = [sys.executable, "-m", "metarun", *args, f"paths.output_root={tmp_path / 'b'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "b").glob("**/checkpoints/last.pt")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (cut,) = run_dirs(tmp_path / "b")
    assert torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["step"] < 60

    time.sleep(1.1)  # a new run folder (Hydra names them by the second)
    run_cli(*args, f"paths.output_root={tmp_path / 'b'}", "resume=auto", cwd=tmp_path)
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)
    assert b["step"] == 60
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    assert ra["test_acc"] == rb["test_acc"] and ra["ci95"] == rb["ci95"]
    assert [r["step"] for r in read_jsonl(cut / "metrics.jsonl")] == [10, 20, 30, 40, 50, 60]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_OMNIGLOT, reason=f"real Omniglot archives not found in {OMNIGLOT_DIR}")
def test_short_run_on_real_omniglot(tmp_path):
    run = tmp_path / "run"
    run_cli(
        *FAST,
        "data=omniglot_small",
        f"data.root={OMNIGLOT_DIR}",
        "data.download=false",
        "trainer.steps=10",
        "trainer.val_every=10",
        "way=20",
        "eval.way=20",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    results = json.loads((run / "results.json").read_text())
    assert results["data"] == "omniglot_small" and results["way"] == 20
    assert results["test_acc"] > 0.1  # chance is 0.05; ten steps on conv features is well above it
