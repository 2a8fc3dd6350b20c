"""Meta Networks: the gradients it uses as meta information match autograd, the fast weights
reach the predictions, the predict contract, and that it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import learning_run

from metarun.algorithms import conv4
from metarun.algorithms.metanet import MetaNet
from metarun.errors import ConfigError


def small(**kw) -> MetaNet:
    torch.manual_seed(0)
    return MetaNet(conv4(hidden=8), way=3, repr_dim=6, hidden_size=5, **kw)


def test_pair_gradients_match_autograd_pair_by_pair():
    learner = small().double()
    g = torch.randn(2, 4, 8, dtype=torch.double)
    y = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 1]])
    i, j = torch.triu_indices(4, 4, offset=1)
    grads, mean_loss = learner.pair_gradients(learner.repr(g), g, y, i, j)
    assert grads.shape == (2, 6, 6, 8)
    losses, _, same = learner.pair_losses(learner.repr(g), y, i, j)
    assert same.sum() == 2  # each task has one same-class pair among its 6
    assert torch.allclose(mean_loss, losses.mean())
    for b in range(2):
        for t in range(6):
            (expected,) = torch.autograd.grad(losses[b, t], learner.repr.weight, retain_graph=True)
            assert torch.allclose(grads[b, t], expected, atol=1e-12), (b, t)


def test_example_gradients_match_autograd():
    learner = small().double()
    f = torch.randn(2, 5, 8, dtype=torch.double)
    y = torch.tensor([[0, 1, 2, 0, 1], [2, 1, 0, 0, 2]])
    grads = learner.example_gradients(f, y, 3)
    for b in range(2):
        for n in range(5):
            loss = F.cross_entropy(learner.head(f[b, n]).unsqueeze(0), y[b, n].unsqueeze(0))
            (expected,) = torch.autograd.grad(loss, learner.head.weight)
            assert torch.allclose(grads[b, n], expected, atol=1e-12), (b, n)


def test_the_query_loss_reaches_every_weight():
    learner = small(pairs=3).train()
    x, y = torch.rand(2, 6, 1, 28, 28), torch.arange(3).repeat(2).expand(2, 6)
    logits, repr_loss = learner.forward_task(x, y, x, 3)
    (learner.loss(logits, y) + repr_loss).backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_fast_weights_change_the_predictions():
    # training mode: batch statistics spread the untrained network's features apart
    learner = small().train()
    x, y = torch.rand(1, 6, 1, 28, 28), torch.arange(3).repeat(2).expand(1, 6)

    def predict():
        torch.manual_seed(1)  # the same support pairs each time
        return learner.predict(x, y, x, 3)

    with torch.no_grad():
        logits = predict()
        learner.m[-1].bias.add_(1.0)  # every example-level fast weight moves
        moved = predict()
        learner.m[-1].bias.sub_(1.0)
        # task-level fast weights Q* that vary with the gradients d read: the attention moves
        learner.d_out.weight.normal_(0.0, 5.0)
        moved_q = predict()
    assert (logits - moved).abs().max() > 1e-3 and (logits - moved_q).abs().max() > 1e-4


def test_one_support_example_has_no_pairs_and_still_predicts():
    learner = small().eval()
    with torch.no_grad():
        logits = learner.predict(
            torch.rand(1, 1, 1, 28, 28), torch.zeros(1, 1).long(), torch.rand(1, 4, 1, 28, 28), 1
        )
    assert logits.shape == (1, 4, 1) and torch.isfinite(logits).all()


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="pairs"):
        small(pairs=0)
    with pytest.raises(ConfigError, match="repr_weight"):
        small(repr_weight=-1.0)


@pytest.mark.slow
def test_meta_networks_learn_on_synthetic_glyphs():
    torch.manual_seed(0)
    learner = MetaNet(conv4(hidden=16), way=5)
    before, after, losses = learning_run(learner, 60, 1e-3)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert after["acc"] - after["ci95"] > before["acc"] + before["ci95"], (before, after)
