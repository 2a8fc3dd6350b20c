"""`metarun report`: per-episode scores, seed groups, paired comparisons and figures."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, run_cli
from PIL import Image

from metarun.runners.report import collect, comparisons, groups_of, paired_interval, write_report

EPISODE_SET = {"data": "synthetic", "split": "test", "way": 5, "shot": 1, "query": 5, "seed": 0}


def test_paired_interval_matches_a_hand_computation():
    # d = a - b = [1, 0, 0, 1, 0]: mean 0.4, sample sd sqrt(0.3) = 0.547723;
    # t(0.975, 4) = 2.776445 (a t table); half-width 2.776445 * 0.547723 / sqrt(5) = 0.680087
    out = paired_interval(np.array([1.0, 0.0, 1.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0, 0.0, 0.0]))
    assert out["n"] == 5 and out["mean"] == pytest.approx(0.4, abs=1e-12)
    assert out["half"] == pytest.approx(0.680087, abs=1e-6)
    assert out["low"] == pytest.approx(0.4 - 0.680087, abs=1e-6)


def fake_job(sweep: Path, job: str, overrides: list[str], scores, episode_set=EPISODE_SET):
    folder = sweep / job
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    with open(folder / "test_episodes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["episode", "acc"])
        writer.writerows(enumerate(scores))
    scores = np.asarray(scores, dtype=float)
    results = {
        "test_acc": float(scores.mean()),
        "ci95": 1.96 * float(scores.std(ddof=1)) / math.sqrt(len(scores)),
        "episodes": len(scores),
        "steps": 10,
        "test_episodes": {"file": "test_episodes.csv", "set": {**episode_set, "episodes": 40}},
    }
    (folder / "results.json").write_text(json.dumps(results))
    rows = [
        {"step": s, "loss": 1.0 / s, "acc": 0.5, "val_acc": 0.6, "val_ci95": 0.05} for s in (5, 10)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return results


def fake_sweep(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    sweep = tmp_path / "sweep"
    scores = {}
    for job, (algo, seed, p) in enumerate(
        [("protonet", 0, 0.8), ("protonet", 1, 0.78), ("matching", 0, 0.7), ("matching", 1, 0.72)]
    ):
        s = (rng.random(40) < p).astype(float)
        scores[(algo, seed)] = s
        fake_job(sweep, str(job), [f"algo={algo}", f"seed={seed}", "trainer.steps=10"], s)
    return sweep, scores


def test_seed_groups_and_the_paired_difference_come_from_the_episode_files(tmp_path):
    sweep, scores = fake_sweep(tmp_path)
    runs, sweeps = collect([str(sweep)])
    groups = groups_of(runs)
    assert sweeps == [sweep] and [g.label for g in groups] == ["algo=protonet", "algo=matching"]
    pairs, unpaired = comparisons(groups)
    assert unpaired == [] and len(pairs) == 1
    a = (scores[("protonet", 0)] + scores[("protonet", 1)]) / 2
    b = (scores[("matching", 0)] + scores[("matching", 1)]) / 2
    d = a - b
    half = 2.022691 * d.std(ddof=1) / math.sqrt(40)  # t(0.975, 39) = 2.022691 (a t table)
    assert pairs[0]["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert pairs[0]["half"] == pytest.approx(half, rel=1e-6)


def test_runs_scored_on_other_episodes_are_not_paired(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0", ["algo=protonet"], [1.0, 0.0, 1.0])
    fake_job(sweep, "1", ["algo=matching"], [1.0, 1.0, 0.0], {**EPISODE_SET, "seed": 1})
    fake_job(sweep, "2", ["algo=relation"], [0.0, 1.0, 0.0], {**EPISODE_SET, "shot": 5})
    pairs, unpaired = comparisons(groups_of(collect([str(sweep)])[0]))
    assert pairs == [] and len(unpaired) == 3
    text = (write_report([sweep])["md"]).read_text()
    assert "No two groups were scored on the same test episodes" in text


def numbers(text: str) -> list[str]:
    return re.findall(r"[-+]?\d+\.\d+", text)


def test_the_report_holds_every_figure_and_the_runs_own_numbers(tmp_path):
    sweep, scores = fake_sweep(tmp_path)
    written = write_report([sweep])
    for name in ("curves", "test", "seeds", "paired"):
        with Image.open(written[name]) as image:  # a PNG that decodes
            image.load()
            assert image.format == "PNG" and image.width > 100
    md = written["md"].read_text()
    for job in range(4):
        r = json.loads((sweep / str(job) / "results.json").read_text())
        assert f"{100 * r['test_acc']:.2f}% ± {100 * r['ci95']:.2f}%" in md
    a = (scores[("protonet", 0)] + scores[("protonet", 1)]) / 2
    b = (scores[("matching", 0)] + scores[("matching", 1)]) / 2
    assert f"{100 * (a - b).mean():+.2f} pp" in md
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert "paired t 95% interval" in md


def test_a_glob_of_run_folders_needs_an_output_folder(tmp_path):
    sweep, _ = fake_sweep(tmp_path)
    with pytest.raises(Exception, match="--out"):
        write_report([str(sweep / "*")])
    written = write_report([str(sweep / "*")], tmp_path / "report")
    assert written["md"].parent == tmp_path / "report"


def test_a_sweep_ends_with_a_report_that_reads_back(tmp_path):
    """The issue's sweep (two learners x two seeds on synthetic data), shortened."""
    sweep = tmp_path / "sweep"
    paper = "paper={acc:0.9,ci95:0.01,citation:'Someone 2020, Table 1'}"  # as a preset gives it
    proc = run_cli(
        "-m",
        *FAST,
        "algo=protonet,matching",
        "seed=0,1",
        paper,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert (sweep / "summary.csv").is_file() and (sweep / "report.html").is_file(), proc.stderr
    md = (sweep / "report.md").read_text()
    for job in range(4):
        folder = sweep / str(job)
        r = json.loads((folder / "results.json").read_text())
        episodes = [float(row["acc"]) for row in csv.DictReader(open(folder / "test_episodes.csv"))]
        assert len(episodes) == r["episodes"] == 50
        assert np.mean(episodes) == pytest.approx(r["test_acc"], abs=1e-9)
        assert r["test_episodes"]["set"]["seed"] == 0 and r["test_episodes"]["file"]
        assert f"{100 * r['test_acc']:.2f}% ± {100 * r['ci95']:.2f}%" in md
    assert "| algo=protonet | algo=matching | 50 |" in md
    # the paper's figure beside the measured one, in the report and the sweep's table
    assert md.count("90.00% ± 1.00% (Someone 2020, Table 1)") == 4
    assert (sweep / "summary.md").read_text().count("| 90.00% ± 1.00% |") == 4
    assert r["paper"] == {"acc": 0.9, "ci95": 0.01, "citation": "Someone 2020, Table 1"}
    # each job's most frequent confusion, as its results.json quotes it
    assert "## Most frequent mistakes" in md
    for job in range(4):
        confusions = json.loads((sweep / str(job) / "results.json").read_text())["confusions"]
        first = confusions["top"][0]
        assert f"{confusions['errors']} of {confusions['queries']}" in md
        assert f"{first['true']} → {first['predicted']} ({first['count']})" in md
    for name in ("curves", "test", "seeds", "paired"):
        with Image.open(sweep / f"{name}.png") as image:
            image.load()


def test_the_report_command_writes_where_asked_and_names_bad_input(tmp_path):
    sweep, _ = fake_sweep(tmp_path)
    proc = run_cli("report", str(sweep / "*"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert (tmp_path / "out" / "report.html").is_file() and "report.html" in proc.stdout
    proc = run_cli("report", str(tmp_path / "nothing-here"), cwd=tmp_path, check=False)
    assert (
        proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr
    )


@pytest.mark.slow
def test_the_issues_sweep_two_learners_two_seeds_200_steps(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "-m",
        "algo=protonet,matching",
        "seed=0,1",
        "trainer.steps=200",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    md = (sweep / "report.md").read_text()
    for job in range(4):
        r = json.loads((sweep / str(job) / "results.json").read_text())
        assert f"{100 * r['test_acc']:.2f}% ± {100 * r['ci95']:.2f}%" in md
    groups = groups_of(collect([str(sweep)])[0])
    pairs, _ = comparisons(groups)
    a, b = (np.mean([r.scores for r in g.runs], axis=0) for g in groups)
    assert pairs[0]["mean"] == pytest.approx((a - b).mean(), abs=1e-12)
    assert f"{100 * pairs[0]['mean']:+.2f} pp" in md
    for name in ("curves", "test", "seeds", "paired"):
        with Image.open(sweep / f"{name}.png") as image:
            image.load()


def test_regression_runs_are_reported_in_mse(tmp_path):
    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(1)
    for job, lr in enumerate(("0.001", "0.01")):
        folder = sweep / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- trainer.lr={lr}\n")
        mse = rng.random(30)
        (folder / "test_episodes.csv").write_text(
            "episode,mse\n" + "".join(f"{i},{float(v)!r}\n" for i, v in enumerate(mse))
        )
        results = {
            "test_mse": float(mse.mean()),
            "ci95": 0.1,
            "episodes": 30,
            "test_episodes": {"file": "test_episodes.csv", "set": {"data": "sinusoid"}},
        }
        (folder / "results.json").write_text(json.dumps(results))
        rows = [
            {"step": s, "loss": 1.0, "mse": 1.0 / s, "val_mse": 0.5, "val_ci95": 0.1}
            for s in (1, 2)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = write_report([sweep])
    md = written["md"].read_text()
    first = json.loads((sweep / "0" / "results.json").read_text())
    assert f"MSE {first['test_mse']:.4f} ± 0.1000" in md and "paired.png" in md
