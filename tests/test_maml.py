"""MAML, first-order MAML, Meta-SGD and ANIL: meta-gradients checked against independent ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import learning_run
from torch import nn
from torch.func import functional_call, grad, hessian

from metarun.algorithms import conv4
from metarun.algorithms.maml import MAML
from metarun.errors import ConfigError


def tiny(features=3):
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, features), nn.Tanh())
    net.feature_shape = (features,)
    return net


def task(seed=0, way=2, n_support=4, n_query=6):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(1, n_support, 1, 2, 2, generator=g)
    qx = torch.randn(1, n_query, 1, 2, 2, generator=g)
    sy = torch.arange(n_support)[None] % way
    qy = torch.arange(n_query)[None] % way
    return sx, sy, qx, qy


def meta_grad(learner, sx, sy, qx, qy):
    learner.train()
    learner.zero_grad()
    logits = learner.predict(sx, sy, qx, way=2)
    learner.loss(logits, qy).backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


def reference(learner, sx, sy, qx, qy, steps, lr):
    """The meta-objective written out with torch.func, independent of the learner's code."""
    names = [n for n, _ in learner.named_parameters()]

    def forward(params, x):
        return functional_call(learner, dict(zip(names, params)), (x,))

    def support_loss(params):
        return F.cross_entropy(forward(params, sx[0]), sy[0])

    def query_loss(params):
        for _ in range(steps):
            g = grad(support_loss)(params)
            params = tuple(p - lr * gi for p, gi in zip(params, g))
        return F.cross_entropy(forward(params, qx[0]), qy[0])

    params = tuple(p.detach() for _, p in learner.named_parameters())
    return dict(zip(names, grad(query_loss)(params))), query_loss, params


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_an_independent_computation(steps):
    torch.manual_seed(0)
    learner = MAML(tiny(), way=2, inner_steps=steps, inner_lr=0.5)
    data = task()
    ours = meta_grad(learner, *data)
    expected, query_loss, params = reference(learner, *data, steps, 0.5)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6)
    # and a central finite difference along a random direction agrees with both
    direction = tuple(torch.randn_like(p) for p in params)
    eps = 1e-3
    with torch.no_grad():
        up = query_loss(tuple(p + eps * d for p, d in zip(params, direction)))
        down = query_loss(tuple(p - eps * d for p, d in zip(params, direction)))
    numeric = (up - down) / (2 * eps)
    analytic = sum((ours[n] * d).sum() for n, d in zip(ours, direction))
    assert abs(float(numeric - analytic)) < 1e-3 * max(1.0, abs(float(analytic)))


def test_first_order_differs_by_exactly_the_second_order_term():
    """One inner step: full = (I - a H_s) g_q(phi) and first-order = g_q(phi), so
    full - first_order = -a H_s(theta) g_q(phi)."""
    torch.manual_seed(0)
    lr = 0.5
    full = MAML(tiny(), way=2, inner_steps=1, inner_lr=lr)
    first = MAML(tiny(), way=2, inner_steps=1, inner_lr=lr, first_order=True)
    first.load_state_dict(full.state_dict())
    data = task(seed=1)
    g_full, g_first = meta_grad(full, *data), meta_grad(first, *data)
    sx, sy, qx, qy = data
    names = [n for n, _ in full.named_parameters()]
    shapes = [p.shape for _, p in full.named_parameters()]
    theta = torch.cat([p.detach().flatten() for _, p in full.named_parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    def loss(v, x, y):
        return F.cross_entropy(functional_call(full, unflat(v), (x,)), y)

    phi = theta - lr * grad(loss)(theta, sx[0], sy[0])
    g_query = grad(loss)(phi, qx[0], qy[0])
    h_support = hessian(loss)(theta, sx[0], sy[0])
    expected = unflat(-lr * h_support @ g_query)
    for n in names:
        torch.testing.assert_close(g_full[n] - g_first[n], expected[n], rtol=1e-4, atol=1e-6)
    assert any(expected[n].abs().max() > 1e-4 for n in names)  # the term is not zero here


def test_meta_sgd_learns_its_step_sizes_and_anil_adapts_only_the_head():
    torch.manual_seed(0)
    data = task(seed=2)
    meta_sgd = MAML(tiny(), way=2, learn_inner_lr=True, inner_lr=0.3)
    grads = meta_grad(meta_sgd, *data)
    assert [n for n in grads if n.startswith("inner_lrs")]  # per-weight step sizes
    assert all(grads[n].abs().sum() > 0 for n in grads)
    assert meta_sgd.inner_lrs[0].shape == meta_sgd.backbone[1].weight.shape

    anil = MAML(tiny(), way=2, adapt="head", inner_steps=2)
    assert anil.fast_names == ["head.weight", "head.bias"]
    grads = meta_grad(anil, *data)
    assert grads["backbone.1.weight"].abs().sum() > 0  # the backbone still meta-learns


def test_zero_test_steps_is_the_unadapted_network():
    torch.manual_seed(0)
    learner = MAML(tiny(), way=5, inner_steps=1, test_inner_steps=0).eval()
    sx, qx = torch.randn(3, 10, 1, 2, 2), torch.randn(3, 7, 1, 2, 2)
    sy = torch.arange(10).repeat(3, 1) % 5
    with torch.no_grad():
        logits = learner.predict(sx, sy, qx, way=5)
        unadapted = learner(qx.flatten(0, 1)).view(3, 7, 5)
    torch.testing.assert_close(logits, unadapted)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"inner_steps": 0}, "inner_steps"),
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"adapt": "body"}, "ANIL"),
        ({"batch_norm": "none"}, "batch_norm"),
    ],
)
def test_bad_settings_fail_clearly(kw, match):
    with pytest.raises(ConfigError, match=match):
        MAML(tiny(), way=2, **kw)


STEPS = 100


# measured at torch seed 0, 100 steps (last/first 10-step mean loss; 5-way accuracy before ->
# after on 100 test episodes): MAML 0.49 (0.38 -> 0.85), first-order 0.64 (0.38 -> 0.69),
# Meta-SGD 0.49 (0.38 -> 0.87), ANIL 0.82 (0.23 -> 0.51). The loss bounds leave 0.1-0.2 of
# room; the accuracy must clear both 95% intervals (about 0.02 each), a gap of 0.25+ here.
@pytest.mark.parametrize(
    "algo, loss_ratio",
    [
        pytest.param({}, 0.7, id="maml"),
        pytest.param({"first_order": True}, 0.8, id="fomaml", marks=pytest.mark.slow),
        pytest.param({"learn_inner_lr": True}, 0.7, id="metasgd", marks=pytest.mark.slow),
        pytest.param({"adapt": "head"}, 0.92, id="anil", marks=pytest.mark.slow),
    ],
)
def test_learns_on_synthetic_glyphs(algo, loss_ratio):
    torch.manual_seed(0)
    learner = MAML(conv4(hidden=16, variant="strided"), way=5, inner_lr=0.4, **algo)
    before, after, losses = learning_run(learner, STEPS, 3e-3, meta_batch=4)
    assert sum(losses[-10:]) < loss_ratio * sum(losses[:10]), losses
    assert after["acc"] - after["ci95"] > before["acc"] + before["ci95"], (before, after)


def test_a_head_smaller_than_the_test_way_is_refused_before_training():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from metarun.runners.validate import validate

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="metarun.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["algo=maml", "way=5", "eval.way=20"])
        validate(compose(config_name="config", overrides=["algo=maml", "way=20", "eval.way=5"]))
    with pytest.raises(ConfigError, match="5-way classifier head"):
        validate(cfg)


@pytest.mark.parametrize("batched", ["loop", "vmap"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_test_inner_lr_applies_in_eval_mode_only(batched, adapt):
    torch.manual_seed(0)
    kw = dict(way=2, inner_steps=2, test_inner_steps=2, adapt=adapt, batched=batched)
    both = MAML(tiny(), inner_lr=0.4, test_inner_lr=0.1, **kw)
    slow = MAML(tiny(), inner_lr=0.1, **kw)
    fast = MAML(tiny(), inner_lr=0.4, **kw)
    slow.load_state_dict(both.state_dict())
    fast.load_state_dict(both.state_dict())
    sx, sy, qx, _ = task()
    for mode in ("eval", "train"):
        same = slow if mode == "eval" else fast
        other = fast if mode == "eval" else slow
        out = [getattr(m, mode)().predict(sx, sy, qx, way=2).detach() for m in (both, same, other)]
        torch.testing.assert_close(out[0], out[1])
        assert not torch.allclose(out[0], out[2])


def test_test_inner_lr_is_refused_for_meta_sgd_and_must_be_positive():
    with pytest.raises(ConfigError, match="Meta-SGD"):
        MAML(tiny(), way=2, learn_inner_lr=True, test_inner_lr=0.1)
    with pytest.raises(ConfigError, match="test_inner_lr must be positive"):
        MAML(tiny(), way=2, test_inner_lr=0.0)
