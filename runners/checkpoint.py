"""Checkpoints: everything needed to continue a run exactly, written atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from metarun.data.errors import CheckpointError
from metarun.runners.build import build_learner, preprocess_of


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash or a full disk mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a quota, a vanished mount
        previous = "the previous one is intact" if path.exists() else "there was none before"
        raise CheckpointError(
            f"could not write checkpoint {path} ({err.strerror or err}); {previous}. Free "
            "space (or fix the folder), then resume the run with resume=<run folder>"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)


def save_rotating(state: dict, folder: Path, step: int, keep: int) -> None:
    """Write step-<step>.pt atomically, make last.pt a second name (hard link) for it, then
    delete all but the newest `keep` step files. A failed write leaves the previous files."""
    folder = Path(folder)
    path = folder / f"step-{step:08d}.pt"
    save_atomic(state, path)
    link = folder / f".last.pt.link{os.getpid()}"
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # a file system without hard links: a second copy
        save_atomic(state, link)
    os.replace(link, folder / "last.pt")
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


def load(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint, with a clear error for a missing or unreadable file."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass ckpt= or resume= the path to a "
            "metarun .pt file (e.g. outputs/<date>/<time>/checkpoints/best.pt)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, pickle error, not a torch file...
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
            f"{err}); use another checkpoint (e.g. checkpoints/last.pt or best.pt)"
        ) from err
    missing = {"model", "config", "step"} - set(state) if isinstance(state, dict) else {"model"}
    if missing:
        raise CheckpointError(f"{path} is not a metarun checkpoint (missing {sorted(missing)})")
    state["path"] = str(path)
    return state


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_learner(ckpt: str | Path, device: str = "cpu"):
    """A learner with the checkpoint's weights, in eval mode.

    It carries `config` (the run's resolved config) and `preprocess` (image
    file -> tensor, as in training).
    """
    state = load(ckpt)
    cfg = OmegaConf.create(state["config"])
    learner = build_learner(cfg)
    try:
        learner.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {state['path']} does not match its own config "
            f"(algo={cfg.algo.get('_target_')}): {err}"
        ) from err
    learner.to(device).eval()
    learner.config = cfg
    learner.preprocess = preprocess_of(cfg.data)
    return learner
