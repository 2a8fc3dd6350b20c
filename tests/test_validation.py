"""Every setting is checked for type, range and finiteness before any work, and every
problem is named at once (runners/validate.py)."""

from __future__ import annotations

import copy

import pytest
from conftest import FAST, NEEDS, OPTIONS, compose_with, run_cli
from hydra.utils import get_method
from omegaconf import OmegaConf

from metarun.errors import ConfigError
from metarun.runners.validate import GROUPS, KNOBS, parameters, validate


def refusal(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(compose_with(*overrides))
    return str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.lr=abc"], "trainer.lr must be a number, got 'abc'"),
        (["trainer.lr=inf"], "trainer.lr must be a finite number, got inf"),
        (["trainer.lr=nan"], "trainer.lr must be a finite number, got nan"),
        (["trainer.lr=-0.1"], "trainer.lr must be positive, got -0.1"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["seed=1.5"], "seed must be an integer, got 1.5"),
        (["seed=-1"], "seed must be an integer from 0 to 2**63-1"),
        (["eval.seed=abc"], "eval.seed must be an integer, got 'abc'"),
        (["trainer.decay_factor=abc"], "trainer.decay_factor must be a number, got 'abc'"),
        (["trainer.decay_factor=1.5"], "trainer.decay_factor must be in (0, 1], got 1.5"),
        (["trainer.schedule=step"], "trainer.schedule=step needs trainer.decay_every"),
        (["trainer.decay_every=0"], "trainer.decay_every must be a positive integer, got 0"),
        (["eval.batch=-1"], "eval.batch must be a positive integer, got -1"),
        (["eval.episodes=0"], "eval.episodes must be a positive integer, got 0"),
        (["trainer.meta_batch=2.5"], "trainer.meta_batch must be an integer, got 2.5"),
        (["trainer.compile=yes"], "trainer.compile must be true or false, got 'yes'"),
        (["tf32=1"], "tf32 must be true or false, got 1"),
        (["way=1"], "way=1: a 1-way classification task has one possible answer"),
        (["eval.way=1"], "eval.way=1: a 1-way classification task"),
        (["paths.if_exists=overwrite"], "paths.if_exists='overwrite'; choose refuse, new"),
        (["+trainer.lrr=0.1"], "trainer.lrr is not a metarun setting"),
        (["+sead=3"], "sead is not a metarun setting"),
        (["way=${nope}"], "the config cannot be resolved"),
        (["logger=wandb", "logger.mode=sometimes"], "logger.mode='sometimes'; choose auto"),
        (["logger=wandb", "logger.tags=5"], "logger.tags must be a list of texts"),
        (["algo=maml", "algo.inner_lr=abc"], "algo.inner_lr must be a number, got 'abc'"),
        (["algo=maml", "algo.inner_lr=0"], "algo.inner_lr must be positive, got 0"),
        (["algo=maml", "algo.inner_steps=2.5"], "algo.inner_steps must be an integer, got 2.5"),
        (["algo=maml", "algo.first_order=maybe"], "algo.first_order must be true or false"),
        (["algo=maml", "algo.test_inner_steps=-1"], "algo.test_inner_steps must be at least 0"),
        (["algo=imaml", "algo.lam=nan"], "algo.lam must be a finite number, got nan"),
        (["algo=reptile", "algo.inner_lr=-1"], "algo.inner_lr must be positive, got -1"),
        (["algo=mann", "algo.gamma=2"], "algo.gamma must be in [0, 1], got 2"),
        (["algo=baseline", "algo.finetune_momentum=1"], "algo.finetune_momentum must be in [0, 1)"),
        (["algo=lstm_meta", "algo.forget_bias=[1]"], "algo.forget_bias must be a list of 2 values"),
        (["+algo.inner_lrr=0.1"], "algo.inner_lrr is not a setting of ProtoNet"),
        (["backbone.hidden=-3"], "backbone.hidden must be a positive integer, got -3"),
        (["backbone.hidden=[64]"], "backbone.hidden must be an integer, got [64]"),
        (["data.images.size=0"], "data.images.size must be a positive integer, got 0"),
        (["data.rotations=3"], "data.rotations=3; choose 1, 2, 4"),
        (["data.rotations=4.0"], "data.rotations=4.0; choose 1, 2, 4"),
        (["data.samples=abc"], "data.samples must be an integer"),
        (["data.seed=-4"], "data.seed must be at least 0, got -4"),
        (["data.images.channels=2"], "data.images.channels=2; choose 1, 3"),
        (
            ["algo=maml", "data=sinusoid", "backbone=mlp", "backbone.hidden=[40,-1]"],
            "backbone.hidden[1] must be a positive integer, got -1",
        ),
    ],
)
def test_a_bad_setting_is_refused_before_any_work_naming_it(overrides, message):
    assert message in refusal(*overrides)


def test_every_problem_is_named_at_once():
    text = refusal("trainer.lr=abc", "seed=1.5", "eval.batch=-1", "backbone.hidden=0")
    assert text.startswith("4 settings cannot work")
    for key in ("trainer.lr", "seed", "eval.batch", "backbone.hidden"):
        assert f"\n  {key} must" in text


def test_every_top_level_knob_is_checked():
    """The table covers conf/config.yaml: no knob goes unchecked, none is listed in vain."""
    from metarun.runners.validate import flat, resolved

    knobs = {k for k in flat(resolved(compose_with())) if k not in GROUPS}
    assert knobs == set(KNOBS)


def wrong_type(value):
    """A value of the wrong type for a setting whose default is `value`."""
    if isinstance(value, bool):
        return 1.5
    return 5 if isinstance(value, str) else "abc"


@pytest.mark.parametrize(
    ("group", "name"), [(g, n) for g, n in OPTIONS if g in ("algo", "backbone", "data")]
)
def test_every_configurable_setting_of_every_option_is_type_checked(group, name):
    """Derived from the signatures: each number, switch or text setting of each learner,
    backbone and data set, set to a value of the wrong type, is refused with its name."""
    base = [f"{group}={name}", *NEEDS.get((group, name), [])]
    cfg = compose_with(*base)
    node = cfg[group]
    params, _, _ = parameters(get_method(node._target_))
    checked = []
    for key in node:
        value = node[key]
        if key not in params or not isinstance(value, bool | int | float | str):
            continue
        if key in ("root", "split"):  # a path, and the loader's own argument
            continue
        with pytest.raises(ConfigError, match=rf"{group}\.{key}( must|=)"):
            other = copy.deepcopy(cfg)  # as the override {group}.{key}=<wrong> would give
            OmegaConf.update(other, f"{group}.{key}", wrong_type(value))
            validate(other)
        checked.append(key)
    # every setting the node holds is checked (an option with no settings has none to check)
    scalar = [
        k
        for k in node
        if k in params
        and isinstance(node[k], bool | int | float | str)
        and k not in ("root", "split")
    ]
    assert checked == scalar, node


def test_the_cli_refuses_bad_settings_with_no_traceback_and_writes_no_checkpoint(tmp_path):
    proc = run_cli(
        *FAST,
        "trainer.lr=abc",
        "seed=1.5",
        "eval.batch=-1",
        "way=1",
        f"paths.output_root={tmp_path / 'out'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for message in ("trainer.lr must be a number", "seed must be an integer", "eval.batch must"):
        assert message in proc.stderr
    assert "way=1: a 1-way classification task" in proc.stderr
    assert not list((tmp_path / "out").rglob("*.pt"))
