"""Shared fixtures: an isolated decode cache, quiet wandb, and a CLI runner."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = Path(
    os.environ.get("METARUN_OMNIGLOT_DIR", REPO.parent / "shared" / "data" / "omniglot")
)
HAVE_OMNIGLOT = all((OMNIGLOT_DIR / f"images_background_small{i}.zip").is_file() for i in (1, 2))

CONF = REPO / "conf"
# the registry of learners: every conf/algo/*.yaml (a new learner's yaml puts it under every
# registry-parametrized test: contract, precision, resume)
REGISTRY = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))
# optional settings that make a learner quick enough for a test step (a learner without an
# entry runs with its own defaults)
SMALL = {
    "imaml": ["algo.inner_steps=2", "algo.cg_steps=2", "algo.test_inner_steps=2"],
    "reptile": ["algo.inner_steps=2", "algo.test_inner_steps=2"],
    "maml": ["algo.test_inner_steps=1"],
    "mann": ["algo.controller_size=32", "algo.memory_slots=16"],
    "siamese": ["algo.pairs_per_task=8"],
    "lstm_meta": ["algo.inner_steps=2", "backbone.hidden=8"],
}


# every option of every config group, and the settings some need to build with the
# default config (the every-config-composes tests)
OPTION_GROUPS = ("algo", "data", "backbone", "logger", "experiment")
OPTIONS = [(g, p.stem) for g in OPTION_GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
# options that need another setting to build with the default config
NEEDS = {
    ("backbone", "koch_siamese"): ["data.images.size=105"],  # designed for 105x105 images
    # regression: a learner with an output head and a vector backbone
    ("data", "sinusoid"): ["algo=maml", "backbone=mlp"],
    ("backbone", "mlp"): ["algo=maml", "data=sinusoid"],
    # no learned weights of its own: a learner around it has them
    ("backbone", "pixels"): ["algo=mann"],
    # the classifier's size over the training classes: the trainer sets it from the data
    ("algo", "baseline"): ["algo.num_classes=200"],
    ("algo", "baseline_pp"): ["algo.num_classes=200"],
    ("experiment", "baseline_omniglot_small_5w1s"): ["algo.num_classes=716"],
    ("experiment", "baseline_pp_omniglot_small_5w1s"): ["algo.num_classes=716"],
}


def learner_class(name: str) -> type:
    """The class conf/algo/<name>.yaml builds: its capability flags (inner_loop,
    supports_regression, ...) say which tests apply, not lists kept in the tests."""
    from hydra.utils import get_class

    return get_class(compose_with(f"algo={name}").algo._target_)


def configure(learner, lr: float):
    """Give `learner` the outer optimizer that its conf/algo yaml chooses (conf/optimizer/;
    Adam unless the yaml overrides it, e.g. Reptile's SGD) at learning rate `lr`, as the
    trainer would; Adam for a learner that no yaml builds."""
    import functools

    import torch
    from hydra.utils import instantiate

    target = f"{type(learner).__module__}.{type(learner).__qualname__}"
    name = next((n for n in REGISTRY if algo_target(n) == target), None)
    if name is None:
        return learner.configure_optimizer(functools.partial(torch.optim.Adam, lr=lr))
    cfg = compose_with(f"algo={name}", f"trainer.lr={lr}")
    return learner.configure_optimizer(instantiate(cfg.optimizer, _convert_="all"))


@functools.cache
def algo_target(name: str) -> str:
    return compose_with(f"algo={name}").algo._target_


def compose_with(*overrides: str):
    """The composed metarun config for these overrides (Hydra's compose API)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="metarun.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


# small, fast settings for CLI runs on the synthetic data
FAST = [
    "logger=none",
    "query=5",
    "trainer.steps=40",
    "trainer.meta_batch=2",
    "trainer.val_every=20",
    "trainer.val_episodes=20",
    "trainer.log_every=10",
    "eval.episodes=50",
    "device=cpu",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """One decode cache per test session (never ~/.cache, where only the compiled kernels
    go), and wandb off by default."""
    cache = tmp_path_factory.mktemp("cache")
    keys = ("METARUN_CACHE", "WANDB_MODE", "METARUN_DATA", "METARUN_KERNEL_CACHE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["METARUN_CACHE"] = str(cache)
    # the fused second-order kernels are compiled code, not data: build them once per torch
    # version, where a user's first run would, instead of once per test session
    os.environ.setdefault("METARUN_KERNEL_CACHE", str(Path.home() / ".cache/metarun/kernels"))
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.pop("METARUN_DATA", None)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_cli(
    *overrides: str, cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m metarun ...` in a subprocess, as a user would (env value None: unset)."""
    full_env = {**os.environ, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.run(
        [sys.executable, "-m", "metarun", *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"metarun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def learning_run(learner, steps: int, lr: float, meta_batch: int = 2, train_shot: int = 1):
    """Meta-train `learner` on synthetic 5-way tasks (train_shot shots, 5 queries per class).

    Returns its accuracy on 100 fixed synthetic 5-way 1-shot test episodes before
    and after (`evaluate`'s dict: acc, ci95, episodes) and the loss of every step.
    """
    from metarun.data import EpisodeSampler, FixedEpisodes
    from metarun.data.synthetic import synthetic

    sampler = EpisodeSampler(synthetic("train"), 5, train_shot, 5, seed=0)
    episodes = FixedEpisodes(synthetic("test"), 100, 5, 1, 5, seed=0)
    return train_and_score(learner, sampler, episodes, steps, lr, meta_batch)


def regression_run(learner, steps: int, lr: float, meta_batch: int = 4):
    """Meta-train `learner` on 10-shot sinusoid tasks; returns evaluate's dict (mse, ci95)
    on 100 fixed test tasks before and after, and the loss of every step."""
    from metarun.data.sinusoid import sinusoid

    sampler = sinusoid("train").episode_sampler(1, 10, 10, "cpu", seed=0)
    episodes = sinusoid("test").fixed_episodes(100, 1, 10, 10, seed=0)
    return train_and_score(learner, sampler, episodes, steps, lr, meta_batch)


def train_and_score(learner, sampler, episodes, steps: int, lr: float, meta_batch: int):
    from metarun.runners.evaluate import evaluate

    configure(learner, lr)
    before = evaluate(learner, episodes)
    losses = [
        float(learner.meta_train_step(sampler.sample(meta_batch))["loss"]) for _ in range(steps)
    ]
    return before, evaluate(learner, episodes), losses


def run_dirs(root: Path) -> list[Path]:
    """Run folders (those holding .hydra/) under an output root, oldest first."""
    return sorted((p.parent for p in Path(root).glob("**/.hydra")), key=lambda p: p.stat().st_mtime)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def two_threads():
    """Two intra-op threads, so batched="threads" makes two groups (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One short ProtoNet run on synthetic data, shared by the tests that need a checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    run_cli(*FAST, f"hydra.run.dir={root / 'run'}", cwd=root)
    return root / "run"


# the meta-learners (the contract, precision and resume tests run over them) and the
# continual learners (mode=continual), told apart by their classes' `continual` flag
ALGOS = [n for n in REGISTRY if not getattr(learner_class(n), "continual", False)]
CONTINUAL = [n for n in REGISTRY if getattr(learner_class(n), "continual", False)]
NEEDS.update({("algo", n): ["mode=continual"] for n in CONTINUAL})


def representation_checkpoint() -> Path:
    """An untrained algo=oml_meta checkpoint (conv4, synthetic glyphs) for the learners that
    start from one (algo=oml's representation=), written once per test session."""
    import tempfile

    import torch
    from omegaconf import OmegaConf

    from metarun.runners import checkpoint
    from metarun.runners.build import build_learner

    path = Path(tempfile.mkdtemp(prefix="metarun-representation-")) / "oml_meta.pt"
    cfg = compose_with("algo=oml_meta")
    torch.manual_seed(0)
    state = {
        "model": build_learner(cfg).state_dict(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "step": 0,
    }
    checkpoint.save_atomic(state, path)
    return path


REPRESENTATION = f"algo.representation={representation_checkpoint()}"
NEEDS[("algo", "oml")] = ["mode=continual", REPRESENTATION]
NEEDS[("experiment", "oml_omniglot_small_stream")] = [REPRESENTATION]
NEEDS[("experiment", "oml_pretrained_omniglot_small")] = ["algo.num_classes=716"]
