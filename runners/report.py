"""`metarun report`: what a set of runs found, as figures and tables.

    metarun report outputs/multirun/2026-12-04/10-00-00          # a sweep folder
    metarun report outputs/2026-12-04/* --out my_report          # run folders (a glob)

Reads each run's `results.json`, `test_episodes.csv` (one score per fixed test episode)
and `metrics.jsonl`, and writes `report.md`, a self-contained `report.html` (figures
embedded) and the figures as PNG files into the sweep folder, or `--out`. A multirun
writes one at its end (runners/sweep.py).

Runs whose overrides differ only in `seed=` form a group. Two groups whose test episodes
are the same set (checked from each run's recorded definition: data set, split, evaluation
protocol and alphabets, way, shot, query, eval.seed and number of episodes) and were scored
alike (eval.assignment: a transductive score is never paired with an inductive one) are
compared episode by episode: the paired difference. Nothing here needs a display or a network
(matplotlib's Agg backend).

Continual runs (`"mode": "continual"` in results.json, runners/continual.py) have no test
episodes; their report is another one: per group, the accuracy matrix R as a heat map (mean
over the seeds), the average accuracy after each task as a curve, and a table of average
accuracy, backward and forward transfer with t 95% intervals over the seeds. A report over
continual and meta-learning runs together is refused: their figures do not compare, and each
kind has its own report (--out).
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import glob
import html
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from metarun.errors import ConfigError, MetarunError
from metarun.runners.sweep import ERROR_FILE, results_folder, score_text, varying, with_ci

RESULTS_FILE = "results.json"
EPISODES_FILE = "test_episodes.csv"
METRICS_FILE = "metrics.jsonl"
STUDY_FILE = "optuna.db"


# ------------------------------------------------------------------ statistics


def t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def paired_interval(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of a - b over the shared episodes and its paired t 95% interval:
    mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n), d_i = a_i - b_i."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    half = t_quantile(n) * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return {"mean": mean, "half": half, "low": mean - half, "high": mean + half, "n": n}


def normal_interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and 1.96 * sd / sqrt(n): the interval every run reports (runners/evaluate.py)."""
    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return float(v.mean()), 1.96 * sd / math.sqrt(len(v))


def seed_interval(values: list) -> tuple[float, float, int] | None:
    """Mean of a figure over the seeds that define it (null: undefined, e.g. a joint
    learner's backward transfer) and its t 95% half-width t(0.975, n-1) * sd / sqrt(n)
    (nan for one seed); None when no seed defines it."""
    v = np.array([x for x in values if isinstance(x, int | float)], dtype=np.float64)
    if not len(v):
        return None
    n = len(v)
    half = t_quantile(n) * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return float(v.mean()), half, n


def seed_mean(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per entry of stack (seeds on axis 0, nan where a seed did not measure it): the mean
    over the seeds that did, and its t 95% half-width (nan under two seeds, nan mean where
    none did)."""
    n = (~np.isnan(stack)).sum(axis=0)
    with warnings.catch_warnings():  # entries under two seeds: nan, said by the docstring
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
        sd = np.nanstd(stack, axis=0, ddof=1)
    t = np.array([t_quantile(k) if k > 1 else math.nan for k in n.flat]).reshape(n.shape)
    return mean, t * sd / np.sqrt(np.maximum(n, 1))


# ------------------------------------------------------------------ reading runs


@dataclass
class Run:
    folder: Path
    name: str
    overrides: list[str]
    status: str  # ok, failed, no result
    error: str = ""
    results: dict = field(default_factory=dict)
    scores: np.ndarray | None = None  # one per test episode
    episode_set: dict | None = None
    metrics: list[dict] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return "mse" if "test_mse" in self.results else "acc"

    @property
    def continual(self) -> bool:
        return self.results.get("mode") == "continual"

    @property
    def test(self) -> float | None:
        return self.results.get(f"test_{self.metric}")

    @property
    def seed(self):
        for o in self.overrides:
            if o.split("=", 1)[0] == "seed":
                return o.split("=", 1)[1]
        return None


def read_overrides(folder: Path) -> list[str]:
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    items = yaml.safe_load(path.read_text()) or []
    return [o for o in items if not o.startswith("hydra.")]


def read_scores(folder: Path, results: dict) -> tuple[np.ndarray | None, dict | None]:
    info = results.get("test_episodes")
    if not isinstance(info, dict):
        return None, None
    path = folder / info.get("file", EPISODES_FILE)
    if not path.is_file():
        return None, None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    column = "mse" if "test_mse" in results else "acc"
    try:
        scores = np.array([float(r[column]) for r in rows], dtype=np.float64)
    except (KeyError, ValueError):
        raise ConfigError(
            f"{path} is not a test-episodes file (columns episode,{column})"
        ) from None
    return scores, episode_definition(info.get("set"))


def episode_definition(recorded) -> dict | None:
    """A run's recorded test-episode set; one written before metarun recorded the
    evaluation protocol was drawn by the only protocol there was, "random", and one written
    before it recorded eval.assignment was scored query by query, "independent"."""
    if not isinstance(recorded, dict):
        return recorded
    return {"protocol": "random", "assignment": "independent", **recorded}


def read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
    return rows


def load_run(job: Path, name: str) -> Run:
    data = results_folder(job)
    run = Run(folder=job, name=name, overrides=read_overrides(job), status="no result")
    results = data / RESULTS_FILE
    if results.is_file():
        run.results = json.loads(results.read_text())
        run.status = "ok"
        run.scores, run.episode_set = read_scores(data, run.results)
    elif (job / ERROR_FILE).is_file():
        run.status, run.error = "failed", (job / ERROR_FILE).read_text().strip()
    run.metrics = read_metrics(data)
    return run


def some(names: list[str]) -> str:
    """The first three names, and "..." for the rest."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def is_sweep(folder: Path) -> bool:
    return any(folder.glob("*/.hydra/overrides.yaml"))


def is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in (RESULTS_FILE, METRICS_FILE, ".hydra"))


def job_folders(sweep: Path) -> list[Path]:
    jobs = [p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))


def collect(paths: list[str]) -> tuple[list[Run], list[Path]]:
    """The runs under `paths` (run or sweep folders; glob patterns are expanded)."""
    folders: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).exists() else [])
        if not matches:
            raise ConfigError(f"{pattern}: no such folder; give run or sweep folders")
        folders += [Path(m) for m in matches]
    runs, sweeps = [], []
    for folder in folders:
        if not folder.is_dir():
            continue  # a glob also matched files (summary.csv, ...)
        if is_sweep(folder):
            sweeps.append(folder)
            prefix = f"{folder.name}/" if len(folders) > 1 else ""
            runs += [load_run(job, f"{prefix}{job.name}") for job in job_folders(folder)]
        elif is_run(folder):
            runs.append(load_run(folder, folder.name))
    if not runs:
        raise ConfigError(
            f"no runs in {', '.join(paths)}: a run folder holds results.json or metrics.jsonl, "
            "a sweep folder holds numbered job folders"
        )
    continual = [r.name for r in runs if r.continual]
    meta = [r.name for r in runs if r.status == "ok" and not r.continual]
    if continual and meta:
        raise ConfigError(
            f"these runs mix mode=continual runs ({some(continual)}) with meta-learning runs "
            f"({some(meta)}), whose figures do not compare: report each kind on its own, "
            "e.g. metarun report CONTINUAL_RUNS --out DIR1 and metarun report META_RUNS --out DIR2"
        )
    return runs, sweeps


# ------------------------------------------------------------------ groups


@dataclass
class Group:
    label: str
    runs: list[Run]

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.status == "ok"]

    def scores(self) -> np.ndarray | None:
        """Each test episode's score averaged over the group's seeds (None if any run
        lacks per-episode scores or the runs were scored on different episodes)."""
        done = self.done
        if not done or any(r.scores is None for r in done):
            return None
        if any(r.episode_set != done[0].episode_set for r in done):
            return None
        return np.mean(np.stack([r.scores for r in done]), axis=0)

    @property
    def episode_set(self) -> dict | None:
        done = self.done
        return done[0].episode_set if done and self.scores() is not None else None


def groups_of(runs: list[Run]) -> list[Group]:
    """Runs whose overrides differ only in seed= form a group, in order of appearance."""
    groups: dict[tuple, Group] = {}
    for run, items in zip(runs, varying([r.overrides for r in runs])):
        key = tuple(sorted(o for o in items if o.split("=", 1)[0] != "seed"))
        label = " ".join(key) or ("(all)" if len(runs) > 1 else run.name)
        groups.setdefault(key, Group(label, [])).runs.append(run)
    return list(groups.values())


def comparisons(groups: list[Group]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The paired difference for every pair of groups scored on the same episodes, and the
    pairs that cannot be paired."""
    pairs, unpaired = [], []
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            sa, sb = a.scores(), b.scores()
            if sa is None or sb is None or a.episode_set != b.episode_set or len(sa) != len(sb):
                unpaired.append((a.label, b.label))
                continue
            pairs.append({"a": a.label, "b": b.label, **paired_interval(sa, sb)})
    return pairs, unpaired


# ------------------------------------------------------------------ formatting


def paper_cell(run: Run) -> str:
    paper = run.results.get("paper")
    if not isinstance(paper, dict) or paper.get(run.metric) is None:
        return ""
    cite = f" ({paper['citation']})" if paper.get("citation") else ""
    return with_ci(paper[run.metric], paper.get("ci95"), run.metric) + cite


def difference(value: float, metric: str) -> str:
    return f"{value:+.4f}" if metric == "mse" else f"{100 * value:+.2f} pp"


# continual runs: results.json's figures, how each is shown (accuracy, or a transfer in points)
CONTINUAL_FIGURES = (
    ("average_accuracy", "acc"),
    ("backward_transfer", "pp"),
    ("forward_transfer", "pp"),
)
UNDEFINED = "n/a"  # a figure the learner does not have (null in results.json)


def figure_text(mean: float, half: float, kind: str) -> str:
    """85.00% ± 12.42% (accuracy) or -15.00 ± 12.42 pp (a transfer); no ± for a nan half."""
    if kind == "acc":
        return f"{100 * mean:.2f}%" + ("" if math.isnan(half) else f" ± {100 * half:.2f}%")
    return f"{100 * mean:+.2f}" + ("" if math.isnan(half) else f" ± {100 * half:.2f}") + " pp"


def seeds_cell(values: list, kind: str) -> str:
    """A continual figure over seeds (null where undefined): mean ± t 95% half-width, with
    (n=k) when only k of the seeds define it."""
    interval = seed_interval(values)
    if interval is None:
        return UNDEFINED
    mean, half, n = interval
    return figure_text(mean, half, kind) + (f" (n={n})" if n < len(values) else "")


def seconds_text(values: list) -> str:
    seconds = [v for v in values if isinstance(v, int | float)]
    return f"{sum(seconds) / len(seconds):.0f} s" if seconds else ""


# ------------------------------------------------------------------ figures


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def colours(groups: list[Group]) -> dict[str, tuple]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {g.label: cmap(i % cmap.N) for i, g in enumerate(groups)}


def curves_figure(groups: list[Group], path: Path, metric: str) -> Path | None:
    """Training loss and score, validation score with its 95% band, per job."""
    if not any(r.metrics for g in groups for r in g.runs):
        return None
    plt = pyplot()
    colour = colours(groups)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("loss", "training loss"), (metric, f"training {metric}"), (f"val_{metric}", "")]
    axes[2].set_title(f"validation {metric} (95% band)")
    for ax, (key, title) in zip(axes, panels):
        if title:
            ax.set_title(title)
        ax.set_xlabel("step")
        for g in groups:
            for i, run in enumerate(g.runs):
                rows = [m for m in run.metrics if isinstance(m.get(key), int | float)]
                if not rows:
                    continue
                steps = np.array([m["step"] for m in rows])
                values = np.array([m[key] for m in rows], dtype=float)
                label = g.label if i == 0 else None
                ax.plot(steps, values, color=colour[g.label], label=label, alpha=0.85, lw=1.4)
                if key.startswith("val_"):
                    half = np.array([m.get("val_ci95", 0.0) for m in rows], dtype=float)
                    ax.fill_between(
                        steps, values - half, values + half, color=colour[g.label], alpha=0.15
                    )
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def test_figure(groups: list[Group], path: Path, metric: str) -> Path | None:
    """Each job's test score with its 95% interval (and the paper's, where a preset has one)."""
    runs = [(g, r) for g in groups for r in g.done]
    if not runs:
        return None
    plt = pyplot()
    colour = colours(groups)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(runs) + 1.4))
    scale = 1.0 if metric == "mse" else 100.0
    for y, (g, r) in enumerate(runs):
        ci = r.results.get("ci95") or 0.0
        ax.errorbar(r.test * scale, y, xerr=ci * scale, fmt="o", color=colour[g.label], capsize=3)
        paper = r.results.get("paper")
        if isinstance(paper, dict) and paper.get(metric) is not None:
            ax.plot(paper[metric] * scale, y, marker="*", color="black", ms=10, ls="none")
    labels = [f"{r.name}: {g.label}" + (f" seed={r.seed}" if r.seed else "") for g, r in runs]
    ax.set_yticks(range(len(runs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test MSE" if metric == "mse" else "test accuracy (%)")
    ax.set_title("test score per job, 95% interval (* the paper's figure)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seeds_figure(groups: list[Group], path: Path, metric: str) -> Path | None:
    """Groups of seeds: every seed's score, mean +- sd across seeds, pooled interval."""
    seeded = [g for g in groups if len(g.done) > 1]
    if not seeded:
        return None
    plt = pyplot()
    colour = colours(groups)
    scale = 1.0 if metric == "mse" else 100.0
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(seeded) + 2), 4.2))
    for x, g in enumerate(seeded):
        tests = np.array([r.test for r in g.done]) * scale
        ax.scatter(np.full(len(tests), x - 0.12), tests, color=colour[g.label], s=18, zorder=3)
        ax.errorbar(x, tests.mean(), yerr=tests.std(ddof=1), fmt="s", color=colour[g.label],
                    capsize=6, lw=2)  # fmt: skip
        pooled = g.scores()
        if pooled is not None:
            mean, half = normal_interval(pooled)
            ax.errorbar(x + 0.12, mean * scale, yerr=half * scale, fmt="D", color="black",
                        capsize=4, ms=4)  # fmt: skip
    ax.set_xticks(range(len(seeded)), [g.label for g in seeded], fontsize=8, rotation=15)
    ax.set_ylabel("test MSE" if metric == "mse" else "test accuracy (%)")
    ax.set_title(
        "each seed (dots), mean ± sd over seeds (squares),\npooled 95% interval (black)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def paired_figure(groups: list[Group], pairs: list[dict], path: Path, metric: str) -> Path | None:
    """Matrix of mean paired differences (row minus column); * where the interval
    excludes zero."""
    if not pairs:
        return None
    plt = pyplot()
    labels = [g.label for g in groups if any(g.label in (p["a"], p["b"]) for p in pairs)]
    index = {label: i for i, label in enumerate(labels)}
    n, scale = len(labels), 1.0 if metric == "mse" else 100.0
    matrix = np.full((n, n), np.nan)
    text = [["" for _ in range(n)] for _ in range(n)]
    for p in pairs:
        i, j = index[p["a"]], index[p["b"]]
        for r, c, sign in ((i, j, 1), (j, i, -1)):
            matrix[r, c] = sign * p["mean"] * scale
            star = "*" if p["low"] > 0 or p["high"] < 0 else ""
            text[r][c] = f"{sign * p['mean'] * scale:+.2f}{star}\n±{p['half'] * scale:.2f}"
    limit = np.nanmax(np.abs(matrix)) or 1.0
    fig, ax = plt.subplots(figsize=(1.5 * n + 3, 1.2 * n + 1.8))
    image = ax.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit)
    for r in range(n):
        for c in range(n):
            strong = abs(matrix[r, c]) > 0.6 * limit if not np.isnan(matrix[r, c]) else False
            colour = "white" if strong else "black"
            ax.text(c, r, text[r][c], ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(n), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    unit = "MSE" if metric == "mse" else "percentage points"
    fig.colorbar(image, ax=ax, label=f"row − column ({unit})")
    ax.set_title(
        "paired difference, same test episodes\n(* its 95% interval excludes 0)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def matrix_figure(group: Group, path: Path) -> Path | None:
    """A group's accuracy matrix R, mean over its seeds: row t after training on tasks 0..t,
    column i the task scored, each cell's value in %; cells no seed measured (a joint
    learner's rows before the last) grey."""
    done = group.done
    if not done:
        return None
    plt = pyplot()
    r = 100 * seed_mean(np.array([run.results["R"] for run in done], dtype=np.float64))[0]
    tasks = len(r)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    fig, ax = plt.subplots(figsize=(min(0.7 * tasks + 3, 16), min(0.55 * tasks + 2, 14)))
    image = ax.imshow(r, cmap=cmap, vmin=0, vmax=100)
    size = min(8.0, 150 / tasks)  # the cells shrink once the figure reaches its cap
    for t in range(tasks):
        for i in range(tasks):
            if not np.isnan(r[t, i]):
                colour = "white" if r[t, i] < 60 else "black"  # on viridis' dark or light end
                ax.text(i, t, f"{r[t, i]:.1f}", ha="center", va="center", fontsize=size,
                        color=colour)  # fmt: skip
    ax.set_xticks(range(tasks), [str(i) for i in range(tasks)], fontsize=8)
    ax.set_yticks(range(tasks), [str(t) for t in range(tasks)], fontsize=8)
    ax.set_xlabel("task scored (i)")
    ax.set_ylabel("after training on tasks 0..t (t)")
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    seeds = f"mean of {len(done)} seeds" if len(done) > 1 else "one run"
    ax.set_title(f"accuracy matrix R: {group.label}\n({seeds}; grey: not measured)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_figure(groups: list[Group], path: Path) -> Path | None:
    """Average accuracy over the tasks trained so far, after each task (results.json's
    accuracy_curve), per group: mean over its seeds, t 95% band where two or more seeds
    measured the point."""
    drawn = [g for g in groups if g.done]
    if not drawn:
        return None
    plt = pyplot()
    colour = colours(groups)
    fig, ax = plt.subplots(figsize=(8, 4.6))
    longest = 1
    for g in drawn:
        curves = np.array([r.results["accuracy_curve"] for r in g.done], dtype=np.float64)
        mean, half = (100 * a for a in seed_mean(curves))
        tasks = np.arange(1, len(mean) + 1)
        longest = max(longest, len(mean))
        label = g.label + (f" ({len(g.done)} seeds)" if len(g.done) > 1 else "")
        ax.plot(tasks, mean, marker="o", ms=4, color=colour[g.label], label=label)
        if not np.isnan(half).all():
            ax.fill_between(tasks, mean - half, mean + half, color=colour[g.label], alpha=0.18)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))  # a long stream too
    ax.set_xlim(0.7, longest + 0.3)
    ax.set_ylim(0, 100)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("average accuracy on them (%)")
    ax.set_title("average accuracy over the sequence (mean over seeds, 95% t band)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ Optuna


def study_of(sweep: Path):
    """The Optuna study a sweep ran in: its storage and name from the Hydra settings the
    sweep's jobs recorded (.hydra/hydra.yaml; the Optuna sweeper writes no multirun.yaml)."""
    from omegaconf import OmegaConf

    recorded = [sweep / "multirun.yaml"] + [
        job / ".hydra" / "hydra.yaml" for job in job_folders(sweep)
    ]
    config = next((p for p in recorded if p.is_file()), None)
    if config is None:
        return None
    cfg = OmegaConf.load(config)
    target = OmegaConf.select(cfg, "hydra.sweeper._target_", default="")
    if "optuna" not in str(target).lower():
        return None
    try:  # the storage URL names the sweep folder through an interpolation
        storage = OmegaConf.select(cfg, "hydra.sweeper.storage")
        name = OmegaConf.select(cfg, "hydra.sweeper.study_name")
    except Exception:  # noqa: BLE001 - an interpolation this file cannot resolve
        return None
    if not storage:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = str(storage)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception as err:  # a moved or deleted study: the report goes on without it
        print(f"metarun report: cannot open the Optuna study {storage}: {err}", file=sys.stderr)
        return None


def optuna_figures(study, out: Path) -> list[tuple[str, Path]]:
    """Optuna's trial history, and parameter importances (mean decrease in impurity of a
    seeded random forest; needs 2 finished trials)."""
    import optuna
    from optuna.trial import TrialState

    plt = pyplot()
    figures = []
    history = out / "optuna_history.png"
    with warnings.catch_warnings():  # "experimental" since optuna 2.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
    ax.figure.set_size_inches(8, 4.2)
    ax.figure.tight_layout()
    ax.figure.savefig(history, dpi=110)
    plt.close(ax.figure)
    figures.append(("Optuna: trial history", history))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) >= 2 and complete[0].params:
        from optuna.importance import MeanDecreaseImpurityImportanceEvaluator

        importances = optuna.importance.get_param_importances(
            study, evaluator=MeanDecreaseImpurityImportanceEvaluator(seed=0)
        )
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(importances) + 1.5))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (mean decrease in impurity)")
        ax.set_title(f"Optuna: parameter importance over {len(complete)} trials")
        fig.tight_layout()
        path = out / "optuna_importance.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append(("Optuna: parameter importance", path))
    return figures


# ------------------------------------------------------------------ the report


PAIRED_METHOD = (
    "Paired comparison: every run of metarun is scored on the same fixed test episodes when "
    "its data set, split, evaluation protocol (eval.protocol, eval.alphabets), way, shot, "
    "query, eval.seed and number of episodes match (checked from each run's results.json); "
    "two groups are paired only when their queries were also labelled alike (eval.assignment). "
    "For two groups scored on the same set, d_i is the "
    "difference of their scores on episode i (a group's score on an episode is the mean over "
    "its seeds); the table gives mean(d) and the paired t 95% interval mean(d) ± "
    "t(0.975, n−1)·sd(d)/√n over the n episodes. Because both groups meet the same easy and "
    "hard episodes, this interval is much narrower than the two groups' own intervals "
    "suggest; an interval that excludes 0 means the difference is larger than the episode "
    "sampling noise (it does not include seed-to-seed variation unless several seeds were "
    "run). Job intervals are those each run reports: 1.96·sd/√n over its episodes; a seed "
    "group's pooled interval is the same formula over the episodes' seed-averaged scores."
)


CONTINUAL_METHOD = (
    "Continual runs (mode=continual, docs/continual.md): R[t, i] is the test accuracy on "
    "task i after training on tasks 0..t. Average accuracy is the mean of R's last row; "
    "backward transfer the mean over i < T−1 of R[T−1, i] − R[i, i] (negative: forgetting); "
    "forward transfer the mean over i > 0 of R[i−1, i] minus the untrained network's "
    "accuracy on task i; both in percentage points (pp). A group's figure is the mean over "
    "its n seeds with the t 95% interval mean ± t(0.975, n−1)·sd/√n (none for one seed); "
    "it covers what the seed changes: the initialization, the order of the mini-batches "
    f"and the split of the classes into tasks. {UNDEFINED}: undefined for the learner (joint "
    "trains once on every task: no backward or forward transfer) or for one task; (n=k): "
    "only k of the seeds define the figure; -: the run has no result."
)


def heading(runs: list[Run], sweeps: list[Path]) -> list[tuple]:
    """The report's title, where its runs come from, and the overrides they all share."""
    blocks: list[tuple] = [("h", 1, "metarun report")]
    where = ", ".join(str(s) for s in sweeps) or ", ".join(str(r.folder) for r in runs)
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    blocks.append(("p", f"{len(runs)} runs from {where}; written {made}."))
    common = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)]
    if len(runs) > 1 and common:
        blocks.append(("p", "Overrides common to every run: " + " ".join(common)))
    return blocks


def build_continual(runs: list[Run], sweeps: list[Path], out: Path) -> list[tuple]:
    """build() for mode=continual runs: each job's figures, each group's mean over its
    seeds with t intervals, the average accuracy curve, and a heat map of R per group."""
    groups = groups_of(runs)
    blocks = heading(runs, sweeps)
    blocks.append(("h", 2, "Jobs"))
    rows = []
    for r, items in zip(runs, varying([r.overrides for r in runs])):
        ok = r.status == "ok"
        cells = [seeds_cell([r.results.get(k)], kind) for k, kind in CONTINUAL_FIGURES]
        rows.append([
            r.name,
            " ".join(items) or "(defaults)",
            str(r.results.get("scenario", "")),
            str(r.results.get("tasks", "")),
            *(cells if ok else ["-"] * len(cells)),
            seconds_text([r.results.get("seconds")]),
            r.status if r.status != "failed" else f"failed: {r.error}",
        ])  # fmt: skip
    figure_names = ["average accuracy", "backward transfer", "forward transfer"]
    blocks.append(
        ("table", ["job", "overrides", "scenario", "tasks", *figure_names, "time", "status"], rows)
    )

    blocks.append(("h", 2, "Groups"))
    blocks.append(("p", CONTINUAL_METHOD))
    rows = []
    for g in groups:
        done = g.done
        if not done:
            continue
        seeds = str(len(done))
        if all(r.seed is not None for r in done):
            seeds += f" ({', '.join(str(r.seed) for r in done)})"
        rows.append([
            g.label,
            seeds,
            *(seeds_cell([r.results.get(k) for r in done], kind) for k, kind in CONTINUAL_FIGURES),
            seconds_text([r.results.get("seconds") for r in done]),
        ])  # fmt: skip
    if rows:
        header = ["group", "seeds", *(f"{name} (95% CI)" for name in figure_names)]
        blocks.append(("table", [*header, "time per run"], rows))
    else:
        blocks.append(("p", "No run has a result yet."))

    curve = accuracy_figure(groups, out / "accuracy.png")
    figures = [("Average accuracy over the sequence", curve)] + [
        (f"Accuracy matrix R: {g.label}", matrix_figure(g, out / f"matrix_{i}.png"))
        for i, g in enumerate(groups, 1)
    ]
    blocks.append(("h", 2, "Figures"))
    blocks += [("img", title, path) for title, path in figures if path is not None]
    return blocks


def build(runs: list[Run], sweeps: list[Path], out: Path) -> list[tuple]:
    """The report as blocks: ("h", level, text), ("p", text), ("table", header, rows),
    ("img", title, path)."""
    if any(r.continual for r in runs):
        return build_continual(runs, sweeps, out)
    groups = groups_of(runs)
    metric = next((r.metric for r in runs if r.status == "ok"), "acc")
    pairs, unpaired = comparisons(groups)
    blocks = heading(runs, sweeps)

    blocks.append(("h", 2, "Jobs"))
    rows = []
    for r, items in zip(runs, varying([r.overrides for r in runs])):
        ci = r.results.get("ci95")
        rows.append([
            r.name,
            " ".join(items) or "(defaults)",
            with_ci(r.test, ci, r.metric) if r.status == "ok" else "-",
            paper_cell(r),
            str(r.results.get("episodes", "")),
            str(r.results.get("steps", "")),
            r.status if r.status != "failed" else f"failed: {r.error}",
        ])  # fmt: skip
    blocks.append(
        (
            "table",
            ["job", "overrides", "test (95% CI)", "paper", "episodes", "steps", "status"],
            rows,
        )
    )

    seeded = [g for g in groups if len(g.done) > 1]
    if seeded:
        blocks.append(("h", 2, "Seeds"))
        rows = []
        for g in seeded:
            tests = np.array([r.test for r in g.done])
            pooled = g.scores()
            pooled_cell = "-"
            if pooled is not None:
                mean, half = normal_interval(pooled)
                pooled_cell = with_ci(mean, half, metric)
            rows.append([
                g.label,
                ", ".join(str(r.seed) for r in g.done),
                f"{score_text(float(tests.mean()), metric)} ± {score_text(float(tests.std(ddof=1)), metric)}",
                pooled_cell,
                ", ".join(score_text(r.test, metric) for r in g.done),
            ])  # fmt: skip
        blocks.append(
            ("table", ["group", "seeds", "mean ± sd over seeds", "pooled 95% CI", "per seed"], rows)
        )

    blocks.append(("h", 2, "Paired comparisons"))
    blocks.append(("p", PAIRED_METHOD))
    if pairs:
        rows = [
            [
                p["a"],
                p["b"],
                str(p["n"]),
                difference(p["mean"], metric),
                f"[{difference(p['low'], metric)}, {difference(p['high'], metric)}]",
                "yes" if p["low"] > 0 or p["high"] < 0 else "no",
            ]
            for p in pairs
        ]
        blocks.append(
            ("table", ["A", "B", "episodes", "mean A − B", "paired 95% CI", "excludes 0"], rows)
        )
    else:
        blocks.append(("p", "No two groups were scored on the same test episodes."))
    if unpaired:
        text = "; ".join(f"{a} vs {b}" for a, b in unpaired)
        blocks.append(
            ("p", f"Not paired (different test episodes, or no per-episode scores): {text}.")
        )

    blocks += mistakes_blocks(runs)
    figures = [
        ("Learning curves", curves_figure(groups, out / "curves.png", metric)),
        ("Test score per job", test_figure(groups, out / "test.png", metric)),
        ("Seeds", seeds_figure(groups, out / "seeds.png", metric)),
        ("Paired differences", paired_figure(groups, pairs, out / "paired.png", metric)),
    ]
    for sweep in sweeps:
        study = study_of(sweep)
        if study is not None:
            with pyplot().rc_context():  # optuna's plots switch matplotlib's style
                figures += optuna_figures(study, out)
            blocks.append(("p", f"Optuna study '{study.study_name}': {len(study.trials)} trials."))
    blocks.append(("h", 2, "Figures"))
    blocks += [("img", title, path) for title, path in figures if path is not None]
    return blocks


def mistakes_blocks(runs: list[Run]) -> list[tuple]:
    """Each classification job's most frequent confusions, from its results.json (the whole
    lists are its test_confusions.csv and test_classes.csv)."""
    rows = []
    for r in runs:
        record = r.results.get("confusions") if r.status == "ok" else None
        if not record or not record.get("top"):
            continue
        top = "; ".join(f"{c['true']} → {c['predicted']} ({c['count']})" for c in record["top"][:3])
        rows.append([r.name, f"{record['errors']} of {record['queries']}", top])
    if not rows:
        return []
    return [
        ("h", 2, "Most frequent mistakes"),
        (
            "p",
            "Each job's test queries taken for another class: the three most frequent pairs "
            "(true → predicted, count). Every pair is in the job's test_confusions.csv, every "
            "class's errors in its test_classes.csv.",
        ),
        ("table", ["job", "wrong queries", "most frequent (true → predicted, count)"], rows),
    ]


def markdown(blocks: list[tuple], out: Path) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[1]}]({Path(block[2]).relative_to(out)})", ""]
    return "\n".join(lines)


def html_page(blocks: list[tuple]) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                for row in block[2]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[2]).read_bytes()).decode()
            title = html.escape(block[1])
            body.append(f'<h3>{title}</h3><img alt="{title}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;}"
        "table{border-collapse:collapse;margin:1em 0;}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%;}"
        "img{max-width:100%;}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>metarun report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(paths: list[str | Path], out: Path | None = None) -> dict[str, Path]:
    """Write report.md, report.html and the PNG figures; returns their paths."""
    runs, sweeps = collect([str(p) for p in paths])
    if out is None:
        if len(sweeps) == 1 and all(r.folder.parent == sweeps[0] for r in runs):
            out = sweeps[0]
        else:
            raise ConfigError(
                "these runs are not one sweep's: say where the report goes with --out DIR"
            )
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from metarun.runners.files import os_error

        raise os_error(err, f"cannot make the report folder {out}") from err
    blocks = build(runs, sweeps, out)
    from metarun.runners.files import write_text_atomic

    md, page = out / "report.md", out / "report.html"
    write_text_atomic(md, markdown(blocks, out), "report")
    write_text_atomic(page, html_page(blocks), "report")
    return {
        "md": md,
        "html": page,
        **{Path(b[2]).stem: Path(b[2]) for b in blocks if b[0] == "img"},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="metarun report",
        description="Figures and tables for run and sweep folders: report.md, a "
        "self-contained report.html and PNG figures.",
    )
    parser.add_argument("folders", nargs="+", help="run or sweep folders (globs are fine)")
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep folder)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folders, args.out)
    except MetarunError as err:
        print(f"metarun report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {written['html']}\n        {written['md']}")
