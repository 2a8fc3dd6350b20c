"""The outer optimizer is a config node (conf/optimizer/, a `_partial_` call) and gradient
clipping a trainer option: both are command-line overrides for every learner."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, compose_with, run_cli
from hydra.utils import instantiate

from metarun.errors import ConfigError
from metarun.runners.validate import validate


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], torch.optim.Adam),
        (["algo=reptile"], torch.optim.SGD),  # its yaml: the outer step theta + eps (phi - theta)
        (["algo=reptile", "optimizer=adam"], torch.optim.Adam),  # the command line wins
        (["experiment=mann_santoro2016_omniglot_5w10i"], torch.optim.RMSprop),
        (["algo=maml", "optimizer=rmsprop"], torch.optim.RMSprop),
    ],
)
def test_each_learner_yaml_chooses_its_optimizer_and_the_command_line_overrides_it(
    overrides, expected
):
    cfg = compose_with(*overrides, "trainer.lr=0.25")
    made = instantiate(cfg.optimizer, _convert_="all")([torch.nn.Parameter(torch.zeros(2))])
    assert type(made) is expected and made.param_groups[0]["lr"] == 0.25


def test_learners_with_a_papers_clipping_set_it_and_others_do_not():
    assert compose_with("algo=lstm_meta").trainer.grad_clip == 0.25
    assert compose_with("algo=mann").trainer.grad_clip == 10.0
    assert compose_with("algo=mann", "trainer.grad_clip=null").trainer.grad_clip is None
    assert compose_with("algo=protonet").trainer.grad_clip is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("+optimizer.momentun=0.9", "optimizer.momentun is not a setting of SGD"),
        ("optimizer.momentum=fast", "optimizer.momentum must be a number"),
        ("trainer.grad_clip=0", "trainer.grad_clip must be"),
        ("trainer.grad_clip=-1", "trainer.grad_clip must be"),
    ],
)
def test_bad_optimizer_settings_are_named_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_with("optimizer=sgd", override))


def test_cli_trains_with_the_chosen_optimizer_and_clipping(tmp_path):
    run_cli(
        *FAST,
        "trainer.steps=4",
        "trainer.val_every=2",
        "optimizer=sgd",
        "optimizer.momentum=0.9",
        "optimizer.nesterov=true",
        "trainer.grad_clip=0.5",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["nesterov"] is True
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert state["config"]["optimizer"]["_target_"] == "torch.optim.SGD"
    assert state["config"]["trainer"]["grad_clip"] == 0.5
