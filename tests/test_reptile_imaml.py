"""Reptile's outer update and iMAML's implicit gradient, checked by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import configure, learning_run
from torch import nn

from metarun.algorithms.imaml import (
    IMAML,
    batched_conjugate_gradient,
    conjugate_gradient,
    implicit_meta_gradient,
)
from metarun.algorithms.reptile import Reptile
from metarun.data import Episodes
from metarun.errors import ConfigError


def tiny(features=3):
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, features), nn.Tanh())
    net.feature_shape = (features,)
    return net


def episodes(batch=1, way=2, shot=2, query=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Episodes(
        support_x=torch.randn(batch, way * shot, 1, 2, 2, generator=g),
        support_y=torch.arange(way).repeat_interleave(shot).repeat(batch, 1),
        query_x=torch.randn(batch, way * query, 1, 2, 2, generator=g),
        query_y=torch.arange(way).repeat_interleave(query).repeat(batch, 1),
        classes=torch.arange(way).repeat(batch, 1),
    )


def test_reptile_update_is_the_hand_computed_interpolation():
    """One task, SGD inner steps on the whole support set: theta + eps (phi - theta)."""
    torch.manual_seed(0)
    eps, lr, steps = 0.3, 0.1, 3
    learner = Reptile(
        tiny(), way=2, inner_steps=steps, inner_lr=lr, inner_optimizer="sgd", inner_batch=4
    )
    configure(learner, eps)
    ep = episodes()
    theta = {n: p.detach().clone() for n, p in learner.named_parameters()}
    # by hand: full-batch SGD from theta (inner_batch = support size, so order does not matter)
    phi = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
    for _ in range(steps):
        logits = torch.func.functional_call(learner, phi, (ep.support_x[0],))
        grads = torch.autograd.grad(F.cross_entropy(logits, ep.support_y[0]), list(phi.values()))
        phi = {
            n: (p - lr * g).detach().requires_grad_(True) for (n, p), g in zip(phi.items(), grads)
        }
    learner.meta_train_step(ep)
    for n, p in learner.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n] + eps * (phi[n].detach() - theta[n]))


def test_conjugate_gradient_solves_a_small_spd_system():
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    a = m @ m.T + 5 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    (x,) = conjugate_gradient(lambda v: [a @ v[0]], [b], steps=5)  # exact in n steps
    torch.testing.assert_close(a @ x, b)


def test_implicit_gradient_matches_the_closed_form_on_a_quadratic():
    """Inner: L_s(phi) = 1/2 phi'A phi - b'phi + lam/2 |phi - theta|^2, so
    phi*(theta) = (A + lam I)^-1 (b + lam theta) and, for L_q(phi) = 1/2 |phi - c|^2,
    d L_q(phi*) / d theta = lam (A + lam I)^-1 (phi* - c)."""
    torch.manual_seed(0)
    n, lam = 4, 2.0
    m = torch.randn(n, n, dtype=torch.float64)
    a = m @ m.T + torch.eye(n, dtype=torch.float64)
    b, c, theta = (torch.randn(n, dtype=torch.float64) for _ in range(3))
    phi = torch.linalg.solve(a + lam * torch.eye(n, dtype=torch.float64), b + lam * theta)
    expected = lam * torch.linalg.solve(a + lam * torch.eye(n, dtype=torch.float64), phi - c)

    def support_loss(params):
        (p,) = params
        return 0.5 * p @ a @ p - b @ p

    (got,) = implicit_meta_gradient(support_loss, [phi], [phi - c], lam, cg_steps=n)
    torch.testing.assert_close(got, expected)


def test_imaml_step_and_predict_run_with_bounded_graph():
    torch.manual_seed(0)
    learner = IMAML(tiny(), way=2, inner_steps=5, cg_steps=3)
    configure(learner, 1e-2)
    before = [p.detach().clone() for p in learner.parameters()]
    metrics = learner.meta_train_step(episodes(batch=2))
    assert metrics["acc"].shape == (2,) and not metrics["loss"].requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    ep = episodes(batch=2)
    with torch.no_grad():
        assert learner.eval().predict(ep.support_x, ep.support_y, ep.query_x).shape == (2, 6, 2)


def test_batched_conjugate_gradient_runs_each_system_as_the_single_one_does():
    """Four systems at once: positive definite, negative definite (stops before a step and
    returns b), indefinite (stops after a step), and one solved exactly in 2 steps."""
    torch.manual_seed(0)
    n = 5
    m = torch.randn(n, n, dtype=torch.float64)
    spd = m @ m.T + torch.eye(n, dtype=torch.float64)
    indefinite = torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5, -1.0], dtype=torch.float64))
    two = torch.zeros(n, n, dtype=torch.float64)
    two[:2, :2] = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    mats = torch.stack([spd, -spd, indefinite, two])
    b = torch.randn(4, n, dtype=torch.float64)
    b[3, 2:] = 0
    for steps in (1, 3, 8):
        (got,) = batched_conjugate_gradient(
            lambda v: [torch.einsum("tij,tj->ti", mats, v[0])], [b], steps
        )
        for t in range(4):
            (want,) = conjugate_gradient(lambda v, a=mats[t]: [a @ v[0]], [b[t]], steps)
            torch.testing.assert_close(got[t], want)
    torch.testing.assert_close(got[1], b[1])  # negative definite: the first-order answer


def test_imaml_vmap_and_loop_give_the_same_meta_gradient_and_predictions():
    from metarun.algorithms import conv4

    torch.manual_seed(0)
    loop = IMAML(conv4(hidden=8, variant="strided"), way=3, inner_steps=3, cg_steps=3, lam=1.0)
    loop = loop.double()
    vmap = IMAML(conv4(hidden=8, variant="strided"), way=3, batched="vmap", inner_steps=3)
    vmap.cg_steps, vmap.lam = 3, 1.0
    vmap = vmap.double()
    vmap.load_state_dict(loop.state_dict())
    loop.batched = "loop"
    g = torch.Generator().manual_seed(1)
    ep = Episodes(
        torch.rand(4, 3, 1, 28, 28, generator=g, dtype=torch.float64),
        torch.arange(3).repeat(4, 1),
        torch.rand(4, 6, 1, 28, 28, generator=g, dtype=torch.float64),
        torch.arange(3).repeat_interleave(2).repeat(4, 1),
        torch.arange(3).repeat(4, 1),
    )
    out = {}
    for name, learner in (("loop", loop), ("vmap", vmap)):
        configure(learner, 1e-3)
        metrics = learner.meta_train_step(ep)
        grads = [p.grad.clone() for p in learner.parameters()]
        with torch.no_grad():
            logits = learner.eval().predict(ep.support_x, ep.support_y, ep.query_x)
        out[name] = (metrics, grads, logits)
    (m1, g1, l1), (m2, g2, l2) = out["loop"], out["vmap"]
    torch.testing.assert_close(m1["loss"], m2["loss"])
    torch.testing.assert_close(m1["acc"], m2["acc"])
    assert sum(float(g.abs().sum()) for g in g1) > 0
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(l1, l2)


def conv_episodes(batch=4, way=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return Episodes(
        torch.rand(batch, way * 2, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(way).repeat_interleave(2).repeat(batch, 1),
        torch.rand(batch, way * 2, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(way).repeat_interleave(2).repeat(batch, 1),
        torch.arange(way).repeat(batch, 1),
    )


def small(cls, batched: str, dtype=torch.float32):
    from metarun.algorithms import conv4

    torch.manual_seed(0)
    kw = {"inner_steps": 3, "test_inner_steps": 3}
    if cls is IMAML:
        kw |= {"cg_steps": 3, "lam": 1.0}
    else:
        kw |= {"inner_batch": 4}
    return cls(conv4(hidden=8, variant="strided"), way=3, batched=batched, **kw).to(dtype)


def one_step(learner, ep, seed=5):
    """The weights after one outer step (global generator seeded: Reptile's minibatch
    orders) and the predictions after it."""
    configure(learner, 0.1 if isinstance(learner, Reptile) else 1e-3)
    torch.manual_seed(seed)
    metrics = learner.meta_train_step(ep)
    with torch.no_grad():
        logits = learner.eval().predict(ep.support_x, ep.support_y, ep.query_x)
    learner.train()
    return metrics, [p.detach().clone() for p in learner.parameters()], logits


@pytest.mark.parametrize("cls", [Reptile, IMAML])
def test_threads_repeat_bit_for_bit_and_agree_with_the_loop(two_threads, cls):
    ep = conv_episodes()
    assert small(cls, "threads").formulation(torch.device("cpu"), 4) == "threads"
    runs = [one_step(small(cls, "threads"), ep) for _ in range(2)]
    (m1, w1, l1), (m2, w2, l2) = runs
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))  # the same thread count
    assert torch.equal(l1, l2) and torch.equal(m1["loss"], m2["loss"])
    # the loop computes the same numbers: in float64 the two differ by rounding only (an
    # intra-op thread count of 2 against 1 per task; Adam and CG amplify it to ~1e-10),
    # far below any difference float32 or a wrong task order would make
    ep64 = conv_episodes(dtype=torch.float64)
    (m3, w3, l3), (m4, w4, l4) = (
        one_step(small(cls, b, torch.float64), ep64) for b in ("loop", "threads")
    )
    for a, b in zip(w3, w4, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(l3, l4, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(m3["loss"], m4["loss"], rtol=1e-8, atol=0)
    assert any(
        not torch.equal(a, p) for a, p in zip(w3, small(cls, "loop", torch.float64).parameters())
    )


@pytest.mark.parametrize("cls", [Reptile, IMAML])
def test_auto_uses_threads_on_a_multithreaded_cpu_only(two_threads, cls):
    learner, cpu = small(cls, "auto"), torch.device("cpu")
    assert learner.formulation(cpu, 4) == "threads"
    assert learner.formulation(cpu, 1) == "loop"  # one task: nothing to share out
    assert cls(tiny(), way=2).formulation(cpu, 4) == "loop"  # no convolutions: the loop
    torch.set_num_threads(1)
    assert learner.formulation(cpu, 4) == "loop"


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (Reptile, {"inner_optimizer": "rmsprop"}, "inner_optimizer"),
        (Reptile, {"inner_batch": 0}, "inner_batch"),
        (IMAML, {"lam": 0.0}, "lam"),
        (IMAML, {"cg_steps": 0}, "cg_steps"),
        (IMAML, {"batched": "yes"}, "batched"),
        (Reptile, {"batched": "vmap"}, "batched"),
    ],
)
def test_bad_settings_fail_clearly(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(tiny(), way=2, **kw)


@pytest.mark.slow
def test_imaml_learns_on_synthetic_glyphs():
    from metarun.algorithms import conv4

    torch.manual_seed(0)
    learner = IMAML(
        conv4(hidden=16, variant="strided"), way=5, inner_steps=5, cg_steps=3, inner_lr=0.1, lam=1.0
    )
    before, after, losses = learning_run(learner, 100, 3e-3, meta_batch=4)
    # measured at torch seed 0: loss 1.42 -> 0.92 (ratio 0.65), accuracy 0.46 -> 0.76 with
    # 95% intervals of about 0.024 each, so the margins are wide
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert after["acc"] - after["ci95"] > before["acc"] + before["ci95"], (before, after)


@pytest.mark.slow
def test_reptile_learns_on_synthetic_glyphs():
    """As in the paper's Omniglot runs, training tasks carry more shots (5) than the 1-shot
    test; without them, 1-shot training tasks moved Reptile too little to show here."""
    from metarun.algorithms import conv4

    torch.manual_seed(0)
    learner = Reptile(
        conv4(hidden=16, variant="strided"),
        way=5,
        inner_steps=5,
        inner_lr=0.1,
        inner_optimizer="sgd",
        inner_batch=10,
        test_inner_steps=10,
    )
    before, after, losses = learning_run(learner, 150, 1.0, meta_batch=4, train_shot=5)
    # measured at torch seed 0: query loss after adaptation 1.11 -> 0.24 (first/last 10
    # steps), 1-shot test accuracy 0.57 -> 0.83 with 95% intervals of about 0.03
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses
    assert after["acc"] - after["ci95"] > before["acc"] + before["ci95"], (before, after)
