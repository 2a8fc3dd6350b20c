"""Stopping on purpose: SIGTERM/SIGINT write a checkpoint and say how to resume; a NaN loss
stops with the last good weights saved (or is skipped); trainer.keep_last rotates files."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_config import compose_with
from test_wandb import item_key, read_wandb_records

from metarun.runners.trainer import Trainer

STEPS = [
    "logger=none",
    "query=5",
    "trainer.steps=60",
    "trainer.meta_batch=2",
    "trainer.val_every=30",
    "trainer.val_episodes=10",
    "trainer.log_every=5",
    "eval.episodes=20",
    "device=cpu",
]


def start(*overrides: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "metarun", *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_training(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run has logged its first metrics (so it is inside the training loop)."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started training"
        time.sleep(0.02)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["model"]


def test_sigterm_writes_a_checkpoint_and_the_printed_command_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    proc = start(*STEPS, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for_training(run, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM at step" in err and "Resume with:" in err
    step = int(err.split("interrupted by SIGTERM at step ")[1].split()[0])
    assert 5 <= step < 60, err  # stopped during training, not at its end
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert last["step"] == step
    assert not (run / "results.json").exists()
    # the printed command continues the run to the end, in its own folder
    command = err.split("Resume with:")[1].strip().splitlines()[0]
    words = shlex.split(command)
    assert words[0] == "metarun" and f"resume={run}" in words
    run_cli(*words[1:], cwd=tmp_path)
    assert json.loads((run / "results.json").read_text())["steps"] == 60
    # ... and ends with the weights of a run that was never interrupted
    whole = tmp_path / "whole"
    Trainer(compose_with(*STEPS), whole, torch.device("cpu")).fit()  # the same config, here
    a, b = weights(run / "checkpoints" / "last.pt"), weights(whole / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice


def test_ctrl_c_stops_with_status_130_keeps_the_checkpoint_and_closes_wandb(tmp_path):
    run = tmp_path / "run"
    proc = start(
        *STEPS,
        "trainer.steps=100000",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if k != "WANDB_MODE"}, "WANDB_SILENT": "true"},
    )
    wait_for_training(run, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    step = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert step >= 5
    # wandb was flushed and closed: its offline file ends the run and holds the logged steps
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    assert "exit" in [r.WhichOneof("record_type") for r in records]
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert [
        int(next(i.value_json for i in h.item if item_key(i) == "_step")) for h in history
    ] == logged


# MAML on sinusoids with an absurd outer learning rate: after one Adam step of 1e10 the
# network's outputs overflow
DIVERGING = [
    "algo=maml",
    "data=sinusoid",
    "backbone=mlp",
    "algo.inner_lr=0.01",
    "trainer.lr=1e10",
    "logger=none",
    "shot=5",
    "query=5",
    "trainer.steps=30",
    "trainer.val_every=10",
    "trainer.val_episodes=10",
    "trainer.log_every=1",
    "trainer.ckpt_every=1",
    "eval.episodes=10",
    "device=cpu",
]


def test_a_nan_loss_stops_with_the_last_good_weights_saved(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(*DIVERGING, f"hydra.run.dir={run}", cwd=tmp_path, check=False)
    assert proc.returncode == 3, proc.stderr
    err = proc.stderr
    assert "non-finite" in err and "training stopped" in err, err
    assert "trainer.lr=10000000000.0" in err and "algo.inner_lr=0.01" in err  # likely causes
    bad = int(err.split(" at step ")[1].split(":")[0])
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == bad - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_policy_skip_skips_bad_updates_and_finishes(tmp_path):
    run = tmp_path / "run"
    run_cli(*DIVERGING, "trainer.nan_policy=skip", f"hydra.run.dir={run}", cwd=tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and rows[-1]["skipped_updates"] > 0
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # every validation score was NaN, so there is no best.pt: the test scores last.pt
    assert not (run / "checkpoints" / "best.pt").exists()
    assert json.loads((run / "results.json").read_text())["best_step"] is None


def test_keep_last_keeps_the_newest_step_files_and_last_pt_is_the_newest(tmp_path):
    run = tmp_path / "run"
    run_cli(
        *STEPS,
        "trainer.steps=20",
        "trainer.ckpt_every=5",
        "trainer.keep_last=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*.pt")) == [
        "step-00000015.pt",
        "step-00000020.pt",
    ]
    assert os.path.samefile(ckpts / "last.pt", ckpts / "step-00000020.pt")
    assert torch.load(ckpts / "last.pt", weights_only=False)["step"] == 20


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.nan_policy=ignore", "trainer.nan_policy='ignore'; choose stop, skip, off"),
        ("trainer.keep_last=0", "trainer.keep_last must be a positive integer"),
    ],
)
def test_bad_stopping_settings_are_refused(tmp_path, override, message):
    proc = run_cli(*STEPS, override, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_requeued_submitit_job_continues_from_its_own_checkpoint(tmp_path):
    """submitit restarts a pre-empted job with the same overrides in the same folder; there
    metarun resumes from that folder's last.pt without resume= (only under submitit)."""
    run = tmp_path / "run"
    proc = start(*STEPS, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for_training(run, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped_at = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"]
    again = run_cli(
        *STEPS, f"hydra.run.dir={run}", cwd=tmp_path, env={"SUBMITIT_EXECUTOR": "slurm"}
    )
    assert "requeued job (submitit): continuing from" in again.stderr + again.stdout
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step {stopped_at}" in (
        again.stderr + again.stdout
    )
    assert json.loads((run / "results.json").read_text())["steps"] == 60
