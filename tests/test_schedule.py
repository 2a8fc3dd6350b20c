"""Learning-rate schedules of the trainer (trainer.schedule)."""

from __future__ import annotations

import pytest
import torch

from metarun.errors import ConfigError
from metarun.runners.trainer import lr_schedule


def lrs(kind, steps, n, **kw):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = lr_schedule(optimizer, kind, steps, **kw)
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_step_schedule_multiplies_the_lr_every_decay_every_steps():
    got = lrs("step", 10, 7, decay_every=3, decay_factor=0.5)
    assert got == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])


def test_cosine_decays_to_zero_and_constant_stays():
    cosine = lrs("cosine", 4, 5)
    assert cosine[0] == pytest.approx(0.1) and cosine[2] == pytest.approx(0.05)
    assert cosine[4] == pytest.approx(0.0, abs=1e-12)
    assert lrs("constant", 4, 3) == pytest.approx([0.1] * 3)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({}, "trainer.decay_every"),
        ({"decay_every": 0}, "trainer.decay_every"),
        ({"decay_every": 5, "decay_factor": 1.5}, "trainer.decay_factor"),
    ],
)
def test_step_schedule_settings_are_checked(kw, message):
    with pytest.raises(ConfigError, match=message):
        lrs("step", 10, 1, **kw)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ConfigError, match="constant, cosine, linear or step"):
        lrs("exponential", 10, 1)


def test_linear_anneals_to_zero():
    assert lrs("linear", 4, 6) == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0, 0.0])
