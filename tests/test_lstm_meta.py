"""LSTM meta-learner: the preprocessing, the update rule, where the meta-gradient goes, the
predict contract, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import learning_run

from metarun.algorithms import conv4
from metarun.algorithms.lstm_meta import LSTMMetaLearner, preprocess


def small(**kw) -> LSTMMetaLearner:
    torch.manual_seed(0)
    return LSTMMetaLearner(conv4(hidden=8), way=3, **kw)


def test_preprocessing_matches_the_formula():
    x = torch.tensor([2.0, -0.5, 1e-6, -1e-6, 0.0])
    out = preprocess(x)
    assert torch.allclose(out[0], torch.tensor([math.log(2.0) / 10, 1.0]))
    assert torch.allclose(out[1], torch.tensor([math.log(0.5) / 10, -1.0]))
    # below e^-10 (4.5e-5): (-1, e^10 x)
    assert torch.allclose(out[2], torch.tensor([-1.0, math.exp(10) * 1e-6]))
    assert torch.allclose(out[3], torch.tensor([-1.0, -math.exp(10) * 1e-6]))
    assert torch.equal(out[4], torch.tensor([-1.0, 0.0]))


def test_one_update_is_forget_times_weights_minus_input_times_gradient():
    learner = small(inner_steps=1)
    with torch.no_grad():  # gates that ignore their inputs: i = sigmoid(-2), f = sigmoid(3)
        learner.gate_weights.zero_()
        learner.gate_biases.copy_(torch.tensor([-2.0, 3.0]))
    x, y = torch.rand(2, 6, 1, 28, 28), torch.arange(3).repeat(2).expand(2, 6)
    theta = learner.adapt(x, y, 1, 3)
    for t in range(2):  # the gradient of each task's support loss, by plain autograd
        params = list(learner.learner_params())
        loss = F.cross_entropy(learner(x[t])[:, :3], y[t])
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        theta0 = torch.cat([p.detach().flatten() for p in params])
        expected = (
            torch.sigmoid(torch.tensor(3.0)) * theta0 - torch.sigmoid(torch.tensor(-2.0)) * grad
        )
        assert torch.allclose(theta[t], expected, atol=1e-6)


def test_the_query_loss_trains_the_initial_weights_and_every_lstm_weight():
    learner = small(inner_steps=2).train()
    x, y = torch.rand(2, 6, 1, 28, 28), torch.arange(3).repeat(2).expand(2, 6)
    logits = learner.predict(x, y, x, 3)
    learner.loss(logits, y).backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_lstm_meta_learner_learns_on_synthetic_glyphs():
    torch.manual_seed(0)
    learner = LSTMMetaLearner(conv4(hidden=16), way=5, inner_steps=3)
    before, after, losses = learning_run(learner, 60, 3e-3)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert after["acc"] - after["ci95"] > before["acc"] + before["ci95"], (before, after)
