"""Continual learners' mathematics (algorithms/continual.py): the EWC penalty, its
gradient and the true Fisher against hand computations on tiny networks, and the heads each
scenario gets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.continual import EWC, FineTune
from metarun.errors import ConfigError


def tiny() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh())
    net.feature_shape = (3,)
    return net


def test_heads_follow_the_scenario():
    learner = FineTune(tiny())
    learner.setup("task", [2, 3])
    assert [h.out_features for h in learner.heads] == [2, 3]
    assert learner(torch.rand(5, 1, 2, 2), task=1).shape == (5, 3)
    with pytest.raises(ConfigError, match="needs the task id"):
        learner(torch.rand(5, 1, 2, 2))
    learner.setup("class", [2, 3])
    assert [h.out_features for h in learner.heads] == [5]
    learner.setup("domain", [4, 4, 4])
    assert [h.out_features for h in learner.heads] == [4]
    with pytest.raises(ConfigError, match="same classes in every task"):
        learner.setup("domain", [4, 3])
    with pytest.raises(ConfigError, match="scenario='online'"):
        learner.setup("online", [2])


def test_true_fisher_is_the_expected_squared_score_under_the_models_predictions():
    torch.manual_seed(0)
    learner = EWC(tiny())
    learner.setup("class", [2, 2])
    x = torch.rand(5, 1, 2, 2)
    got = learner.fisher(x, task=0)
    # by hand: per image, per class y, the squared gradient of log p(y|x), weighted by p(y|x)
    params = dict(learner.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for xi in x:
        log_p = F.log_softmax(learner(xi[None]), -1)[0]
        for y in range(4):
            grads = torch.autograd.grad(log_p[y], list(params.values()), retain_graph=True)
            for (n, _), g in zip(params.items(), grads):
                expected[n] += log_p[y].exp().detach() * g.pow(2) / len(x)
    assert got.keys() == expected.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)


def test_ewc_penalty_and_its_gradient_equal_the_formula():
    torch.manual_seed(0)
    learner = EWC(tiny(), lam=3.0)
    learner.setup("class", [2, 2])
    x = torch.rand(6, 1, 2, 2)
    learner.end_task(0, x, torch.zeros(6, dtype=torch.long))
    fisher, anchor = learner.fishers[0], learner.anchors[0]
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = dict(learner.named_parameters())
    by_hand = sum(1.5 * (fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher)
    penalty = learner.penalty()
    torch.testing.assert_close(penalty, by_hand)
    grads = torch.autograd.grad(penalty, list(params.values()))
    for (n, p), g in zip(params.items(), grads):  # d/dtheta = lambda F (theta - theta*)
        torch.testing.assert_close(g, 3.0 * fisher[n] * (p - anchor[n]).detach())


def test_task_heads_are_not_penalized_and_online_ewc_keeps_one_running_fisher():
    torch.manual_seed(0)
    learner = EWC(tiny(), online=True, gamma=0.5)
    learner.setup("task", [2, 2])
    x = torch.rand(4, 1, 2, 2)
    learner.end_task(0, x, torch.zeros(4, dtype=torch.long))
    assert not any(n.startswith("heads.") for n in learner.fishers[0])
    first = {n: f.clone() for n, f in learner.fishers[0].items()}
    learner.end_task(1, x, torch.zeros(4, dtype=torch.long))
    assert len(learner.fishers) == len(learner.anchors) == 1
    new = learner.fisher(x, 1)
    for n, f in learner.fishers[0].items():
        torch.testing.assert_close(f, 0.5 * first[n] + new[n])


def test_fishers_and_anchors_round_trip_through_the_state_dict():
    torch.manual_seed(0)
    learner = EWC(tiny())
    learner.setup("class", [2, 2])
    learner.end_task(0, torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    other = EWC(tiny())
    other.setup("class", [2, 2])
    other.load_state_dict(learner.state_dict())
    torch.testing.assert_close(other.penalty(), learner.penalty())
    assert other.fishers[0].keys() == learner.fishers[0].keys()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lam": -1.0}, "must be >= 0"),
        ({"gamma": 1.5}, r"in \[0, 1\]"),
        ({"fisher_samples": 0}, "positive"),
    ],
)
def test_bad_ewc_settings_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        EWC(tiny(), **kw)
