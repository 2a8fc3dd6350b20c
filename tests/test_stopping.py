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
from conftest import compose_with, read_jsonl, run_cli
from wandb_records import item_key, read_wandb_records

from metarun.errors import StoppedError
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


@pytest.mark.slow
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
    image = [h for h in history if any(item_key(i).startswith("train/episode") for i in h.item)]
    assert len(image) == 1  # step 0: the first training episode, once
    assert [
        int(next(i.value_json for i in h.item if item_key(i) == "_step"))
        for h in history
        if h not in image
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- a second signal: stop at once, losing at most the step in progress ---------------------

HARD = [
    "logger=none",
    "query=2",
    "trainer.steps=6",
    "trainer.meta_batch=2",
    "trainer.val_every=2",
    "trainer.val_episodes=4",
    "trainer.log_every=1",
    "eval.episodes=4",
    "device=cpu",
]


def two_signals() -> None:
    """Ctrl-C twice, delivered to this process where it stands."""
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)


class TwoSignalsInStep(Trainer):
    """Both signals arrive inside step 4: before its update, inside it, or during the
    validation after it (`where`)."""

    where = "before the update"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        step = self.learner.meta_train_step

        def stepped(episodes):
            if self.step == 3 and self.where == "before the update":
                two_signals()
            return step(episodes)

        self.learner.meta_train_step = stepped
        if self.where == "inside the update":
            self.learner.optimizer.register_step_post_hook(  # the weights just changed
                lambda *a: two_signals() if self.step == 3 else None
            )
        if self.where == "during validation":
            predict = self.learner.predict

            def predicting(*args, **kwargs):
                if self.step == 4 and not self.learner.training:
                    two_signals()
                return predict(*args, **kwargs)

            self.learner.predict = predicting


@pytest.mark.parametrize(
    ("where", "saved_step", "pending"),
    [
        ("before the update", 3, False),
        ("inside the update", 4, True),
        ("during validation", 4, True),
    ],
)
def test_a_second_signal_stops_at_once_and_the_run_resumes_exactly(
    tmp_path, where, saved_step, pending
):
    """Wherever the second Ctrl-C lands, last.pt is a whole step (the one in progress dropped,
    or kept with its bookkeeping still to do) and the resumed run ends with the weights,
    metrics and results of a run that was never interrupted."""
    cpu = torch.device("cpu")
    whole = Trainer(compose_with(*HARD), tmp_path / "whole", cpu)
    whole_results = whole.fit()
    TwoSignalsInStep.where = where
    with pytest.raises(StoppedError, match=r"stopped at once by a second signal \(SIGINT\)") as err:
        TwoSignalsInStep(compose_with(*HARD), tmp_path / "part", cpu).fit()
    assert err.value.exit_code == 130
    state = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["step"], state["pending"]) == (saved_step, pending)
    resumed = Trainer(compose_with(*HARD), tmp_path / "part", cpu)
    results = resumed.fit(resume_from=tmp_path / "part" / "checkpoints" / "last.pt")
    a, b = whole.learner.state_dict(), resumed.learner.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def rows(run):
        return [
            {k: v for k, v in r.items() if k != "seconds"}
            for r in read_jsonl(run / "metrics.jsonl")
        ]

    assert rows(tmp_path / "part") == rows(tmp_path / "whole")
    drop = ("seconds",)
    assert {k: v for k, v in results.items() if k not in drop} == {
        k: v for k, v in whole_results.items() if k not in drop
    }


def test_a_stopped_runs_temporary_checkpoint_files_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    Trainer(compose_with(*HARD, "trainer.steps=2"), run, torch.device("cpu")).fit()
    stale = run / "checkpoints" / ".tmp-last.pt.tmp999999"  # a writer killed mid-write
    stale.write_bytes(b"partial")
    again = Trainer(compose_with(*HARD, "trainer.steps=4"), run, torch.device("cpu"))
    again.fit(resume_from=run / "checkpoints" / "last.pt")
    assert not stale.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_non_finite_weights_never_reach_a_checkpoint(tmp_path):
    """An update that makes the weights inf (finite gradients, nan_policy=off): the run
    stops with status 3 and last.pt keeps the last step whose weights were finite."""
    run = tmp_path / "run"
    trainer = Trainer(
        compose_with(*HARD, "trainer.nan_policy=off", "trainer.ckpt_every=1"),
        run,
        torch.device("cpu"),
    )

    def blow_up(optimizer, args, kwargs):
        if trainer.step == 3:
            with torch.no_grad():
                next(trainer.learner.parameters()).fill_(float("inf"))

    trainer.learner.optimizer.register_step_post_hook(blow_up)
    with pytest.raises(StoppedError, match="NaN or inf by step 4.*still holds step 3") as err:
        trainer.fit()
    assert err.value.exit_code == 3
    for name in ("last.pt", "best.pt"):
        state = torch.load(run / "checkpoints" / name, weights_only=True)
        assert all(
            torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
        )
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


@pytest.mark.slow
def test_sigterm_during_the_final_test_stops_cleanly_and_the_command_finishes_it(tmp_path):
    """Training is over when the test starts: a signal there stops at once with status 143,
    a message (no traceback) and the command that runs the test; that command does not
    train again."""
    run = tmp_path / "run"
    args = [
        *STEPS,
        "trainer.steps=4",
        "trainer.val_every=2",
        "eval.episodes=1000",
        "eval.batch=1",
    ]
    proc = start(*args, f"hydra.run.dir={run}", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while (
        not (run / "checkpoints" / "last.pt").exists()
        or torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] < 4
    ):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # inside the test's 1000 forward passes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM during the final test: training is complete" in err
    assert "Traceback" not in err and not (run / "results.json").exists()
    assert "interrupted by SIGTERM during the final test" in (run / "metarun.log").read_text()
    command = shlex.split(err.split("Run the test with:")[1].strip().splitlines()[0])
    done = run_cli(*command[1:], "eval.batch=100", cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 4 and results["episodes"] == 1000
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2, 4]  # none twice


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_starting_ends_with_its_status_and_a_message(tmp_path, sig):
    proc = start(*STEPS, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    time.sleep(0.8)  # importing torch, composing the config or building the data
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err


def test_the_first_signal_while_training_is_noticed_on_the_terminal_not_through_logging(
    capfd, monkeypatch
):
    """A signal handler that logs can interrupt a write to the same stream, and the buffered
    stream refuses the reentrant write ("--- Logging error ---"); the notice goes to fd 2."""
    import logging

    from metarun.runners.stopping import StopSignals

    def no_logging(*args, **kwargs):
        raise AssertionError("the signal handler logged")

    monkeypatch.setattr(logging.Logger, "warning", no_logging)
    stop = StopSignals()
    with stop.training():
        stop.handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT
    assert "received SIGINT: writing a checkpoint after this step" in capfd.readouterr().err
