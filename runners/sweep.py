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

COLUMNS = ("job", "overrides", "test", "ci95", "metric", "steps", "seconds", "status", "error")
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
        if results.exists():
            r = json.loads(results.read_text())
            metric = "mse" if "test_mse" in r else "acc"
            row.update(
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


def test_cell(row: dict) -> str:
    if row["status"] != "ok":
        return "-"
    if row["metric"] == "mse":
        return f"MSE {row['test']:.4f} ± {row['ci95']:.4f}"
    return f"{100 * row['test']:.2f}% ± {100 * row['ci95']:.2f}%"


def seconds_cell(row: dict) -> str:
    return f"{row['seconds']:.0f} s" if isinstance(row["seconds"], int | float) else ""


def swept(rows: list[dict]) -> list[str]:
    """Each row's overrides without those every job shares (the CSV keeps them all)."""
    lists = [r["overrides"] for r in rows]
    common = set.intersection(*map(set, lists)) if len(lists) > 1 else set()
    return [" ".join(o for o in items if o not in common) or "(none)" for items in lists]


def write_summary(sweep_dir: Path, rows: list[dict]) -> tuple[Path, Path]:
    sweep_dir = Path(sweep_dir)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "overrides": " ".join(r["overrides"])} for r in rows)
    lines = [
        "| job | overrides | test (95% CI) | steps | time | status |",
        "|---|---|---|---|---|---|",
    ]
    for r, overrides in zip(rows, swept(rows)):
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        status = status.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r['job']} | `{overrides}` | {test_cell(r)} | {r['steps']} | "
            f"{seconds_cell(r)} | {status} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def print_summary(rows: list[dict], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"metarun sweep: {sweep_dir}")
    for name in ("job", "overrides", "test (95% CI)", "steps", "time", "status"):
        table.add_column(name)
    for r, overrides in zip(rows, swept(rows)):
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r['error']}".rstrip(": ")
        table.add_row(r["job"], overrides, test_cell(r), str(r["steps"]), seconds_cell(r), status)
    Console(file=sys.stdout, width=160).print(table)


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
        if failed:
            print(
                f"metarun: {len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)}); "
                f"each one's error is in its folder's {ERROR_FILE} and in the table",
                file=sys.stderr,
            )
            sys.exit(1)
