"""wandb in offline mode: the run is written where we say, with what we logged."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest
from conftest import FAST, run_cli

BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks


def read_wandb_records(path: Path) -> list:
    """Decode the records of an offline run file (wandb ships the protobuf schema)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, records = path.read_bytes(), 7, b"", []  # 7-byte ':W&B' file header
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # FULL/FIRST start, MIDDLE/LAST extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


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
    assert [int(h["_step"]) for h in history] == [10, 20, 30, 40]
    assert "loss" in history[0] and "val_acc" in history[1]
    summary = {
        item_key(i): i.value_json
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    assert 0 < float(summary["test_acc"]) <= 1 and float(summary["ci95"]) > 0
    # the values wandb holds are the ones in metrics.jsonl and results.json
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == len(rows)
    for h, row in zip(history, rows):
        assert int(h["_step"]) == row["step"]
        assert {k: json.loads(h[k]) for k in row if k != "step"} == {
            k: v for k, v in row.items() if k != "step"
        }
    results = json.loads((run / "results.json").read_text())
    assert json.loads(summary["test_acc"]) == results["test_acc"]
    assert json.loads(summary["ci95"]) == results["ci95"]
    # logger.log_checkpoint=true: best.pt as a model artifact, with its digest
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
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
