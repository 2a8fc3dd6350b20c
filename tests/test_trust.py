"""Nothing lost, nothing mixed, nothing run that was not asked for: run folders of their
own, resume that refuses a changed computation, checkpoints that cannot run code, and OS
errors that name the path and the fix."""

from __future__ import annotations

import copy
import datetime
import errno
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_with, run_cli
from omegaconf import OmegaConf

from metarun.errors import CheckpointError, MetarunError
from metarun.runners import checkpoint, rundir
from metarun.runners.trainer import RESUME_MAY_CHANGE, Trainer, check_compatible, flatten

TINY = [
    "logger=none",
    "query=2",
    "trainer.steps=4",
    "trainer.meta_batch=2",
    "trainer.val_every=2",
    "trainer.val_episodes=4",
    "trainer.log_every=2",
    "eval.episodes=4",
    "device=cpu",
]


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def runs_under(root: Path) -> list[Path]:
    """Folders that a run took (they hold its marker)."""
    return sorted(p.parent for p in root.rglob(rundir.MARKER))


@pytest.fixture
def a_run(trained_run, tmp_path) -> Path:
    """A copy of a finished run, to be tampered with."""
    run = tmp_path / "old" / "run"
    shutil.copytree(trained_run, run)
    return run


# -- every run in a folder of its own -----------------------------------------------------


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """The default folder is named by the second; here the folders of the next 30 seconds
    already hold runs, as when other runs started in the same second: this run takes
    <time>-2 and leaves theirs alone."""
    out = tmp_path / "out"
    now = datetime.datetime.now()
    for s in range(30):
        t = now + datetime.timedelta(seconds=s)
        other = out / t.strftime("%Y-%m-%d") / t.strftime("%H-%M-%S")
        (other / ".hydra").mkdir(parents=True)
        (other / "results.json").write_text('{"other": true}')
    before = contents(out)
    run_cli(*TINY, f"paths.output_root={out}", cwd=tmp_path)
    (mine,) = [p for p in runs_under(out)]
    assert mine.name.endswith("-2") and mine.parent.parent == out
    assert json.loads((mine / "results.json").read_text())["steps"] == 4
    assert {k: v for k, v in contents(out).items() if k in before} == before


def claim_in_a_process(base: str) -> str:
    return str(rundir.claim_numbered(Path(base)))


def test_processes_racing_for_one_folder_name_each_get_their_own(tmp_path):
    base = str(tmp_path / "2026-01-01" / "12-00-00")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        taken = pool.map(claim_in_a_process, [base] * 8)
    assert len(set(taken)) == 8
    assert sorted(Path(p).name for p in taken) == sorted(
        ["12-00-00"] + [f"12-00-00-{n}" for n in range(2, 9)]
    )


def test_a_new_run_pointed_at_a_run_folder_is_refused_and_the_folder_is_untouched(a_run, tmp_path):
    before = contents(a_run)
    proc = run_cli(*TINY, f"hydra.run.dir={a_run}", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"hydra.run.dir={a_run} already holds a run" in proc.stderr
    assert "paths.if_exists=new" in proc.stderr and f"resume={a_run}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert contents(a_run) == before
    # asked for explicitly: a fresh numbered folder beside it
    run_cli(*TINY, f"hydra.run.dir={a_run}", "paths.if_exists=new", cwd=tmp_path)
    assert json.loads((a_run.with_name("run-2") / "results.json").read_text())["steps"] == 4
    assert contents(a_run) == before


def test_a_sweep_pointed_at_a_sweep_folder_is_refused_and_the_folder_is_untouched(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- shot=1\n")
    (sweep / "0" / "results.json").write_text('{"test_acc": 0.5}')
    before = contents(sweep)
    proc = run_cli("-m", *TINY, "shot=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"hydra.sweep.dir={sweep} already holds a run" in proc.stderr
    assert contents(sweep) == before


# -- resume ----------------------------------------------------------------------------------


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    return 1  # None


def test_resume_refuses_every_setting_outside_the_may_change_list():
    """Derived, not listed: each setting of a composed config, changed alone, is refused
    unless it is one of RESUME_MAY_CHANGE (where things go, how often, the device)."""
    cfg = compose_with("algo=maml", *TINY)
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        if key == "trainer.steps":
            continue  # may grow; checked below
        other = copy.deepcopy(cfg)
        OmegaConf.update(other, key, changed(value), force_add=True)
        if any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            check_compatible(other, cfg, "ckpt.pt", step=2)
        else:
            with pytest.raises(CheckpointError, match=f"{key}: checkpoint"):
                check_compatible(other, cfg, "ckpt.pt", step=2)


def test_a_resume_refusal_lists_every_difference_and_steps_may_only_grow():
    cfg = compose_with(*TINY)
    other = compose_with(*TINY, "trainer.schedule=cosine", "trainer.amp=bf16", "eval.seed=3")
    with pytest.raises(CheckpointError) as err:
        check_compatible(other, cfg, "ckpt.pt", step=2)
    for key in ("trainer.schedule", "trainer.amp", "eval.seed"):
        assert f"{key}: checkpoint" in str(err.value)
    check_compatible(compose_with(*TINY, "trainer.steps=10"), cfg, "ckpt.pt", step=2)
    with pytest.raises(CheckpointError, match="it is at step 3, past trainer.steps=2"):
        check_compatible(compose_with(*TINY, "trainer.steps=2"), cfg, "ckpt.pt", step=3)


@pytest.mark.slow
def test_a_refused_resume_keeps_the_checkpoints_and_results(a_run, tmp_path):
    before = contents(a_run)
    proc = run_cli(
        "logger=none",
        "query=5",
        "trainer.schedule=cosine",
        f"resume={a_run}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "trainer.schedule: checkpoint 'constant' vs now 'cosine'" in (
        proc.stderr
    ), proc.stderr
    # the attempt is recorded (its log lines, .hydra/resume-<time>/), nothing else changes
    assert {k: v for k, v in contents(a_run).items() if k in before and kept(k)} == {
        k: v for k, v in before.items() if kept(k)
    }


def kept(name: str) -> bool:
    return not name.endswith(".log") and name != rundir.MARKER


def test_a_resumed_run_writes_into_its_own_folder_log_included(tmp_path):
    out = tmp_path / "out"
    run_cli(*TINY, f"paths.output_root={out}", cwd=tmp_path)
    (run,) = runs_under(out)
    run_cli(*TINY, "trainer.steps=6", f"resume={run}", f"paths.output_root={out}", cwd=tmp_path)
    assert runs_under(out) == [run]  # no second run folder
    log = (run / "metarun.log").read_text()
    assert "resumed from" in log and "step 6" in log
    (resume_record,) = (run / ".hydra").glob("resume-*/overrides.yaml")
    assert f"resume={run}" in resume_record.read_text()
    assert "resume=" not in (run / ".hydra" / "overrides.yaml").read_text()  # the original
    assert json.loads((run / "results.json").read_text())["steps"] == 6


def test_resuming_a_run_that_is_still_running_is_refused(a_run, tmp_path):
    rundir.acquire(a_run)  # this process plays the run that is still going
    try:
        proc = run_cli("logger=none", "query=5", f"resume={a_run}", cwd=tmp_path, check=False)
    finally:
        rundir.release(a_run)
    assert proc.returncode == 2 and f"the run in {a_run} is still running" in proc.stderr


# -- checkpoints never run code --------------------------------------------------------------


class Payload:
    """What a malicious checkpoint carries: unpickling it makes a folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def poison(path: Path, marker: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, path)


@pytest.mark.slow
def test_a_checkpoint_built_to_run_code_runs_nothing_in_any_mode(a_run, tmp_path):
    marker = tmp_path / "PWNED"
    for name in ("last.pt", "best.pt"):
        poison(a_run / "checkpoints" / name, marker)
    overrides = yaml.safe_load((a_run / ".hydra" / "overrides.yaml").read_text())
    support, query = tmp_path / "support", tmp_path / "query"
    for attempt in (
        ["mode=test", f"ckpt={a_run / 'checkpoints' / 'best.pt'}"],
        ["mode=predict", f"ckpt={a_run}", f"support={support}", f"query={query}"],
        [*overrides, f"resume={a_run}"],
        [*overrides, "resume=auto", f"paths.output_root={a_run.parent}"],
    ):
        proc = run_cli(*attempt, cwd=tmp_path, check=False)
        assert proc.returncode == 2, (attempt, proc.stderr)
        assert "loading it could run code, so it was not loaded" in proc.stderr, proc.stderr
        assert "trust_checkpoint=true" in proc.stderr and "Traceback" not in proc.stderr
        assert not marker.exists(), attempt


def test_a_checkpoint_naming_foreign_callables_is_refused(a_run, tmp_path):
    path = a_run / "checkpoints" / "best.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["algo"]["_target_"] = "os.mkdir"  # plain data, but instantiate calls it
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"names callables that no metarun config uses \(os.mkdir\)"
    ):
        checkpoint.load(path)
    assert checkpoint.load(path, trust=True)["config"]["algo"]["_target_"] == "os.mkdir"


def test_trust_opts_in_and_old_checkpoints_with_numpy_rng_state_still_load(a_run):
    import fractions

    import numpy as np

    path = a_run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()  # how checkpoints stored it before
    torch.save(state, path)
    old = checkpoint.load(path)
    checkpoint.set_rng_state(old["rng"])
    state["note"] = fractions.Fraction(1, 3)  # harmless, but not plain data
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        checkpoint.load(path)
    assert checkpoint.load(path, trust=True)["note"] == fractions.Fraction(1, 3)


def test_new_checkpoints_hold_only_tensors_and_plain_data(trained_run):
    for name in ("last.pt", "best.pt"):
        torch.load(trained_run / "checkpoints" / name, weights_only=True)  # no allow-list


# -- file-system errors ----------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_write_says_what_is_kept_and_what_to_do(
    tmp_path, monkeypatch
):
    """torch's zip writer reports a full disk as a RuntimeError: caught like an OSError."""
    path = tmp_path / "run" / "checkpoints" / "last.pt"

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError) as err:
        checkpoint.save_atomic({"step": 1}, path)
    assert "there was no last.pt before" in str(err.value)
    assert "start the run again (it has no checkpoint to resume from yet)" in str(err.value)
    assert list(path.parent.iterdir()) == []
    monkeypatch.undo()
    checkpoint.save_atomic({"model": {}, "config": {}, "step": 1}, path)
    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(
        CheckpointError, match=f"previous last.pt is intact.*resume={path.parent.parent}"
    ):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1


def test_results_that_cannot_be_written_keep_the_checkpoints_and_say_how_to_test_again(
    tmp_path, monkeypatch
):
    from metarun.runners import files

    run = tmp_path / "run"
    trainer = Trainer(compose_with(*TINY), run, torch.device("cpu"))
    real = files.write_text_atomic

    def full(path, text, what="file"):
        if Path(path).name == "results.json":
            err = OSError(errno.ENOSPC, "No space left on device")
            raise files.os_error(err, f"could not write the {what} {path}")
        return real(path, text, what)

    monkeypatch.setattr("metarun.runners.results.write_text_atomic", full)
    with pytest.raises(MetarunError, match="the disk is full") as err:
        trainer.fit()
    assert f"metarun mode=test ckpt={run / 'checkpoints' / 'best.pt'}" in str(err.value)
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("where", ["paths.output_root={file}", "hydra.run.dir={file}/run"])
def test_a_file_where_the_run_folder_should_be_is_named_with_the_fix(tmp_path, where):
    file = tmp_path / "not-a-folder"
    file.write_text("a file")
    proc = run_cli(*TINY, where.format(file=file), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot create the run folder" in proc.stderr and str(file) in proc.stderr
    assert "a file" in proc.stderr and "paths.output_root=DIR" in proc.stderr


def test_no_permission_for_the_run_folder_is_named_with_the_fix(tmp_path, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(MetarunError) as err:
        rundir.claim(tmp_path / "out" / "run")
    message = str(err.value)
    assert "permission denied" in message and str(tmp_path / "out" / "run") in message
    assert "paths.output_root=DIR" in message
