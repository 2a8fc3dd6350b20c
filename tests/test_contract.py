"""The learner contract, for every learner in the registry (conf/algo/*.yaml): a new
learner's yaml puts it under every test here, with nothing to write. Each learner's own
test file keeps only its algorithm's mathematics."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import ALGOS, SMALL, compose_with, configure

from metarun.data.episodes import FixedEpisodes
from metarun.data.synthetic import synthetic
from metarun.errors import ConfigError
from metarun.runners.trainer import Trainer

WAY = 5


@functools.cache
def built(name: str, tmp_root: str) -> Trainer:
    """A trainer (learner, sampler, evaluation episodes) for `name` at test size."""
    cfg = compose_with(
        f"algo={name}",
        *SMALL.get(name, []),
        f"way={WAY}",
        "shot=1",
        "query=2",
        "logger=none",
        "trainer.meta_batch=2",
        "trainer.val_episodes=4",
        "eval.episodes=4",
        "device=cpu",
    )
    torch.manual_seed(0)
    return Trainer(cfg, f"{tmp_root}/{name}", torch.device("cpu"))


@pytest.fixture
def trainer(request, tmp_path_factory):
    name = request.node.callspec.params["name"]
    return built(name, str(tmp_path_factory.getbasetemp() / "contract"))


def episodes(way: int = WAY, n: int = 3) -> FixedEpisodes:
    return next(FixedEpisodes(synthetic("test"), n, way, 1, 2, seed=1).batches(n))


def weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ALGOS)
def test_predict_gives_one_score_per_query_and_class_and_leaves_the_weights(name, trainer):
    learner = copy.deepcopy(trainer.learner).eval()
    before = weights(learner)
    ep = episodes()
    with torch.no_grad():
        logits = learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)
    assert logits.shape == (3, WAY * 2, WAY) and torch.isfinite(logits).all()
    assert same(before, weights(learner))  # adaptation happens on copies, never the weights


@pytest.mark.parametrize("name", ALGOS)
def test_each_task_is_predicted_on_its_own(name, trainer):
    """A task's scores do not depend on the other tasks of the batch."""
    learner = copy.deepcopy(trainer.learner).eval()
    ep = episodes()
    torch.manual_seed(1)  # evaluation must not depend on the global random state
    with torch.no_grad():
        together = learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)
        alone = torch.cat(
            [
                learner.predict(t.support_x, t.support_y, t.query_x, t.way)
                for t in map(ep.__getitem__, range(3))
            ]
        )
    # float32: the batched and single passes reduce in other orders (relative 1e-7); the
    # inner-loop learners' gradient steps at test time amplify that, to 3e-5 for scores of
    # about 2 (measured, every learner); a task that saw another's data would be off by 0.1+
    tol = 1e-3 if learner.inner_loop else 1e-5
    torch.testing.assert_close(together, alone, rtol=tol, atol=tol)
    again = learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)
    assert torch.equal(together, again)  # evaluation is repeatable


@pytest.mark.parametrize("name", ALGOS)
def test_way_is_read_from_the_labels_when_not_given(name, trainer):
    learner = copy.deepcopy(trainer.learner).eval()
    ep = episodes()
    with torch.no_grad():
        given = learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)
        read = learner.predict(ep.support_x, ep.support_y, ep.query_x)
    assert torch.equal(given, read)


@pytest.mark.parametrize("name", ALGOS)
def test_more_classes_than_a_fixed_head_are_refused(name, trainer):
    """Learners with a way-sized output layer (learner.way) refuse larger tasks with a
    ConfigError naming the fix; the others score any number of classes."""
    learner = copy.deepcopy(trainer.learner).eval()
    ep = episodes(way=WAY + 1)
    with torch.no_grad():
        if learner.way is None:
            shape = learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way).shape
            assert shape == (3, (WAY + 1) * 2, WAY + 1)
        else:
            with pytest.raises(ConfigError, match=f"{WAY}-way output layer"):
                learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)


@pytest.mark.parametrize("name", ALGOS)
def test_fewer_classes_than_trained_on(name, trainer):
    learner = copy.deepcopy(trainer.learner).eval()
    ep = episodes(way=3)
    with torch.no_grad():
        logits = learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)
    assert logits.shape == (3, 6, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALGOS)
def test_a_training_step_returns_detached_scalars_and_changes_the_weights(name, trainer):
    learner = copy.deepcopy(trainer.learner)
    configure(learner, 1e-3)
    before = weights(learner)
    batch = copy.deepcopy(trainer.sampler).sample(2)
    out = learner.meta_train_step(batch)
    assert "loss" in out and torch.isfinite(out["loss"]).all()
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad, key
    changed = [k for k, v in learner.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


@pytest.mark.parametrize("name", ALGOS)
def test_every_trainable_parameter_gets_a_finite_gradient(name, trainer):
    """The outer update reaches every weight the optimizer holds (a weight without a
    gradient is dead code, or a learner that bypassed the base update path)."""
    learner = copy.deepcopy(trainer.learner)
    configure(learner, 1e-3)
    learner.meta_train_step(copy.deepcopy(trainer.sampler).sample(2))
    missing = [n for n, p in learner.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ALGOS)
def test_trainer_grad_clip_bounds_every_learners_update(name, trainer):
    """Clipping is the base's (MetaLearner.outer_update), so it holds for every learner:
    the gradient the optimizer stepped with has norm at most trainer.grad_clip."""
    learner = copy.deepcopy(trainer.learner)
    configure(learner, 1e-3)
    batch = copy.deepcopy(trainer.sampler).sample(2)
    grads = {}
    for clip in (None, "a tenth"):
        model = copy.deepcopy(learner)
        model.grad_clip = None if clip is None else grads[None] / 10
        torch.manual_seed(0)  # the same step both times (some steps draw pairs or orders)
        model.meta_train_step(batch)
        grads[clip] = float(
            torch.nn.utils.get_total_norm(
                [p.grad for p in model.parameters() if p.grad is not None]
            )
        )
    assert grads[None] > 0
    assert grads["a tenth"] <= grads[None] / 10 * (1 + 1e-4)


@pytest.mark.parametrize("name", ALGOS)
def test_the_state_dict_round_trips(name, trainer):
    learner = copy.deepcopy(trainer.learner).eval()
    configure(learner, 1e-3)
    learner.meta_train_step(copy.deepcopy(trainer.sampler).sample(2))
    learner.eval()
    other = copy.deepcopy(trainer.learner).eval()
    other.load_state_dict(learner.state_dict())
    ep = episodes()
    with torch.no_grad():
        a = learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)
        b = other.predict(ep.support_x, ep.support_y, ep.query_x, ep.way)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALGOS)
def test_capabilities_are_declared_by_the_class(name, trainer):
    """What the runners ask of a learner comes from its class, never from a list."""
    learner = trainer.learner
    assert isinstance(learner.inner_loop, bool)
    assert isinstance(learner.supports_regression, bool)


def test_the_runners_read_capabilities_from_the_registry():
    from conftest import learner_class

    from metarun.runners.build import learners_that

    regression = [n for n in ALGOS if learner_class(n).supports_regression]
    assert learners_that("supports_regression") == regression and "maml" in regression
