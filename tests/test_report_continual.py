"""`metarun report` on mode=continual runs: the groups' figures with t intervals over seeds,
the accuracy matrices and the accuracy curve, null figures, and a mix with meta-learning runs
refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from metarun.errors import ConfigError
from metarun.runners.report import collect, seed_mean, write_report

T2 = 12.706205  # t(0.975, 1), a t table
T3 = 4.302653  # t(0.975, 2)
LIGHTGREY = (211, 211, 211)  # matplotlib's "lightgrey": cells no seed measured


def continual_job(sweep: Path, job: str, overrides: list[str], **figures) -> None:
    """A finished mode=continual job folder as runners/continual.py writes it (3 tasks, the
    defaults' figures computed from their R); `figures` replace results.json's entries."""
    folder = sweep / job
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in ["mode=continual", *overrides])
    )
    results = {
        "mode": "continual",
        "algo": "ewc",
        "data": "synthetic",
        "scenario": "task",
        "tasks": 3,
        "average_accuracy": 0.8,
        "backward_transfer": -0.15,
        "forward_transfer": 0.0,
        "accuracy_curve": [0.9, 0.85, 0.8],
        "R": [[0.9, 0.2, 0.2], [0.8, 0.9, 0.2], [0.7, 0.8, 0.9]],
        "initial": [0.2, 0.2, 0.2],
        "seconds": 10.0,
        "sequence": [
            {
                "task": t,
                "classes": [5 * t + c for c in range(5)],
                "train_images": 60,
                "test_images": 20,
            }
            for t in range(3)
        ],
        **figures,
    }
    (folder / "results.json").write_text(json.dumps(results))
    curve = results["accuracy_curve"]
    rows = [{"step": t + 1, "loss": 1.0, "average_accuracy": a} for t, a in enumerate(curve)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


JOINT_R = [[None, None, None], [None, None, None], [0.9, 0.8, 0.85]]


def continual_sweep(tmp_path: Path) -> Path:
    """ewc: three seeds with known figures; finetune: two seeds, one without forward
    transfer; joint: two seeds, R's last row only, no transfer; one failed job."""
    sweep = tmp_path / "sweep"
    ewc = [(0.80, -0.10, 0.00, 10.0), (0.85, -0.20, 0.01, 20.0), (0.90, -0.15, 0.02, 30.0)]
    for seed, (acc, bwt, fwt, seconds) in enumerate(ewc):
        continual_job(
            sweep,
            str(seed),
            ["algo=ewc", f"seed={seed}"],
            average_accuracy=acc,
            backward_transfer=bwt,
            forward_transfer=fwt,
            seconds=seconds,
        )
    continual_job(sweep, "3", ["algo=finetune", "seed=0"], average_accuracy=0.5,
                  backward_transfer=-0.4, forward_transfer=0.02, seconds=4.0)  # fmt: skip
    continual_job(sweep, "4", ["algo=finetune", "seed=1"], average_accuracy=0.5,
                  backward_transfer=-0.4, forward_transfer=None, seconds=6.0)  # fmt: skip
    for job, (seed, acc) in enumerate([(0, 0.85), (1, 0.87)], start=5):
        continual_job(
            sweep,
            str(job),
            ["algo=joint", f"seed={seed}"],
            average_accuracy=acc,
            backward_transfer=None,
            forward_transfer=None,
            accuracy_curve=[None, None, acc],
            R=JOINT_R,
        )
    failed = sweep / "7"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- mode=continual\n- algo=ewc\n- seed=3\n")
    (failed / "error.txt").write_text("ConfigError: something")
    return sweep


def test_the_groups_table_matches_a_hand_computation(tmp_path):
    md = write_report([continual_sweep(tmp_path)])["md"].read_text()
    # ewc, n = 3: accuracy 0.80, 0.85, 0.90: mean 85.00, sd 5, half 4.302653 * 5 / sqrt(3)
    # = 12.42; backward -10, -20, -15: -15.00 ± 12.42; forward 0, 1, 2: +1.00, sd 1, ± 2.48
    half = T3 * 0.05 / math.sqrt(3)
    assert f"{100 * half:.2f}" == "12.42" and f"{100 * T3 * 0.01 / math.sqrt(3):.2f}" == "2.48"
    assert (
        "| algo=ewc | 3 (0, 1, 2) | 85.00% ± 12.42% | -15.00 ± 12.42 pp | +1.00 ± 2.48 pp | 20 s |"
        in md
    )
    # finetune: both seeds alike (a zero-width interval); forward transfer from one seed only
    assert (
        "| algo=finetune | 2 (0, 1) | 50.00% ± 0.00% | -40.00 ± 0.00 pp | +2.00 pp (n=1) | 5 s |"
        in md
    )
    # joint: accuracy 85, 87: mean 86, sd sqrt(2), half 12.706205 * sqrt(2) / sqrt(2) = 12.71
    assert "| algo=joint | 2 (0, 1) | 86.00% ± 12.71% | n/a | n/a | 10 s |" in md
    # each job's own figures, and the failed job without any
    assert "| 1 | algo=ewc seed=1 | task | 3 | 85.00% | -20.00 pp | +1.00 pp | 20 s | ok |" in md
    assert "| 4 | algo=finetune seed=1 | task | 3 | 50.00% | -40.00 pp | n/a | 6 s | ok |" in md
    assert "| 7 | algo=ewc seed=3 |  |  | - | - | - |  | failed: ConfigError: something |" in md
    assert "t(0.975, n−1)·sd/√n" in md


def test_the_mean_matrix_and_its_band_leave_unmeasured_cells_out():
    stack = np.array([[1.0, np.nan, np.nan], [0.5, 0.3, np.nan]])
    mean, half = seed_mean(stack)
    assert mean[:2] == pytest.approx([0.75, 0.3]) and np.isnan(mean[2])
    # sd of (1, 0.5) = 0.353553; 12.706205 * 0.353553 / sqrt(2) = 3.176551
    assert half[0] == pytest.approx(3.176551, abs=1e-5) and np.isnan(half[1:]).all()


def grey_pixels(path: Path) -> int:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    return int((pixels == LIGHTGREY).all(axis=1).sum())


def test_heat_maps_and_the_curve_are_images_in_the_markdown_and_the_html(tmp_path):
    sweep = continual_sweep(tmp_path)
    written = write_report([sweep])
    names = ["accuracy", "matrix_1", "matrix_2", "matrix_3"]  # one matrix per group
    for name in names:
        with Image.open(written[name]) as image:  # a PNG that decodes
            image.load()
            assert image.format == "PNG" and image.width > 100
    # joint measured R's last row only: its first two rows are grey; ewc's R is full
    assert grey_pixels(written["matrix_3"]) > 20 * grey_pixels(written["matrix_1"]) + 1000
    md, page = written["md"].read_text(), written["html"].read_text()
    assert "![Accuracy matrix R: algo=joint](matrix_3.png)" in md
    assert "![Average accuracy over the sequence](accuracy.png)" in md
    assert page.count("data:image/png;base64,") == len(names)
    assert "n/a" in page and "86.00% ± 12.71%" in page
    # nothing from the meta-learning report: no episodes to pair
    assert "Paired comparisons" not in md and not (sweep / "paired.png").exists()


def meta_job(sweep: Path, job: str) -> None:
    folder = sweep / job
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- algo=protonet\n")
    (folder / "results.json").write_text(json.dumps({"test_acc": 0.9, "ci95": 0.01}))


def test_continual_and_meta_learning_runs_together_are_refused_with_the_fix(tmp_path):
    sweep = continual_sweep(tmp_path)
    meta_job(tmp_path / "meta", "0")
    named = r"mix mode=continual runs \(sweep/0, sweep/1, sweep/2, \.\.\.\) with meta-learning runs \(meta/0\)"
    with pytest.raises(ConfigError, match=named):
        collect([str(sweep), str(tmp_path / "meta")])
    proc = run_cli(
        "report", str(sweep), str(tmp_path / "meta"), "--out", "out", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "with meta-learning runs (meta/0)" in proc.stderr and "--out" in proc.stderr
    assert not (tmp_path / "out" / "report.md").exists()
    # each kind on its own is reported
    assert write_report([str(sweep)], tmp_path / "c")["md"].is_file()
    assert "protonet" in write_report([str(tmp_path / "meta")], tmp_path / "m")["md"].read_text()


def test_a_real_continual_sweep_ends_with_its_report(tmp_path):
    """Two seeds of a 2-task fine-tuning run, one epoch: the report's numbers are the runs'."""
    run_cli(
        "-m",
        "mode=continual",
        "algo=finetune",
        "seed=0,1",
        "continual.tasks=2",
        "continual.classes_per_task=5",
        "continual.epochs=1",
        "backbone.hidden=8",
        "logger=none",
        "device=cpu",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    sweep = tmp_path / "sweep"
    md = (sweep / "report.md").read_text()
    results = [json.loads((sweep / str(j) / "results.json").read_text()) for j in range(2)]
    for job, r in enumerate(results):
        assert f"| {job} | seed={job} | task | 2 | {100 * r['average_accuracy']:.2f}% |" in md
    acc = np.array([r["average_accuracy"] for r in results])
    half = T2 * acc.std(ddof=1) / math.sqrt(2)
    assert f"| (all) | 2 (0, 1) | {100 * acc.mean():.2f}% ± {100 * half:.2f}% |" in md
    for name in ("accuracy", "matrix_1"):
        with Image.open(sweep / f"{name}.png") as image:
            image.load()
