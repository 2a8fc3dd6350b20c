"""Multirun sweeps: the summary table, and a failed job that does not stop the others."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import FAST, run_cli

from metarun.runners.sweep import job_rows, write_summary

QUICK = [*FAST, "trainer.steps=10", "trainer.val_every=10", "eval.episodes=20"]


def test_multirun_summary_lists_every_job_and_a_failed_job_does_not_stop_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *QUICK, "way=3,0,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 of 3 jobs failed (jobs 1)" in proc.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "way=0" in rows[1]["overrides"] and "way" in rows[1]["error"]
    for r, job in ((rows[0], "0"), (rows[2], "2")):  # the table holds what results.json says
        results = json.loads((sweep / job / "results.json").read_text())
        assert float(r["test"]) == results["test_acc"] and float(r["ci95"]) == results["ci95"]
        assert int(r["steps"]) == results["steps"] == 10
    assert json.loads((sweep / "2" / "results.json").read_text())["way"] == 4
    md = (sweep / "summary.md").read_text().splitlines()
    assert md[0].startswith("| job | overrides | test (95% CI)") and len(md) == 5
    assert "failed:" in md[3] and "%" in md[2] and "`way=0`" in md[3]  # swept keys only
    assert "metarun sweep" in proc.stdout and "failed" in proc.stdout  # the printed table


def test_summary_reads_regression_results_and_jobs_without_results(tmp_path):
    for job, files in {
        "0": {"results.json": json.dumps({"test_mse": 0.25, "ci95": 0.02, "steps": 5})},
        "1": {},
    }.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        for name, text in files.items():
            (tmp_path / job / name).write_text(text)
    rows = job_rows(tmp_path)
    assert [(r["overrides"], r["status"], r["metric"]) for r in rows] == [
        (["seed=0"], "ok", "mse"),
        (["seed=1"], "no result", ""),
    ]
    _, md = write_summary(tmp_path, rows)
    assert "MSE 0.2500 ± 0.0200" in md.read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ["hydra/launcher=local_gpu", "hydra.launcher.gpus_per_node=0"],  # submitit_local
    ],
    ids=["joblib", "submitit_local"],
)
def test_sweep_runs_with_the_parallel_launchers(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    run_cli("-m", *launcher, *QUICK, "way=3,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["status"], r["overrides"].split()[-1]) for r in rows] == [
        ("ok", "way=3"),
        ("ok", "way=4"),
    ]
    for job, way in (("0", 3), ("1", 4)):
        assert json.loads((sweep / job / "results.json").read_text())["way"] == way


def test_slurm_preset_composes_with_one_gpu_per_job(tmp_path):
    proc = run_cli(
        "hydra/launcher=slurm_gpu", "--cfg", "hydra", "-p", "hydra.launcher", cwd=tmp_path
    )
    launcher = yaml.safe_load(proc.stdout)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"]) == (1, 1)
    assert launcher["timeout_min"] == 1440


@pytest.mark.slow
def test_optuna_sweep_maximizes_validation_accuracy_returned_by_each_job(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "-m",
        "hparams_search=maml_optuna",
        "hydra.sweeper.n_trials=2",
        *QUICK,
        "trainer.steps=4",
        "trainer.val_every=4",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    found = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    vals = [json.loads((sweep / j / "results.json").read_text()) for j in ("0", "1")]
    assert all(v["algo"] == "maml" for v in vals)
    assert found["best_value"] == max(v["best_val_acc"] for v in vals)  # validation, not test
    assert set(found["best_params"]) == {"algo.inner_lr", "algo.inner_steps", "trainer.lr"}
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_an_optuna_study_persists_and_a_second_search_adds_to_it(tmp_path):
    """A search of 2 trials, then 2 more in the same study (its SQLite file in the first
    sweep's folder); the second sweep's report shows all 4 and the importance figure."""
    import optuna

    search = ["-m", "hparams_search=maml_optuna", "hydra.sweeper.n_trials=2", *QUICK]
    search += ["trainer.steps=2", "trainer.val_every=2", "trainer.val_episodes=4"]
    first, second = tmp_path / "first", tmp_path / "second"
    run_cli(*search, f"hydra.sweep.dir={first}", cwd=tmp_path)
    storage = f"sqlite:///{first / 'optuna.db'}"
    assert len(optuna.load_study(study_name="maml", storage=storage).trials) == 2
    run_cli(*search, f"hydra.sweep.dir={second}", f"hydra.sweeper.storage={storage}", cwd=tmp_path)
    study = optuna.load_study(study_name="maml", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    values = [
        json.loads((d / j / "results.json").read_text())["best_val_acc"]
        for d in (first, second)
        for j in "01"
    ]
    assert sorted(t.value for t in study.trials) == sorted(values)
    md = (second / "report.md").read_text()
    assert "Optuna study 'maml': 4 trials" in md
    for name in ("optuna_history", "optuna_importance"):
        assert (second / f"{name}.png").stat().st_size > 1000 and f"({name}.png)" in md
