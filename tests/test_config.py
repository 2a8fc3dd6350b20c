"""Every config in conf/ composes, and its `_target_` builds."""

from __future__ import annotations

import pytest
from conftest import CONF, NEEDS, OPTIONS, compose_with
from omegaconf import OmegaConf

from metarun.runners.build import build_learner, build_store
from metarun.runners.validate import validate


def test_the_default_config_is_protonet_on_synthetic():
    cfg = compose_with()
    assert cfg.algo._target_.endswith("ProtoNet") and cfg.data._target_.endswith("synthetic")
    assert cfg.mode == "train"
    assert (cfg.eval.way, cfg.eval.shot, cfg.eval.query) == (cfg.way, cfg.shot, cfg.query)
    assert cfg.eval.episodes == 600
    validate(cfg)


@pytest.mark.parametrize("group,name", OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_every_config_composes_and_builds(group, name):
    cfg = compose_with(f"{group}={name}", *NEEDS.get((group, name), []))
    OmegaConf.resolve(cfg)  # every interpolation resolves
    validate(cfg)
    learner = build_learner(cfg)
    assert sum(p.numel() for p in learner.parameters()) > 0
    if group == "data":
        # the loader exists and accepts these arguments (no files needed to check that)
        assert callable(
            __import__("hydra.utils", fromlist=["get_method"]).get_method(cfg.data._target_)
        )


NODES = [
    (g, p.stem)
    for g in ("algo", "backbone", "data", "optimizer")
    for p in sorted((CONF / g).glob("*.yaml"))
]


@pytest.mark.parametrize("group,name", NODES, ids=[f"{g}={n}" for g, n in NODES])
def test_every_node_is_exactly_the_call_it_makes(group, name):
    """No key that its callable does not take (no name, no descriptors to strip): nested
    calls (a data set's `images`) likewise; the learner is named by the group choice."""
    import inspect

    from hydra.utils import get_method

    def check(node, where):
        target = get_method(node["_target_"])
        params = inspect.signature(
            target.__init__ if inspect.isclass(target) else target
        ).parameters
        for key, value in node.items():
            if key in ("_target_", "_partial_"):
                continue
            assert key in params, f"{where}.{key} is not an argument of {node['_target_']}"
            if isinstance(value, dict) and "_target_" in value:
                check(value, f"{where}.{key}")

    cfg = compose_with(f"{group}={name}", *NEEDS.get((group, name), []))
    check(OmegaConf.to_container(cfg[group]), group)


def test_synthetic_store_from_config_matches_the_yaml():
    cfg = compose_with("data=synthetic")
    stores = {split: build_store(cfg.data, split) for split in ("train", "val", "test")}
    assert [s.num_classes for s in stores.values()] == list(cfg.data.classes)
    assert stores["train"].image_shape == (1, 28, 28)


def test_eval_shape_follows_the_training_shape_unless_set():
    cfg = compose_with("way=20", "shot=5", "eval.query=3")
    assert (cfg.eval.way, cfg.eval.shot, cfg.eval.query) == (20, 5, 3)
