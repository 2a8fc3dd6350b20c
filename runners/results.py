"""A run's test result, one path for mode=train and mode=test: score the fixed test
episodes, keep each episode's score (test_episodes.csv), write results.json and show them
on the dashboard."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from metarun.runners.build import WHERE_DATA_IS, choice
from metarun.runners.evaluate import (
    eval_assignment,
    eval_protocol,
    eval_tta,
    evaluate_as,
    val_assignment,
)
from metarun.runners.files import write_text_atomic

log = logging.getLogger("metarun")

EPISODES_FILE = "test_episodes.csv"
CONFUSIONS_FILE = "test_confusions.csv"  # which class each wrong query was taken for
CLASSES_FILE = "test_classes.csv"  # each class's queries and errors, hardest first
TOP_CONFUSIONS = 5  # pairs quoted in results.json and the log


def episode_set(cfg: DictConfig, n: int) -> dict:
    """What defines the fixed test episodes: two runs with equal sets were scored on the
    same episodes (metarun report pairs them; a set written before `protocol` was recorded
    is a random one)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {
        "data": choice(cfg, "data"),
        "split": "test",
        **protocol_record(cfg),
        "way": cfg.eval.way,
        "shot": cfg.eval.shot,
        "query": cfg.eval.query,
        "seed": cfg.eval.seed,
        "episodes": n,
        "data_settings": {k: v for k, v in data.items() if k not in WHERE_DATA_IS},
    }


def protocol_record(cfg: DictConfig) -> dict:
    """How the test episodes were drawn and scored: {"protocol": ..., "assignment": ...},
    with "alphabets" (sorted: their order does not change the episodes) when eval.alphabets
    restricts them."""
    protocol, alphabets = eval_protocol(cfg)
    record = {"protocol": protocol, "assignment": eval_assignment(cfg)}
    if alphabets is not None:
        record["alphabets"] = sorted(set(alphabets))
    return record


def write_episode_scores(run_dir: Path, cfg: DictConfig, result: dict) -> dict:
    """test_episodes.csv: each fixed test episode's score; returns results.json's entry."""
    metric = result["metric"]
    lines = [f"episode,{metric}"] + [f"{i},{s!r}" for i, s in enumerate(result["scores"])]
    write_text_atomic(Path(run_dir) / EPISODES_FILE, "\n".join(lines) + "\n", "test episodes")
    return {"file": EPISODES_FILE, "set": episode_set(cfg, len(result["scores"]))}


def write_confusions(run_dir: Path, store, result: dict) -> tuple[dict, list[list]]:
    """test_confusions.csv (each pair of classes a query of the first was taken for the
    second, with how often, most frequent first) and test_classes.csv (each class's queries,
    errors and accuracy, hardest first), named by the data set's class names; returns
    results.json's entry, with the most frequent confusions, and every pair's row."""

    name = store.class_name
    queries, errors = result["class_queries"], result["class_errors"]
    n_errors = sum(errors.values())
    pairs = [
        [name(t), name(p), count, round(count / n_errors, 4)]
        for t, p, count in result["confusions"]
    ]
    rows = sorted(
        ([name(c), q, errors[c], round(1 - errors[c] / q, 4)] for c, q in queries.items()),
        key=lambda row: (row[3], row[0]),
    )
    write_text_atomic(
        Path(run_dir) / CONFUSIONS_FILE,
        csv_text(["true_class", "predicted_class", "count", "share_of_errors"], pairs),
        "test confusions",
    )
    write_text_atomic(
        Path(run_dir) / CLASSES_FILE,
        csv_text(["class", "queries", "errors", "accuracy"], rows),
        "test classes",
    )
    record = {
        "file": CONFUSIONS_FILE,
        "classes_file": CLASSES_FILE,
        "queries": sum(queries.values()),
        "errors": n_errors,
        "top": [
            {"true": t, "predicted": p, "count": c, "share_of_errors": share}
            for t, p, c, share in pairs[:TOP_CONFUSIONS]
        ],
    }
    return record, pairs


def csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def log_confusions(record: dict) -> None:
    if not record["top"]:
        return
    log.info(
        "most frequent confusions (true -> predicted, of %d wrong queries): %s",
        record["errors"],
        "; ".join(f"{c['true']} -> {c['predicted']} ({c['count']})" for c in record["top"][:3]),
    )


def results_record(cfg: DictConfig, result: dict, **extra) -> dict:
    metric = result["metric"]
    paper = OmegaConf.to_container(cfg.paper) if cfg.get("paper") is not None else None
    return {
        f"test_{metric}": result[metric],
        "ci95": result["ci95"],
        "episodes": result["episodes"],
        "way": cfg.eval.way,
        "shot": cfg.eval.shot,
        "query": cfg.eval.query,
        **protocol_record(cfg),
        # test-time views (eval.tta): how each query was scored, not which episodes, so not
        # in the episode set (the report pairs runs with and without them)
        "tta": eval_tta(cfg),
        "algo": choice(cfg, "algo"),
        "data": choice(cfg, "data"),
        **({"paper": paper} if paper else {}),
        **extra,
    }


def write_results(run_dir: Path, results: dict) -> None:
    path = Path(run_dir) / "results.json"
    write_text_atomic(path, json.dumps(results, indent=2) + "\n", "results file")
    if results.get("mode") == "continual":

        def pct(key):
            return "undefined" if results[key] is None else f"{100 * results[key]:+.2f}%"

        log.info(
            "average accuracy %.2f%% after %d tasks (%s-incremental), backward transfer %s, "
            "forward transfer %s -> %s",
            100 * results["average_accuracy"],
            results["tasks"],
            results["scenario"],
            pct("backward_transfer"),
            pct("forward_transfer"),
            path,
        )
        return
    if "test_mse" in results:
        log.info(
            "test MSE %.4f ± %.4f (95%% CI, %d tasks of %d-shot regression) -> %s",
            results["test_mse"],
            results["ci95"],
            results["episodes"],
            results["shot"],
            path,
        )
        return
    log.info(
        "test accuracy %.2f%% ± %.2f%% (95%% CI, %d episodes of %d-way %d-shot%s) -> %s",
        100 * results["test_acc"],
        100 * results["ci95"],
        results["episodes"],
        results["way"],
        results["shot"],
        (", within one alphabet" if results.get("protocol") == "within_alphabet" else "")
        + (
            ", queries assigned together (eval.assignment=balanced)"
            if results.get("assignment") == "balanced"
            else ""
        )
        + (f", {results['tta']} test-time views" if results.get("tta", 1) > 1 else ""),
        path,
    )


def dashboard_summary(results: dict, metric: str) -> dict:
    """The run's summary on the dashboard: the test score and its interval, the best
    validation score and its step (not the last ones), the paper's figure."""
    out = {f"test/{metric}": results[f"test_{metric}"], "test/ci95": results["ci95"]}
    out["test/n_episodes"] = results["episodes"]
    if results.get(f"best_val_{metric}") is not None:
        out[f"val/best_{metric}"] = results[f"best_val_{metric}"]
        out["val/best_step"] = results.get("best_step")
    if isinstance(results.get("paper"), dict) and results["paper"].get(metric) is not None:
        out[f"paper/{metric}"] = results["paper"][metric]
    return out


def score(
    learner, episodes, cfg: DictConfig, run_dir: Path, logger, extra: dict, best_val=None
) -> dict:
    """Evaluate on the fixed test episodes, write test_episodes.csv, the mistakes by class
    (classification: write_confusions) and results.json (with
    `extra` and the learner's own test report), and give the dashboard its summary.
    best_val: training's best validation score as higher_is_better gives it (accuracy, or
    minus the MSE), recorded as best_val_acc or best_val_mse, with the validation's
    assignment (val_assignment) when it is not the test's."""
    result = evaluate_as(cfg, learner, episodes, confusions=True)
    metric = result["metric"]
    if best_val is not None:
        extra = {**extra, f"best_val_{metric}": best_val if metric == "acc" else -best_val}
        if val_assignment(cfg) != eval_assignment(cfg):
            extra["val_assignment"] = val_assignment(cfg)
    record = write_episode_scores(run_dir, cfg, result)
    if "confusions" in result:
        confusions, pairs = write_confusions(run_dir, episodes.store, result)
        extra = {**extra, "confusions": confusions}
    report = learner.test_report(episodes, cfg.eval.batch)
    results = results_record(cfg, result, **extra, **report, test_episodes=record)
    write_results(run_dir, results)
    logger.episode_table(metric, result["scores"])
    if "confusions" in result:
        log_confusions(results["confusions"])
        logger.table(
            "test/confusions",
            ["true_class", "predicted_class", "count"],
            [row[:3] for row in pairs],
        )
    logger.summary({**dashboard_summary(results, metric), **learner.test_summary(report)})
    return results
