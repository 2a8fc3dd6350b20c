"""Run folders: every run writes into a folder of its own, taken atomically.

Hydra names a run's folder by the second it started, so two runs started in the same
second would share one folder, and `hydra.run.dir=` may name a folder that already holds
a run. Before Hydra writes anything, the `RunFolder` callback (conf/hydra/default.yaml)
takes the folder for this process:

- a new folder is taken by creating its marker file `.metarun-run` with O_EXCL, so of two
  processes racing for one name exactly one gets it; the loser of a default (timestamped)
  name takes the next free `<name>-2`, `<name>-3`, ...;
- a folder that already holds a run is refused when it was asked for by name
  (`hydra.run.dir=`, `hydra.sweep.dir=`), unless `paths.if_exists=new`, which takes the next
  free numbered folder beside it;
- the process holding a folder keeps a lock on its marker (flock) while it runs, so a
  `resume=` of a run that is still going is refused instead of mixing two writers. The
  lock dies with the process, kill -9 included.

`resume=` (a run folder, or `auto`) makes Hydra write into the resumed run's folder: its
log continues there, and this invocation's Hydra files go to `.hydra/resume-<time>/`.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from metarun.errors import ConfigError, MetarunError
from metarun.runners import distributed
from metarun.runners.files import os_error

MARKER = ".metarun-run"
RESUMES = ("train", "continual")  # the modes that resume= continues
# what a folder holds once a run or a sweep has used it (older runs have no marker)
RUN_FILES = (
    MARKER,
    ".hydra",
    "checkpoints",
    "metrics.jsonl",
    "results.json",
    "multirun.yaml",
    "summary.csv",
)
IF_EXISTS = ("refuse", "new")
RUN_WHERE = "run folders are chosen with paths.output_root=DIR or hydra.run.dir=DIR"
MAX_NUMBER = 10_000

_locks: dict[Path, int] = {}  # folder -> the open marker this process holds a lock on


class FolderTaken(ConfigError):
    """The folder holds another run."""


def holds_run(folder: Path) -> bool:
    """A run's folder, or a sweep's (whose job folders hold runs)."""
    if any((folder / name).exists() for name in RUN_FILES):
        return True
    try:
        return any(
            (job / ".hydra").exists() or (job / MARKER).exists()
            for job in folder.iterdir()
            if job.is_dir()
        )
    except OSError:
        return False


def claim(folder: Path) -> Path:
    """Take an empty or new `folder` for this process; FolderTaken when it holds a run or
    another process took it first."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error(err, f"cannot create the run folder {folder}", RUN_WHERE) from err
    if holds_run(folder):
        raise FolderTaken(f"{folder} already holds a run")
    try:
        fd = os.open(folder / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError as err:  # another process won the race for this name
        raise FolderTaken(f"{folder} was taken by another run") from err
    except OSError as err:
        raise os_error(err, f"cannot write in the run folder {folder}", RUN_WHERE) from err
    hold(folder, fd)
    return folder


def claim_numbered(folder: Path) -> Path:
    """`folder` if it is free, else the first free `folder-2`, `folder-3`, ..."""
    for n in range(1, MAX_NUMBER):
        candidate = folder if n == 1 else folder.with_name(f"{folder.name}-{n}")
        try:
            return claim(candidate)
        except FolderTaken:
            continue
    raise ConfigError(
        f"no free folder named {folder}-N (N < {MAX_NUMBER}); clean up {folder.parent}"
    )


def acquire(folder: Path) -> Path:
    """Take an existing run folder (to continue its run): refused while another process
    holds it."""
    try:
        fd = os.open(folder / MARKER, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
        raise os_error(err, f"cannot open the run folder {folder}") from err
    try:
        hold(folder, fd)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"the run in {folder} is still running ({holder(folder)}); wait for it to end or "
            "stop it (Ctrl-C or kill: it writes its checkpoint), then resume"
        ) from None
    return folder


def hold(folder: Path, fd: int) -> None:
    """Lock the marker (non-blocking) and record who holds the folder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:  # a file system without locks (some network mounts): no lock
        pass
    who = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": sys.argv,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(who) + "\n").encode(), 0)
    _locks[folder.resolve()] = fd


def release(folder: Path) -> None:
    fd = _locks.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


def holder(folder: Path) -> str:
    try:
        who = json.loads((folder / MARKER).read_text())
        return f"pid {who['pid']} on {who['host']} since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def taken_message(folder: Path, key: str, resumable: bool) -> str:
    hint = f", or continue it with resume={folder}" if resumable else ""
    return (
        f"{key}={folder} already holds a run; metarun never writes into another run's folder. "
        f"Choose another folder, or add paths.if_exists=new to write into the next free "
        f"{folder.name}-N beside it{hint}"
    )


# ------------------------------------------------------------------ the Hydra callback


def hydra_override_value(path: Path) -> str:
    """A path as a quoted value for Hydra's override grammar."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def asked_for(config: DictConfig, key: str) -> bool:
    """Whether the user named this folder (hydra.run.dir=...) rather than taking the
    default, timestamped one."""
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


def take(config: DictConfig, key: str) -> Path:
    """The folder `key` names, taken for this run (numbered if it is the default)."""
    folder = Path(str(config.hydra[key.split(".")[1]].dir))
    if not asked_for(config, key) or config.paths.get("if_exists", "refuse") == "new":
        return claim_numbered(folder)
    try:
        return claim(folder)
    except FolderTaken:
        raise ConfigError(
            taken_message(folder, key, (folder / "checkpoints" / "last.pt").exists())
        ) from None


def check_if_exists(config: DictConfig) -> None:
    value = config.paths.get("if_exists", "refuse")
    if value not in IF_EXISTS:
        raise ConfigError(f"paths.if_exists={value!r}; choose refuse or new")


def set_hydra(config: DictConfig, key: str, value) -> None:
    with read_write(config.hydra), open_dict(config.hydra):
        node, leaf = key.split(".")[1:-1], key.split(".")[-1]
        target = config.hydra
        for part in node:
            target = target[part]
        target[leaf] = value


def user_errors_exit(fn):
    """Hydra prints a traceback for an exception raised in a callback: print the message."""

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MetarunError as err:
            print(f"metarun: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapped


class RunFolder(Callback):
    """Takes the run folder (or a sweep's folder) before Hydra writes into it."""

    @user_errors_exit
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not distributed.is_main():  # other torchrun ranks use rank 0's folder
            return
        check_if_exists(config)
        own = Path(str(config.hydra.run.dir))
        resume = config.get("resume") if config.get("mode", "train") in RESUMES else None
        ckpt = resume_checkpoint(
            resume, list(config.hydra.overrides.task), Path(config.paths.output_root), own
        )
        run = run_folder_of(ckpt) if ckpt is not None else None
        if resume == "auto":  # the job reads the run found here (None: a fresh run)
            with read_write(config), open_dict(config):
                config.resume = str(run or ckpt) if ckpt is not None else None
        if run is not None:  # continue the run in its own folder, log included
            acquire(run)
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            set_hydra(config, "hydra.run.dir", str(run))
            set_hydra(config, "hydra.output_subdir", f".hydra/resume-{stamp}")
            return
        set_hydra(config, "hydra.run.dir", str(take(config, "hydra.run.dir")))

    @user_errors_exit
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_if_exists(config)
        folder = take(config, "hydra.sweep.dir")
        # every job's config is composed again from these overrides (and the launcher reads
        # hydra.sweep.dir from this one), so both must name the folder taken here
        set_hydra(config, "hydra.sweep.dir", str(folder))
        with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={hydra_override_value(folder)}")


def take_job_folder(run_dir: Path, requeued: bool) -> None:
    """A sweep's job folder (inside the sweep folder taken above) becomes this job's. A job
    that submitit requeued runs again in its own folder and takes it over."""
    if requeued:
        acquire(run_dir)
        return
    try:
        fd = os.open(run_dir / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ConfigError(f"the job folder {run_dir} already holds a run") from None
    except OSError as err:
        raise os_error(err, f"cannot write in the job folder {run_dir}") from err
    hold(run_dir, fd)


def in_use(folder: Path) -> bool:
    """Whether another process holds the run folder now."""
    if Path(folder).resolve() in _locks:
        return True
    try:
        fd = os.open(folder / MARKER, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ------------------------------------------------------------------ resume targets


def read_overrides(run: Path) -> list[str]:
    try:
        return yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return []


def same_overrides(a: list[str], b: list[str]) -> bool:
    """The same run, up to settings a resume may change (trainer.steps, paths, logger...)."""
    from metarun.runners.trainer import may_change

    def norm(items):
        return sorted(o for o in items if not may_change(o.split("=", 1)[0].lstrip("+~")))

    return norm(a) == norm(b)


def find_resumable(output_root: Path, wanted: list[str]) -> Path | None:
    """The newest run folder under output_root launched with the same overrides that has a
    last.pt and that no other process is running."""
    best = None
    for file in Path(output_root).glob("**/.hydra/overrides.yaml"):
        run = file.parent.parent
        last = run / "checkpoints" / "last.pt"
        if not last.exists() or in_use(run):
            continue
        if same_overrides(read_overrides(run), wanted):
            if best is None or last.stat().st_mtime > best.stat().st_mtime:
                best = last
    return best.parent.parent if best is not None else None


def checkpoint_of(resume: str) -> Path:
    """The checkpoint `resume=` names: a .pt file, or a run folder's checkpoints/last.pt."""
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise ConfigError(
                f"resume={path}: this folder has no checkpoints/last.pt (the run stopped before "
                "its first checkpoint, or it is not a run folder); start the run again without "
                "resume=, or point resume= at a .pt file"
            )
        return last
    if not path.is_file():
        raise ConfigError(
            f"resume={path} does not exist; give a run folder (outputs/<date>/<time>) or a "
            "checkpoint file, or resume=auto"
        )
    return path


def run_folder_of(ckpt: Path) -> Path | None:
    """The run folder a checkpoint belongs to (<run>/checkpoints/x.pt), or None for a loose
    checkpoint file: resuming from that starts a new run folder."""
    run = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and holds_run(run) and run != ckpt.parent:
        return run
    return None


def requeued(run_dir: Path) -> bool:
    """A job that submitit (the submitit_local / slurm_gpu launchers) started again after a
    pre-emption or a time-out: it runs in the same job folder, which holds its last.pt."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR")) and (run_dir / "checkpoints/last.pt").exists()


def resume_checkpoint(resume, overrides: list[str], output_root: Path, own: Path) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh run."""
    if resume == "auto":
        found = find_resumable(output_root, overrides)
        return found / "checkpoints" / "last.pt" if found is not None else None
    if resume:
        return checkpoint_of(resume)
    if requeued(own):
        return own / "checkpoints" / "last.pt"
    return None
