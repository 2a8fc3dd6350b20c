"""Every learner resumes exactly: a 4-step run stopped by SIGTERM after step 2 and resumed
ends as the uninterrupted run (bit-identical weights, optimizer state and results, CPU)."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from conftest import ALGOS, SMALL, compose_with

from metarun.errors import StoppedError
from metarun.runners.trainer import Trainer


def config(name: str, steps: int):
    return compose_with(
        f"algo={name}",
        *SMALL.get(name, []),
        "logger=none",
        "query=2",
        f"trainer.steps={steps}",
        "trainer.meta_batch=2",
        "trainer.val_every=2",
        "trainer.val_episodes=4",
        "trainer.log_every=1",
        "eval.episodes=4",
        "device=cpu",
    )


class SignalledAfterStep2(Trainer):
    """A run that receives SIGTERM while in its second step (as from a cluster)."""

    def after_step(self, window, logger):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().after_step(window, logger)


@pytest.mark.parametrize("name", ALGOS)
def test_every_learner_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, name):
    device = torch.device("cpu")
    whole = Trainer(config(name, 4), tmp_path / "whole", device)
    whole_results = whole.fit()
    with pytest.raises(StoppedError, match="interrupted by SIGTERM at step 2 of 4"):
        SignalledAfterStep2(config(name, 4), tmp_path / "part", device).fit()
    resumed = Trainer(config(name, 4), tmp_path / "part", device)
    resumed_results = resumed.fit(resume_from=tmp_path / "part" / "checkpoints" / "last.pt")
    a, b = whole.learner.state_dict(), resumed.learner.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), name
    final_a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)
    final_b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)
    assert final_a["step"] == final_b["step"] == 4
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])
    opt_a, opt_b = final_a["optimizer"]["state"], final_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        assert all(
            torch.equal(torch.as_tensor(opt_a[k][s]), torch.as_tensor(opt_b[k][s]))
            for s in opt_a[k]
        )
    drop = ("seconds",)
    assert {k: v for k, v in resumed_results.items() if k not in drop} == {
        k: v for k, v in whole_results.items() if k not in drop
    }
    assert json.loads((tmp_path / "part" / "results.json").read_text())["steps"] == 4


def test_a_run_resumed_with_more_steps_follows_the_new_schedule(tmp_path):
    """Reptile's linear schedule: a 2-step run resumed to 4 steps takes its third step at
    the 4-step schedule's rate (1 - 2/4), not the 2-step schedule's (0)."""
    device = torch.device("cpu")
    Trainer(config("reptile", 2), tmp_path / "run", device).fit()
    longer = Trainer(config("reptile", 4), tmp_path / "run", device)
    longer.restore(tmp_path / "run" / "checkpoints" / "last.pt")
    assert longer.step == 2
    (lr,) = [g["lr"] for g in longer.learner.optimizer.param_groups]
    assert math.isclose(lr, 0.5) and math.isclose(longer.schedule.get_last_lr()[0], 0.5)
