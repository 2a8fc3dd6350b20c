"""Checkpoints: everything needed to continue a run exactly, written atomically."""

from __future__ import annotations

import functools
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import ListConfig, OmegaConf

from metarun.errors import CheckpointError
from metarun.runners.build import WHERE_DATA_IS, build_learner, choice, describes, preprocess_of
from metarun.runners.files import reason_and_fix, temp_name


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash, a signal or a full disk mid-write leaves the previous file intact (a temp
    file left by kill -9 is removed at the next start: `remove_stale_temps`).
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk: torch's zip writer raises RuntimeError
        raise CheckpointError(write_failure(path, err)) from err
    finally:
        tmp.unlink(missing_ok=True)


def write_failure(path: Path, err: BaseException) -> str:
    """What failed, that nothing older was lost, and what to do."""
    reason, fix = reason_and_fix(err) if isinstance(err, OSError) else (str(err), "fix the folder")
    kept = (
        f"the previous {path.name} is intact"
        if path.exists()
        else f"there was no {path.name} before"
    )
    then = (
        f"then continue the run with resume={path.parent.parent}"
        if (path.parent / "last.pt").exists()
        else "then start the run again (it has no checkpoint to resume from yet)"
    )
    return f"could not write checkpoint {path}: {reason}; {kept}. {fix.capitalize()}, {then}"


def save_rotating(state: dict, folder: Path, step: int, keep: int) -> None:
    """Write step-<step>.pt atomically, make last.pt a second name (hard link) for it, then
    delete all but the newest `keep` step files. A failed write leaves the previous files."""
    folder = Path(folder)
    path = folder / f"step-{step:08d}.pt"
    save_atomic(state, path)
    link = temp_name(folder / "last.pt")
    try:
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links: a second copy
            save_atomic(state, link)
        os.replace(link, folder / "last.pt")
    except OSError as err:
        link.unlink(missing_ok=True)
        raise CheckpointError(write_failure(folder / "last.pt", err)) from err
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


# ------------------------------------------------------------------ reading

# A checkpoint holds tensors and plain data (dicts, lists, numbers, strings), which
# torch.load(weights_only=True) reads without running any code. Checkpoints written before
# the RNG state was stored as plain data also hold numpy's RNG state as an array: numpy's
# array reconstruction is allowed for them (it builds arrays, it cannot call anything else).
NUMPY_GLOBALS = ("_reconstruct", "ndarray", "dtype", "UInt32DType")
TRUST_HINT = (
    "If you made this file yourself or trust where it came from, add trust_checkpoint=true "
    "(in Python: metarun.load(path, trust=True))"
)


def numpy_globals() -> list:
    """numpy's array-reconstruction names, under numpy 2's module path and numpy 1's."""
    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    found = [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None and hasattr(dtypes, "UInt32DType"):
        found.append(dtypes.UInt32DType)
    return found


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file: the path itself, or a run folder's checkpoints/best.pt."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass ckpt= or resume= the path to a "
            "metarun .pt file (e.g. outputs/<date>/<time>/checkpoints/best.pt)"
        )
    return path


def load(path: str | Path, map_location="cpu", trust: bool = False) -> dict:
    """Read a checkpoint without running code from it (trust=True: any pickle, for a file
    the user vouches for), with a clear error for a missing, unsafe or unreadable file."""
    path = find_checkpoint(path)
    try:
        if trust:
            state = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(numpy_globals()):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = None if trust else unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that a metarun checkpoint never "
                f"holds ({', '.join(unsafe)}); loading it could run code, so it was not "
                f"loaded. {TRUST_HINT}"
            ) from err
        raise corrupt(path, err) from err
    except Exception as err:  # truncated zip, not a torch file...
        raise corrupt(path, err) from err
    missing = {"model", "config", "step"} - set(state) if isinstance(state, dict) else {"model"}
    if missing:
        raise CheckpointError(f"{path} is not a metarun checkpoint (missing {sorted(missing)})")
    if not trust:
        check_targets(state["config"], path)
    state["path"] = str(path)
    return state


def check_targets(config, path: Path) -> None:
    """A checkpoint's config is turned into objects by calling its `_target_`s, so a file
    could name any function: only the targets of metarun's own configs are accepted."""
    foreign = sorted(set(targets_in(config)) - known_targets())
    if foreign:
        raise CheckpointError(
            f"checkpoint {path} names callables that no metarun config uses "
            f"({', '.join(map(str, foreign))}); building its learner or data would call them, so "
            f"it was not loaded. {TRUST_HINT}"
        )


def targets_in(node) -> list:
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [t for v in node.values() for t in targets_in(v)]
    if isinstance(node, list | tuple):
        return [t for v in node for t in targets_in(v)]
    return []


@functools.lru_cache(maxsize=1)
def known_targets() -> frozenset[str]:
    """Every `_target_` in the algo, backbone, data and optimizer configs installed with
    metarun."""
    import metarun.conf

    root = Path(metarun.conf.__file__).parent
    found = set()
    for group in ("algo", "backbone", "data", "optimizer"):
        for file in root.glob(f"{group}/*.yaml"):
            found.update(targets_in(yaml.safe_load(file.read_text()) or {}))
    return frozenset(found)


def corrupt(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}); use another checkpoint "
        "(e.g. checkpoints/last.pt or best.pt)"
    )


def unsafe_globals(path: Path) -> list[str]:
    """The names a checkpoint's pickle would import that weights_only loading refuses."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return ["objects other than tensors and plain data"]
    try:
        names = finder(path)
    except Exception:  # not a readable zip: corrupt, not unsafe
        return []
    allowed = {"numpy.dtype", "numpy.ndarray"}
    return sorted(
        n for n in names if n not in allowed and not n.endswith("multiarray._reconstruct")
    ) or (["objects other than tensors and plain data"] if names else [])


# ------------------------------------------------------------------ random number generators


def rng_state() -> dict:
    """Every generator's state as tensors and plain data (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        keys = numpy["keys"].numpy().astype(np.uint32)
        numpy = (numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    np.random.set_state(numpy)
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def paths_of(ckpt) -> list[str]:
    """ckpt= as a list: one path, or several (an ensemble, ckpt=[RUN_A,RUN_B])."""
    if isinstance(ckpt, (list, tuple, ListConfig)):
        return [str(c) for c in ckpt]
    return [str(ckpt)]


def load_states(ckpt, trust: bool = False) -> list[dict]:
    """Every checkpoint ckpt= names (see paths_of), read with `load`; several must make an
    ensemble (check_members)."""
    paths = paths_of(ckpt)
    if not paths:
        raise CheckpointError("ckpt=[] names no checkpoint; give one path, or several: ckpt=[A,B]")
    states = [load(path, trust=trust) for path in paths]
    if len(states) > 1:
        check_members(states)
    return states


def check_members(states: list[dict]) -> None:
    """The checkpoints of an ensemble: distinct files, classification learners trained on
    the same data set with the same image settings (so one test set and one preprocessing
    serve them all)."""

    def data_of(state):
        data = dict(state["config"].get("data") or {})
        return {k: v for k, v in data.items() if k not in WHERE_DATA_IS}

    first, expected = states[0], data_of(states[0])
    seen = set()
    for state in states:
        if state["path"] in seen:
            raise CheckpointError(
                f"ckpt= lists {state['path']} twice; an ensemble's members are distinct "
                "checkpoints (e.g. one preset trained under several seeds)"
            )
        seen.add(state["path"])
        data = data_of(state)
        if data != expected:
            differ = sorted(k for k in set(data) | set(expected) if data.get(k) != expected.get(k))
            raise CheckpointError(
                f"the checkpoints of an ensemble must be trained on the same data with the same "
                f"image settings; {state['path']} differs from {first['path']} in data."
                f"{', data.'.join(differ)}. Test them apart, or train the members alike"
            )
    config = OmegaConf.create(first["config"])
    if describes(config.data, "task", "classification") == "regression":
        raise CheckpointError(
            f"an ensemble averages the members' class probabilities; data="
            f"{choice(config, 'data')} is regression: test each checkpoint on its own"
        )


def ensemble_of(states: list[dict], device: str = "cpu"):
    """An Ensemble of the checkpoints' learners, in eval mode, with the first member's
    `config` and `preprocess` (check_members makes them the same for all)."""
    from metarun.algorithms.ensemble import Ensemble

    members = [load_learner(state, device=device) for state in states]
    learner = Ensemble(members).to(device).eval()
    learner.config, learner.preprocess = members[0].config, members[0].preprocess
    return learner


def load_learner(ckpt, device: str = "cpu", trust: bool = False):
    """A learner with the checkpoint's weights, in eval mode.

    It carries `config` (the run's resolved config) and `preprocess` (image
    file -> tensor, as in training). trust=True: see `load`. Several checkpoints
    (ckpt=[A,B,...]) give their Ensemble.
    """
    if not isinstance(ckpt, dict):
        states = load_states(ckpt, trust=trust)
        if len(states) > 1:
            return ensemble_of(states, device)
        ckpt = states[0]
    state = ckpt
    cfg = OmegaConf.create(state["config"])
    # arguments the training data supplied (Baseline's num_classes); checkpoints written
    # before they were recorded apart carry them in the config
    learner = build_learner(cfg, **state.get("from_data", {}))
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
