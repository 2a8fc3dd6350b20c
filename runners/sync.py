"""`metarun sync`: upload offline wandb runs of whole sweeps and runs in one command.

    metarun sync outputs/multirun/2026-12-04/10-00-00      # every job and the summary run
    metarun sync outputs/2026-12-04/* --dry-run            # list what would be synced

Finds every `wandb/offline-run-*` folder under the given folders (a sweep's job folders,
its summary run, single runs) and hands them to `wandb sync` in one call.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
from pathlib import Path


def offline_runs(folders: list[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in folders:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for folder in map(Path, matches):
            if folder.name.startswith("offline-run-") and folder.is_dir():
                found.append(folder)
                continue
            found += sorted(p for p in folder.glob("**/wandb/offline-run-*") if p.is_dir())
    return list(dict.fromkeys(found))  # once each, in order


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="metarun sync", description="Upload the offline wandb runs under run or sweep folders."
    )
    parser.add_argument("folders", nargs="+", help="run or sweep folders (globs are fine)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, upload nothing")
    args = parser.parse_args(argv)
    runs = offline_runs(args.folders)
    if not runs:
        print(
            f"metarun sync: error: no offline wandb runs under {', '.join(args.folders)} "
            "(runs made with logger=wandb and no WANDB_API_KEY are offline)",
            file=sys.stderr,
        )
        sys.exit(2)
    for run in runs:
        print(run)
    if args.dry_run:
        print(f"{len(runs)} offline runs (--dry-run: nothing uploaded)")
        return
    wandb = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    sys.exit(subprocess.call([wandb, "sync", *map(str, runs)]))
