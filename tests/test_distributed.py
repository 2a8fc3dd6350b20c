"""Several processes (torchrun, gloo on the CPU): the run equals one process with the same
total meta-batch, and rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_with, read_jsonl, run_cli

from metarun.runners.build import learners_that
from metarun.runners.trainer import Trainer

# regression tasks on the paper's 2x40 network: no batch norm, so a task's gradient does
# not depend on which other tasks share its process, and no parameter has a zero gradient
# (Adam would turn the rounding noise of a zero gradient into lr-sized steps)
SINUSOID = [
    "data=sinusoid",
    "backbone=mlp",
    "logger=none",
    "shot=5",
    "query=5",
    "trainer.meta_batch=4",
    "trainer.val_every=3",
    "trainer.val_episodes=10",
    "eval.episodes=10",
    "device=cpu",
]
# the learners that can fit sinusoids, from the registry (their classes' supports_regression),
# with optional settings for a short stable run (a learner without an entry: its defaults)
LEARNERS = learners_that("supports_regression")
SETTINGS = {
    "maml": ["algo.inner_lr=0.01"],
    "fomaml": ["algo.inner_lr=0.01"],
    "metasgd": ["algo.inner_lr=0.01"],
    "anil": ["algo.inner_lr=0.01"],
    "reptile": ["algo.inner_lr=0.02", "algo.inner_optimizer=sgd"],
    "imaml": ["algo.inner_lr=0.01", "algo.inner_steps=5", "algo.cg_steps=3"],
}


def torchrun(*overrides: str, cwd: Path, nproc: int = 2, check: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "metarun",
            *overrides,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_process(overrides: list[str], run: Path) -> None:
    """The reference: the same config trained in this process (as `metarun` would)."""
    Trainer(compose_with(*overrides), run, torch.device("cpu")).fit()


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def metrics(run: Path) -> list[dict]:
    return read_jsonl(run / "metrics.jsonl")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_two_processes_equal_one_with_the_same_total_meta_batch(tmp_path, name):
    args = [*SINUSOID, f"algo={name}", *SETTINGS.get(name, []), "trainer.steps=6"]
    args.append("trainer.log_every=3")
    one_process(args, tmp_path / "one")
    torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    # tasks split 2 + 2 and gradients (Reptile's and iMAML's update directions) averaged
    assert_same_weights(weights(one), weights(two))
    # rank 0 alone wrote: one line per logged step, the loss averaged over all 4 tasks
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == [3, 6]
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["val_mse"] == pytest.approx(r1["val_mse"], rel=1e-5)
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    # the test fine-tunes every test task afresh (Reptile: 50 SGD steps), which amplifies
    # the weights' rounding-level differences (the all-reduce's summation order): the order
    # of the images inside one full-batch inner step alone moved Reptile's test MSE by
    # 3e-5 relative, so 1e-4 separates rounding from a wrong split of the tasks
    assert r2["test_mse"] == pytest.approx(r1["test_mse"], rel=1e-4)
    assert r2["episodes"] == r1["episodes"] == 10


@pytest.mark.slow
def test_a_two_process_run_resumes_from_its_checkpoint_like_one_process(tmp_path):
    args = [*SINUSOID, "algo=maml", *SETTINGS["maml"], "trainer.log_every=3"]
    one_process([*args, "trainer.steps=6"], tmp_path / "one")
    torchrun(*args, "trainer.steps=3", f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    # every rank continues from rank 0's checkpoint, in rank 0's run directory
    torchrun(
        *args,
        "trainer.steps=6",
        f"resume={tmp_path / 'two'}",
        f"hydra.run.dir={tmp_path / 'elsewhere'}",
        cwd=tmp_path,
    )
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert [r["step"] for r in metrics(tmp_path / "two")] == [3, 6]
    assert not (tmp_path / "elsewhere" / "checkpoints").exists()


def test_other_ranks_leave_no_files(tmp_path):
    run = tmp_path / "run"
    torchrun(
        "logger=none",
        "query=5",
        "trainer.steps=4",
        "trainer.meta_batch=4",
        "trainer.val_every=2",
        "trainer.val_episodes=10",
        "eval.episodes=10",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    # ProtoNet's batch norm sees each rank's tasks (DistributedDataParallel semantics); the
    # run finishes and rank 0's folder is the only one written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [r["step"] for r in metrics(run)] == [2, 4]
    assert json.loads((run / "results.json").read_text())["episodes"] == 10


@pytest.mark.slow
def test_settings_that_cannot_run_under_torchrun_fail_before_any_work(tmp_path):
    # torchrun's environment, one process: each check comes before the process group
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    bad = run_cli("logger=none", "trainer.meta_batch=3", cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 2
    assert "trainer.meta_batch=3 cannot be split evenly over 2 processes" in bad.stderr
    sweep = run_cli("-m", "logger=none", "shot=1,5", cwd=tmp_path, env=env, check=False)
    assert sweep.returncode == 2
    assert "a sweep (-m) cannot run under torchrun" in sweep.stderr
    test_mode = run_cli("mode=test", "ckpt=x.pt", cwd=tmp_path, env=env, check=False)
    assert test_mode.returncode == 2
    assert "mode=test runs in one process; run it without torchrun" in test_mode.stderr
    assert not list(tmp_path.glob("outputs/**/checkpoints"))
