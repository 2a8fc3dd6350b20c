"""mode=continual end to end on the synthetic glyphs: the files it writes, EWC against plain
fine-tuning, exact continuation from a task checkpoint, and settings that cannot work."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONTINUAL, NEEDS, compose_with, run_cli
from wandb_records import item_key, read_wandb_records

from metarun.errors import CheckpointError, ConfigError
from metarun.runners.continual import ContinualRun
from metarun.runners.validate import validate

SMALL = [
    "mode=continual",
    "continual.tasks=3",
    "continual.classes_per_task=5",
    "continual.epochs=20",
    "logger=none",
    "device=cpu",
]


@pytest.mark.slow
def test_cli_writes_the_accuracy_matrix_and_ewc_forgets_less_than_fine_tuning(tmp_path):
    results = {}
    for algo in ("finetune", "ewc"):
        run_cli(*SMALL, f"algo={algo}", "backbone.hidden=16", f"hydra.run.dir={algo}", cwd=tmp_path)
        run = tmp_path / algo
        results[algo] = json.loads((run / "results.json").read_text())
        lines = (run / "continual.csv").read_text().splitlines()
        assert lines[0] == "after_task,task_0,task_1,task_2" and len(lines) == 5
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
        assert {p.name for p in (run / "checkpoints").iterdir()} == {
            "last.pt",
            "task-0.pt",
            "task-1.pt",
            "task-2.pt",
        }
    ft, ewc = results["finetune"], results["ewc"]
    assert ft["algo"] == "finetune" and ft["scenario"] == "task" and len(ft["R"]) == 3
    assert all(0 <= a <= 1 for row in ft["R"] for a in row)
    # each task is learned (chance is 20%), then fine-tuning forgets what EWC keeps: measured
    # at seed 0 on torch 2.13 and 2.14, fine-tuning -22 points, EWC -4
    assert all(ft["R"][t][t] > 0.8 for t in range(3))
    assert ft["backward_transfer"] < -0.1
    assert ewc["backward_transfer"] > ft["backward_transfer"] + 0.08


def test_a_run_continued_from_a_task_checkpoint_ends_as_the_uninterrupted_one(tmp_path):
    cfg = compose_with(*SMALL, "algo=ewc", "continual.epochs=2", "backbone.hidden=8")
    whole = ContinualRun(cfg, tmp_path / "whole", torch.device("cpu")).run()
    again = ContinualRun(cfg, tmp_path / "again", torch.device("cpu"))
    continued = again.run(tmp_path / "whole" / "checkpoints" / "task-0.pt")
    assert continued["R"] == whole["R"] and continued["initial"] == whole["initial"]
    with pytest.raises(CheckpointError, match="continual.epochs: checkpoint 2 vs now 3"):
        other = compose_with(*SMALL, "algo=ewc", "continual.epochs=3", "backbone.hidden=8")
        ContinualRun(other, tmp_path / "x", torch.device("cpu")).run(
            tmp_path / "whole" / "checkpoints" / "task-0.pt"
        )


def test_cli_run_writes_its_files(tmp_path):
    run_cli(
        *SMALL,
        "algo=joint",
        "backbone.hidden=16",
        "continual.epochs=1",
        "continual.tasks=2",
        "hydra.run.dir=j",
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "j" / "results.json").read_text())
    # joint training happens once, after the last task: R's last row alone, no transfer
    assert result["R"][0] == [None, None] and None not in result["R"][1]
    assert result["backward_transfer"] is None and result["algo"] == "joint"
    assert (tmp_path / "j" / "continual.csv").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mode=continual", "algo=protonet"], "mode=continual needs a continual learner"),
        (["algo=ewc"], "is a continual learner: run it with mode=continual"),
        (["mode=continual", "algo=ewc", "algo.lam=-1"], "algo.lam must be at least 0"),
        (["mode=continual", "algo=ewc", "continual.test_fraction=1"], "continual.test_fraction"),
        (["mode=continual", "algo=ewc", "continual.scenario=online"], "continual.scenario"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_with(*overrides))


def test_more_tasks_than_classes_is_refused_with_the_fix(tmp_path):
    cfg = compose_with(*SMALL, "algo=finetune", "continual.tasks=50")
    with pytest.raises(ConfigError, match="50 tasks of 5 classes need 250"):
        ContinualRun(cfg, tmp_path, torch.device("cpu"))


def test_a_sweep_tabulates_average_accuracy_and_backward_transfer(tmp_path):
    proc = run_cli(
        "-m",
        *SMALL,
        "algo=finetune,ewc",
        "continual.tasks=2",
        "continual.epochs=1",
        "backbone.hidden=8",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    table = (tmp_path / "sweep" / "summary.md").read_text().splitlines()
    assert "backward transfer" in table[0]
    assert any("algo=finetune" in line and "ok" in line for line in table[2:])
    assert "report: sweep/report.html" in proc.stdout


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b) -> bool:
    """Equal to the bit, through the nested dicts and lists of an extra state."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_weights(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_weights(x, y) for x, y in zip(a, b))
    return a == b


def small_network(algo: str) -> str:
    """A few units, for the network the learner's yaml chooses."""
    cfg = compose_with(*NEEDS[("algo", algo)], f"algo={algo}")
    return "backbone.hidden=8" if "hidden" in cfg.backbone else "algo.hidden=[16,8]"


@pytest.mark.parametrize("algo", CONTINUAL)
def test_a_run_continued_from_inside_a_task_ends_bit_identically(tmp_path, algo):
    cfg = compose_with(
        *SMALL,
        *NEEDS[("algo", algo)],
        f"algo={algo}",
        "continual.epochs=3",
        small_network(algo),
        "continual.ckpt_every=2",
    )
    whole = ContinualRun(cfg, tmp_path / "whole", torch.device("cpu"))
    keep = whole.save

    def save_and_keep(*names):  # a copy of the last checkpoint written inside task 2
        path = keep(*names)
        c = whole.cursor
        if whole.next_task == 2 and c is not None and c.phase is not None and c.count:
            shutil.copy(path, tmp_path / "inside.pt")
        return path

    whole.save = save_and_keep
    done = whole.run()
    state = torch.load(tmp_path / "inside.pt", weights_only=True)
    assert state["next_task"] == 2 and state["cursor"]["count"] > 0
    assert state["optimizer"] is not None  # the phase's optimizer moments travel too
    if algo == "den":  # the grown layers, their timestamps and the task's masks travel
        model = state["model"]
        assert model["weights.0"].shape[0] == len(model["stamp0"]) > 16
        assert model["stamp0"].max() >= 1 and model["_extra_state"]["trainable"]
    again = ContinualRun(cfg, tmp_path / "again", torch.device("cpu"))
    continued = again.run(tmp_path / "inside.pt")
    assert continued["R"] == done["R"] and continued["initial"] == done["initial"]
    ends = [weights(tmp_path / d / "checkpoints" / "last.pt") for d in ("whole", "again")]
    assert same_weights(*ends)


def start(*overrides, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "metarun", *overrides],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_inside_task(run, proc, task: int, timeout: float = 120) -> None:
    """Until last.pt holds the run in the middle of `task` (a checkpoint inside it)."""
    deadline = time.monotonic() + timeout
    last = run / "checkpoints" / "last.pt"
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the task"
        if last.exists():
            state = torch.load(last, weights_only=True)
            if state["next_task"] == task and state["cursor"] is not None:
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_and_kill_9_inside_a_task_resume_bit_identically(tmp_path):
    steps = [
        *SMALL,
        "algo=ewc",
        "continual.epochs=8",
        "backbone.hidden=8",
        "continual.ckpt_every=3",
    ]
    run_cli(*steps, "hydra.run.dir=whole", cwd=tmp_path)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())

    # SIGTERM: the update in progress ends, last.pt is written, the printed command resumes
    run = tmp_path / "term"
    proc = start(*steps, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_until_inside_task(run, proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM at task 2 of 3, phase train, epoch" in err, err
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["next_task"] == 1 and state["cursor"] is not None
    assert len(state["model"]["_extra_state"]["fishers"]) == 1  # task 0's Fisher and anchor
    assert not (run / "results.json").exists()
    command = shlex.split(err.split("Resume with:")[1].strip().splitlines()[0])
    assert command[0] == "metarun" and f"resume={run}" in command
    run_cli(*command[1:], cwd=tmp_path)

    # kill -9: nothing is written at the kill; the run goes on from its last checkpoint
    killed = tmp_path / "killed"
    proc = start(*steps, f"hydra.run.dir={killed}", cwd=tmp_path)
    wait_until_inside_task(killed, proc, 2)
    proc.kill()
    proc.communicate(timeout=60)
    run_cli(*steps, f"resume={killed}", cwd=tmp_path)

    for folder in (run, killed):
        result = json.loads((folder / "results.json").read_text())
        assert result["R"] == whole["R"] and result["initial"] == whole["initial"]
        ends = [weights(d / "checkpoints" / "last.pt") for d in (tmp_path / "whole", folder)]
        assert same_weights(*ends)


@pytest.mark.slow
def test_the_dashboard_gets_the_accuracy_matrix_and_the_figures(tmp_path):
    run = tmp_path / "run"
    run_cli(
        *SMALL,
        "algo=ewc",
        "backbone.hidden=8",
        "continual.epochs=1",
        "continual.tasks=2",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env={"WANDB_MODE": None, "WANDB_SILENT": "true"},
    )
    results = json.loads((run / "results.json").read_text())
    (table,) = run.glob("wandb/offline-run-*/files/media/table/continual/R_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == ["after_task", "task_0", "task_1"]
    assert data["data"] == [
        [-1, *results["initial"]],
        *([t, *r] for t, r in enumerate(results["R"])),
    ]
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    summary = {
        item_key(i): json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    for key in ("average_accuracy", "backward_transfer", "forward_transfer"):
        assert summary[f"continual/{key}"] == results[key]
