"""The end of a multirun: one row per job in a table, printed and written to the sweep dir.

Registered as a Hydra callback (conf/hydra/default.yaml). Each job folder of the sweep
holds `.hydra/overrides.yaml` and, when it finished, `results.json`; a job that failed holds
`error.txt` (written by the CLI, which in a multirun records the error and lets the other
jobs run). The summary goes to `summary.csv` and `summary.md` in the sweep dir.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("metarun")

COLUMNS = (
    "job",
    "overrides",
    "test",
    "ci95",
    "metric",
    "paper",
    "paper_ci95",
    "backward_transfer",  # mode=continual: the test column is the average accuracy
    "steps",
    "seconds",
    "status",
    "error",
)
ERROR_FILE = "error.txt"
# in a job folder: the earlier run this job continued (resume=), which holds its results
CONTINUED_FILE = "continued.txt"


def job_rows(sweep_dir: Path) -> list[dict]:
    """One dict per job folder (numbered subfolders with a .hydra/overrides.yaml); its
    overrides as a list (a value may hold spaces: logger.tags=[a, b])."""
    rows = []
    for overrides_file in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
        job = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        row = dict.fromkeys(COLUMNS, "")
        row["job"] = job.name
        row["overrides"] = [o for o in overrides if not o.startswith("hydra.")]
        results, error = results_folder(job) / "results.json", job / ERROR_FILE
        if results.exists() and json.loads(results.read_text()).get("mode") == "continual":
            r = json.loads(results.read_text())
            row.update(
                test=r["average_accuracy"],
                ci95=None,
                metric="acc",
                backward_transfer=r["backward_transfer"],
                steps=r.get("tasks", ""),
                seconds=r.get("seconds", ""),
                status="ok",
            )
        elif results.exists():
            r = json.loads(results.read_text())
            metric = "mse" if "test_mse" in r else "acc"
            paper = r.get("paper") if isinstance(r.get("paper"), dict) else {}
            row.update(
                paper=paper.get(metric, ""),
                paper_ci95=paper.get("ci95") if paper.get("ci95") is not None else "",
                test=r[f"test_{metric}"],
                ci95=r["ci95"],
                metric=metric,
                steps=r.get("steps", ""),
                seconds=r.get("seconds", ""),
                status="ok",
            )
        elif error.exists():
            row.update(status="failed", error=error.read_text().strip())
        else:
            row.update(status="no result")
        rows.append(row)
    rows.sort(key=lambda r: (int(r["job"]) if r["job"].isdigit() else 1 << 30, r["job"]))
    return rows


def results_folder(job: Path) -> Path:
    """Where a job's results are: its folder, or the run it continued."""
    pointer = job / CONTINUED_FILE
    if pointer.is_file():
        run = Path(pointer.read_text().strip())
        if run.is_dir():
            return run
    return job


def score_text(value: float | None, metric: str) -> str:
    """A test score as tables show it: 97.07% (accuracy) or MSE 0.2500."""
    if value is None or not isinstance(value, int | float):
        return "-"
    return f"MSE {value:.4f}" if metric == "mse" else f"{100 * value:.2f}%"


def with_ci(value: float | None, ci: float | None, metric: str) -> str:
    """A score and its 95% half-width: 97.07% ± 0.34% (no half-width when ci is None)."""
    if value is None:
        return "-"
    half = "" if ci is None else (f" ± {ci:.4f}" if metric == "mse" else f" ± {100 * ci:.2f}%")
    return score_text(value, metric) + half


def test_cell(row: dict) -> str:
    return with_ci(row["test"], row["ci95"], row["metric"]) if row["status"] == "ok" else "-"


def paper_cell(row: dict) -> str:
    """The published figure of a preset that follows a paper."""
    if row.get("paper") in ("", None):
        return ""
    ci = row.get("paper_ci95")
    return with_ci(row["paper"], None if ci in ("", None) else ci, row["metric"])


def transfer_cell(row: dict) -> str:
    """A continual run's backward transfer in points (negative: forgetting)."""
    value = row.get("backward_transfer")
    return f"{100 * value:+.2f}" if isinstance(value, int | float) else ""


def seconds_cell(row: dict) -> str:
    return f"{row['seconds']:.0f} s" if isinstance(row["seconds"], int | float) else ""


def varying(lists: list[list[str]]) -> list[list[str]]:
    """Each list of overrides without those all the lists share."""
    common = set.intersection(*map(set, lists)) if len(lists) > 1 else set()
    return [[o for o in items if o not in common] for items in lists]


def swept(rows: list[dict]) -> list[str]:
    """Each row's overrides without those every job shares (the CSV keeps them all)."""
    return [" ".join(items) or "(none)" for items in varying([r["overrides"] for r in rows])]


def write_summary(sweep_dir: Path, rows: list[dict]) -> tuple[Path, Path]:
    sweep_dir = Path(sweep_dir)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "overrides": " ".join(r["overrides"])} for r in rows)
    continual = any(r["backward_transfer"] not in ("", None) for r in rows)
    extra = " backward transfer |" if continual else ""
    lines = [
        f"| job | overrides | test (95% CI) | paper |{extra} steps | time | status |",
        "|---|---|---|---|" + ("---|" if continual else "") + "---|---|---|",
    ]
    for r, overrides in zip(rows, swept(rows)):
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        status = status.replace("|", "\\|").replace("\n", " ")
        bwt = f" {transfer_cell(r)} |" if continual else ""
        lines.append(
            f"| {r['job']} | `{overrides}` | {test_cell(r)} | {paper_cell(r)} |{bwt} {r['steps']} | "
            f"{seconds_cell(r)} | {status} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def print_summary(rows: list[dict], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"metarun sweep: {sweep_dir}")
    papers = any(r.get("paper") not in ("", None) for r in rows)
    continual = any(r["backward_transfer"] not in ("", None) for r in rows)
    names = ("job", "overrides", "test (95% CI)") + (("paper",) if papers else ())
    names += ("backward transfer",) if continual else ()
    for name in names + ("steps", "time", "status"):
        table.add_column(name)
    for r, overrides in zip(rows, swept(rows)):
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r['error']}".rstrip(": ")
        paper = (paper_cell(r),) if papers else ()
        bwt = (transfer_cell(r),) if continual else ()
        table.add_row(
            r["job"],
            overrides,
            test_cell(r),
            *paper,
            *bwt,
            str(r["steps"]),
            seconds_cell(r),
            status,
        )
    Console(file=sys.stdout, width=160).print(table)


def write_report(sweep_dir: Path) -> dict[str, Path]:
    """report.html, report.md and the figures (runners/report.py); a report that cannot be
    written is named, and the sweep's results stand."""
    from metarun.runners.report import write_report as report

    try:
        written = report([sweep_dir], sweep_dir)
    except Exception as err:  # noqa: BLE001 - the jobs' results are written already
        print(f"metarun: the sweep's report could not be written: {err}", file=sys.stderr)
        return {}
    print(f"report: {written['html']}")
    return written


def summary_run(config: DictConfig, sweep_dir: Path, rows: list[dict], report: dict) -> None:
    """wandb: one `summary` run in the sweep's group with the table and the report's figures."""
    logger_cfg = config.get("logger") or {}
    if logger_cfg.get("name") != "wandb":
        return
    import wandb

    from metarun.runners.logging import group_name, wandb_mode

    group = logger_cfg.get("group") or group_name(sweep_dir)
    run = wandb.init(
        project=logger_cfg.get("project"),
        entity=logger_cfg.get("entity"),
        group=group,
        name=f"summary-{group}",
        job_type="summary",
        tags=list(logger_cfg.get("tags") or []),
        dir=str(sweep_dir),
        mode=wandb_mode(logger_cfg),
        config={"sweep_dir": str(sweep_dir), "jobs": len(rows)},
    )
    try:
        columns = list(COLUMNS)
        table = [[" ".join(r[c]) if c == "overrides" else r[c] for c in columns] for r in rows]
        figures = {
            f"report/{name}": wandb.Image(str(path))
            for name, path in report.items()
            if str(path).endswith(".png")
        }
        run.log({"summary": wandb.Table(columns=columns, data=table), **figures})
    finally:
        run.finish()


class SweepSummary(Callback):
    """Hydra callback: after the last job of a multirun, the comparison table."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = job_rows(sweep_dir)
        if not rows:
            return
        csv_path, md_path = write_summary(sweep_dir, rows)
        print_summary(rows, sweep_dir)
        failed = [r["job"] for r in rows if r["status"] != "ok"]
        log.info("sweep summary -> %s, %s", csv_path, md_path)
        report = write_report(sweep_dir)
        try:
            summary_run(config, sweep_dir, rows, report)
        except Exception as err:  # noqa: BLE001 - the jobs' results are written already
            print(f"metarun: the sweep's wandb summary run failed: {err}", file=sys.stderr)
        if failed:
            print(
                f"metarun: {len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)}); "
                f"each one's error is in its folder's {ERROR_FILE} and in the table",
                file=sys.stderr,
            )
            sys.exit(1)
