"""trainer.amp (bf16, fp16) and trainer.compile on the CPU: every learner either trains with
them or refuses with a message that says why and what to use instead."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import ALGOS, FAST, SMALL, compose_with, configure, learner_class, run_cli

from metarun.data import EpisodeSampler
from metarun.data.synthetic import synthetic
from metarun.errors import ConfigError
from metarun.runners.build import build_learner


def small_learner(name: str):
    # small settings so that one step of every learner is quick
    cfg = compose_with(f"algo={name}", "way=5", *SMALL.get(name, []))
    if "num_classes" in cfg.algo:  # the trainer takes it from the data (synthetic: 200)
        cfg.algo.num_classes = 200
    torch.manual_seed(0)
    return build_learner(cfg)


def episodes():
    return EpisodeSampler(synthetic("train"), 5, 1, 2, seed=0).sample(2)


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ALGOS)
def test_every_learner_takes_a_mixed_precision_step_or_says_why_not(name, amp):
    learner = small_learner(name)
    if amp == "fp16" and learner.inner_loop:
        with pytest.raises(ConfigError, match="inner-loop gradients are not loss-scaled.*bf16"):
            learner.set_precision(amp)
        return
    learner.set_precision(amp)
    configure(learner, 1e-3)
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    ep = episodes()
    # fp16: the loss scaler skips the update of a step whose scaled gradients overflow and
    # lowers the scale, so the first steps may change nothing
    for _ in range(1 if amp == "bf16" else 20):
        out = learner.meta_train_step(ep)
        assert torch.isfinite(out["loss"]), out
        changed = [k for k, v in learner.named_parameters() if not torch.equal(v, before[k])]
        if changed:
            break
    assert changed, "no step updated a weight"
    # parameters stay float32 (autocast only computes in low precision)
    assert {p.dtype for p in learner.parameters()} == {torch.float32}
    learner.eval()
    with torch.no_grad(), learner.autocast():
        logits = learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)
    assert logits.shape == (2, 10, 5) and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("name", [n for n in ALGOS if learner_class(n).inner_loop])
def test_compile_is_refused_for_learners_with_an_inner_loop(name):
    with pytest.raises(ConfigError, match="trainer.compile=true is not supported by"):
        small_learner(name).compile_network()


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
def test_a_compiled_run_trains_and_its_checkpoint_loads_without_compilation(tmp_path):
    run = tmp_path / "run"
    run_cli(
        *FAST,
        "trainer.steps=4",
        "trainer.val_every=2",
        "trainer.compile=true",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        timeout=600,
    )
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert not any("_orig_mod" in k for k in state["model"])  # compiled in place: same names
    test = run_cli("mode=test", f"ckpt={run}", "eval.episodes=20", cwd=tmp_path)
    assert "test accuracy" in test.stderr + test.stdout
