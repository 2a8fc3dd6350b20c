"""wandb in offline mode: the run is written where we say, with what we logged."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
from pathlib import Path

import pytest
from conftest import FAST, run_cli
from wandb_records import item_key, read_wandb_records

from metarun.runners.logging import dashboard_key


@pytest.mark.slow
def test_offline_wandb_run_holds_config_metrics_and_test_accuracy(tmp_path):
    run = tmp_path / "run"
    run_cli(
        *FAST,
        "logger=wandb",
        "logger.mode=offline",
        "logger.project=metarun-test",
        "logger.log_checkpoint=true",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env={"WANDB_MODE": None, "WANDB_SILENT": "true"},
    )
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "exit" in kinds
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.project == "metarun-test"
    config = {item_key(i) for i in run_record.config.update}
    assert {"algo", "data", "trainer", "way", "shot"} <= config
    history = [
        {item_key(i): i.value_json for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert "train/episode/_type" in history[0]  # step 0: the first training episode's image
    history = history[1:]
    assert [int(h["_step"]) for h in history] == [10, 20, 30, 40]
    assert "train/loss" in history[0] and "val/acc" in history[1]
    summary = {
        item_key(i): i.value_json
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    assert 0 < float(summary["test/acc"]) <= 1 and float(summary["test/ci95"]) > 0
    # the values wandb holds are the ones in metrics.jsonl and results.json
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == len(rows)
    for h, row in zip(history, rows):
        assert int(h["_step"]) == row["step"]
        assert {k: json.loads(h[dashboard_key(k)]) for k in row if k != "step"} == {
            k: v for k, v in row.items() if k != "step"
        }
    results = json.loads((run / "results.json").read_text())
    assert json.loads(summary["test/acc"]) == results["test_acc"]
    assert json.loads(summary["test/ci95"]) == results["ci95"]
    # logger.log_checkpoint=true: best.pt as a model artifact, with its digest
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (artifact,) = [a for a in artifacts if a.type == "model"]  # (the table is one too)
    assert artifact.type == "model" and artifact.name == f"model-{run_record.run_id}"
    assert {"best", f"step-{results['best_step']}"} <= set(artifact.aliases)
    (entry,) = artifact.manifest.contents
    digest = base64.b64encode(hashlib.md5((run / "checkpoints/best.pt").read_bytes()).digest())
    assert entry.path == "best.pt" and entry.digest == digest.decode()
    assert json.loads(artifact.metadata)["test_acc"] == results["test_acc"]


@pytest.mark.slow
def test_a_sweeps_runs_share_a_group_and_carry_algo_data_shape_tags(tmp_path):
    sweep = tmp_path / "sweeps" / "s1"
    run_cli(
        "-m",
        *FAST,
        "trainer.steps=10",
        "trainer.val_every=10",
        "eval.episodes=20",
        "logger=wandb",
        "logger.mode=offline",
        "logger.tags=[mine]",
        "way=3,4",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"WANDB_MODE": None, "WANDB_SILENT": "true"},
    )
    runs = []
    for job in ("0", "1"):
        (run_file,) = (sweep / job).glob("wandb/offline-run-*/run-*.wandb")
        records = read_wandb_records(run_file)
        runs.append(next(r.run for r in records if r.WhichOneof("record_type") == "run"))
    assert [r.run_group for r in runs] == ["sweeps_s1", "sweeps_s1"]
    for run, way in zip(runs, (3, 4)):
        assert set(run.tags) == {"mine", "algo:protonet", "data:synthetic", f"{way}-way", "1-shot"}


def records_of(folder: Path) -> list:
    (run_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    return read_wandb_records(run_file)


def of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def summary_of(records) -> dict:
    return {
        item_key(i): json.loads(i.value_json) for s in of_type(records, "summary") for i in s.update
    }


def logged_keys(records) -> set:
    return {item_key(i) for h in of_type(records, "history") for i in h.item}


def test_a_sweep_makes_a_dashboard_train_test_and_summary_runs(tmp_path):
    """Readable names, job types, train/ val/ test/ metrics, the best validation score in
    the summary, a training episode's image, the per-episode table, a test run in the
    training run's group and one summary run for the sweep; read back from wandb's files."""
    sweep = tmp_path / "sweep"
    env = {"WANDB_MODE": None, "WANDB_SILENT": "true"}
    wandb_on = ["logger=wandb", "logger.mode=offline", "logger.project=dash"]
    run_cli(
        "-m",
        *FAST,
        *wandb_on,
        "seed=3",
        "way=3,4",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env=env,
    )
    group = f"{sweep.parent.name}_{sweep.name}"
    train_ids = []
    for job, way in (("0", 3), ("1", 4)):
        records = records_of(sweep / job)
        (run,) = of_type(records, "run")
        assert run.display_name == f"protonet-synthetic-{way}w1s-seed3" and run.job_type == "train"
        assert run.run_group == group
        config = {item_key(i): json.loads(i.value_json) for i in run.config.update}
        assert f"way={way}" in config["overrides"] and "seed=3" in config["overrides"]
        keys = logged_keys(records)
        assert {"train/loss", "train/acc", "train/lr", "val/acc", "val/ci95"} <= keys
        assert {"train/episode/_type", "test/episodes/_type"} <= keys  # the image, the table
        metrics = {m.name: m.summary for m in of_type(records, "metric")}
        assert metrics["val/acc"].max  # the dashboard's summary keeps the best, not the last
        results = json.loads((sweep / job / "results.json").read_text())
        summary = summary_of(records)
        assert summary["val/best_acc"] == results["best_val_acc"]
        assert summary["val/best_step"] == results["best_step"]
        assert (
            summary["test/acc"] == results["test_acc"] and summary["test/ci95"] == results["ci95"]
        )
        files = sweep / job / "wandb"
        (image,) = files.glob("offline-run-*/files/media/images/train/episode_*.png")
        from PIL import Image

        with Image.open(image) as grid:  # one row per class
            assert grid.height == way * 30 + 2
        (table,) = files.glob("offline-run-*/files/media/table/test/episodes_*.table.json")
        data = json.loads(table.read_text())
        scores = [
            float(line.split(",")[1])
            for line in (sweep / job / "test_episodes.csv").read_text().splitlines()[1:]
        ]
        assert data["columns"] == ["episode", "acc"] and [row[1] for row in data["data"]] == scores
        # the test's mistakes by class: every confused pair of test_confusions.csv
        (table,) = files.glob("offline-run-*/files/media/table/test/confusions_*.table.json")
        data = json.loads(table.read_text())
        with open(sweep / job / "test_confusions.csv") as f:
            pairs = [
                [r["true_class"], r["predicted_class"], int(r["count"])] for r in csv.DictReader(f)
            ]
        assert data["columns"] == ["true_class", "predicted_class", "count"]
        assert data["data"] == pairs and pairs
        train_ids.append(run.run_id)
    # the sweep's summary run: the table and the report's figures
    records = records_of(sweep)
    (run,) = of_type(records, "run")
    assert run.job_type == "summary" and run.run_group == group
    assert {"summary/_type", "report/curves/_type", "report/test/_type"} <= logged_keys(records)
    # mode=test at another shape: a `test` run in the training run's group, pointing at it
    test_dir = tmp_path / "test"
    ckpt = sweep / "0" / "checkpoints" / "best.pt"
    run_cli(
        "mode=test",
        f"ckpt={ckpt}",
        "shot=2",
        *wandb_on,
        f"hydra.run.dir={test_dir}",
        cwd=tmp_path,
        env=env,
    )
    records = records_of(test_dir)
    (run,) = of_type(records, "run")
    assert run.job_type == "test" and run.run_group == group
    assert run.display_name == "protonet-synthetic-3w2s-seed3-test"
    config = {item_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["train_run_id"] == train_ids[0]
    results = json.loads((test_dir / "results.json").read_text())
    assert summary_of(records)["test/acc"] == results["test_acc"] and results["shot"] == 2
    # one command lists (and would upload) every offline run of the sweep
    proc = run_cli("sync", str(sweep), "--dry-run", cwd=tmp_path)
    assert proc.stdout.count("offline-run-") == 3 and "3 offline runs" in proc.stdout
