"""DEN's stages, each alone on a tiny network (algorithms/den.py): expansion only above the
loss threshold, group-sparse pruning of the new units, the split of a drifted unit with the
original kept for earlier tasks, the subnetwork search, timestamped inference, and the
weights a phase must not move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.algorithms.backbones import pixels
from metarun.algorithms.continual import Phase
from metarun.algorithms.den import DEN
from metarun.errors import ConfigError


def tiny(**settings) -> DEN:
    torch.manual_seed(0)
    learner = DEN(pixels(1, 2), hidden=(3, 2), **settings)  # 4 inputs, 3 and 2 units
    learner.setup("task", [2, 2, 2])
    return learner


def images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 2, 2, generator=g), torch.randint(0, 2, (n,), generator=g)


def finish(learner: DEN, task: int) -> None:
    """Take task `task` through its phases without training (no data needed beyond the
    threshold test), as mode=continual would between updates."""
    x, y = images()
    phase = learner.first_phase(task)
    while phase is not None:
        phase = learner.next_phase(phase, task, x, y, 0.0)
    learner.end_task(task, x, y)


def to_retrain(learner: DEN, task: int) -> Phase:
    x, y = images()
    head = learner.first_phase(task)
    assert head.name == "head"
    retrain = learner.next_phase(head, task, x, y, 0.0)
    assert retrain.name == "retrain"
    return retrain


def test_units_are_added_only_when_the_loss_stays_above_tau():
    x, y = images()
    calm = tiny(tau=1e9)  # no loss is that high: no expansion, no split (sigma default)
    finish(calm, 0)
    after = calm.next_phase(to_retrain(calm, 1), 1, x, y, 0.0)
    assert after is None and calm.sizes() == [3, 2]

    eager = tiny(tau=0.0, k=4)  # any loss passes it
    finish(eager, 0)
    expand = eager.next_phase(to_retrain(eager, 1), 1, x, y, 0.0)
    assert expand.name == "expand" and eager.sizes() == [7, 6]
    assert eager.stamp0.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert eager.head_w[0].shape == (2, 6) and eager.head_w[0][:, 2:].abs().sum() == 0
    # only the new units' weights (in and out) and the task's head train in this phase
    assert eager.trainable["w0"][:3].any() == False  # noqa: E712
    assert eager.trainable["w0"][3:].all() and eager.trainable["w1"][:, 3:].all()
    assert not eager.trainable["w1"][:2, :3].any() and "hw0" not in eager.trainable


def test_group_sparsity_zeroes_whole_new_units_and_they_are_pruned():
    x, y = images()
    learner = tiny(tau=0.0, k=4, group=1.0, l1=0.0)
    finish(learner, 0)
    expand = learner.next_phase(to_retrain(learner, 1), 1, x, y, 0.0)
    with torch.no_grad():  # two new first-layer units nearly dead, two alive
        learner.weights[0][3:5] = 0.01
        learner.weights[0][5:7] = 5.0
    norms = learner.weights[0].detach().norm(dim=1)
    learner.after_update(expand, 1, lr=0.1)  # group soft-threshold by lr * group = 0.1
    w = learner.weights[0].detach()
    assert (w[3:5] == 0).all()  # norm 0.02 < 0.1: the whole group is zero
    shrink = 1 - 0.1 / norms[5]  # the rest keep their direction, shorter by 0.1
    assert torch.allclose(w[5:7], torch.full_like(w[5:7], 5.0) * shrink)
    assert torch.allclose(w[:3], learner.kept["w0"][:3])  # the old units did not move
    learner.next_phase(expand, 1, x, y, 0.0)
    assert learner.sizes()[0] == 5 and learner.stamp0.tolist() == [0, 0, 0, 1, 1]
    assert learner.weights[1].shape[1] == 5  # their outgoing weights went with them


def test_a_drifted_unit_is_split_and_the_original_serves_the_earlier_task():
    x, y = images()
    learner = tiny(tau=1e9, sigma=0.5)
    finish(learner, 0)
    before = learner(x, 0).detach().clone()
    retrain = to_retrain(learner, 1)
    with torch.no_grad():  # task 1 moves first-layer unit 1 far, unit 0 a little
        learner.weights[0][1] += 2.0
        learner.weights[0][0] += 0.1
    moved = learner.weights[0][1].detach().clone()
    split = learner.next_phase(retrain, 1, x, y, 0.0)
    assert split.name == "split"
    assert learner.sizes() == [4, 2] and learner.stamp0.tolist() == [0, 0, 0, 1]
    assert torch.equal(learner.weights[0][1].detach(), learner.previous["w0"][1])  # restored
    assert torch.equal(learner.weights[0][3].detach(), moved)  # the copy keeps the drift
    # unit 0 drifted by 0.2 < sigma: not split. Task 0 sees the original unit 1 again
    # (and the copy is masked for it); only unit 0's small drift changes its output.
    with torch.no_grad():
        learner.weights[0][0] -= 0.1
    assert torch.equal(learner(x, 0), before)
    # task 1 reads the copy: its outgoing weights are the original's
    assert torch.equal(learner.weights[1][:, 3], learner.weights[1][:, 1])
    assert learner.trainable["w0"][3].all() and not learner.trainable["w0"][:3].any()


def test_the_subnetwork_is_what_reaches_the_head_by_nonzero_weights():
    learner = tiny()
    finish(learner, 0)
    learner.first_phase(1)
    with torch.no_grad():
        learner.head_w[1].zero_()
        learner.head_w[1][0, 1] = 1.0  # only top unit 1 reaches the head
        learner.weights[1][1] = torch.tensor([0.0, 2.0, 0.0])  # which reads unit 1 below
    assert [s.tolist() for s in learner.selected(1)] == [[False, True, False], [False, True]]
    masks = learner.subnetwork(1)
    assert masks["w1"].tolist() == [[False, False, False], [False, True, False]]
    assert masks["w0"][1].all() and not masks["w0"][[0, 2]].any()  # every input into S
    assert masks["b0"].tolist() == [False, True, False]


def test_units_of_later_tasks_never_change_an_earlier_tasks_output():
    x, _ = images()
    learner = tiny(tau=0.0, k=2)
    finish(learner, 0)
    before = learner(x, 0).detach().clone()
    learner.next_phase(to_retrain(learner, 1), 1, x, images()[1], 0.0)  # expands
    assert learner.sizes() == [5, 4]
    with torch.no_grad():  # whatever the new units' weights, task 0 does not see them
        learner.weights[0][3:] = 7.0  # into the new first-layer units
        learner.weights[1][2:] = 7.0  # into the new second-layer units
        learner.weights[1][:, 3:] = 7.0  # from the new first-layer units
        learner.biases[1][2:] = 7.0
    assert torch.equal(learner(x, 0), before)


def test_a_phase_moves_only_its_own_weights():
    x, y = images()
    learner = tiny(tau=1e9, l1=0.0)
    finish(learner, 0)
    retrain = to_retrain(learner, 1)
    before = {n: t.detach().clone() for n, t in learner.named_tensors().items()}
    optimizer = torch.optim.SGD(learner.phase_parameters(retrain), lr=0.5)
    learner.loss(x, y, 1, retrain).backward()
    optimizer.step()
    learner.after_update(retrain, 1, lr=0.5)
    now = learner.named_tensors()
    for name, mask in learner.trainable.items():
        assert torch.equal(now[name][~mask], before[name][~mask]), name
    assert any(not torch.equal(now[n], before[n]) for n in learner.trainable)
    for name in ("hw0", "hb0", "hw2"):  # other tasks' heads are not even in the phase
        assert torch.equal(now[name], before[name])


def test_l1_soft_thresholds_the_trained_weights():
    learner = tiny(l1=1.0)
    phase = learner.first_phase(0)
    with torch.no_grad():
        learner.weights[0].copy_(torch.tensor([0.05, -0.3, 0.2, -0.05]).repeat(3, 1))
    learner.after_update(phase, 0, lr=0.1)
    assert torch.allclose(learner.weights[0][0], torch.tensor([0.0, -0.2, 0.1, 0.0]))


def test_den_refuses_what_it_cannot_serve():
    learner = DEN(pixels(1, 2), hidden=(3,))
    with pytest.raises(ConfigError, match="continual.scenario=task"):
        learner.setup("class", [2, 2])
    with pytest.raises(ConfigError, match="use backbone=pixels"):
        DEN(nn.Sequential(nn.Flatten(), nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="algo.tau must be >= 0"):
        DEN(pixels(1, 2), tau=-1.0)
