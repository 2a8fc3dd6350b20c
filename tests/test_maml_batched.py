"""MAML's two formulations, task after task and vmap over tasks, agree with each other and
with finite differences, including through batch norm's second derivative."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import configure
from torch import nn

from metarun.algorithms import MAML, conv4, task_threads
from metarun.algorithms.backbones import MeanPool
from metarun.algorithms.base import BatchStatisticsNorm
from metarun.data import Episodes
from metarun.errors import ConfigError


def batch(b=3, way=3, shot=1, query=2, seed=0, dtype=torch.float64) -> Episodes:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(way)
    return Episodes(
        torch.rand(b, way * shot, 1, 12, 12, generator=g, dtype=dtype),
        labels.repeat_interleave(shot).expand(b, -1).contiguous(),
        torch.rand(b, way * query, 1, 12, 12, generator=g, dtype=dtype),
        labels.repeat_interleave(query).expand(b, -1).contiguous(),
        labels.expand(b, -1).contiguous(),
    )


def smooth_bn_net() -> nn.Module:
    """Conv, batch norm, tanh: smooth, so central differences are accurate."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        MeanPool(),
    )
    net.feature_shape = (4,)
    return net


def meta_loss(learner, ep):
    return learner.loss(learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way), ep.query_y)


def meta_grads(learner, ep):
    learner.train()
    learner.zero_grad(set_to_none=True)
    meta_loss(learner, ep).backward()
    return [p.grad.clone() for p in learner.parameters()]


def assert_same_meta_gradients_and_predictions(learner, other, ep):
    """Meta-gradients through predict (training mode) and evaluation logits agree (float64)."""
    for a, b in zip(meta_grads(learner, ep), meta_grads(other, ep), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    learner.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            learner.predict(ep.support_x, ep.support_y, ep.query_x, ep.way),
            other.predict(ep.support_x, ep.support_y, ep.query_x, ep.way),
        )


VARIANTS = {
    "maml": {},
    "maml_2_steps": {"inner_steps": 2},
    "fomaml": {"first_order": True},
    "metasgd": {"learn_inner_lr": True},
    "anil": {"adapt": "head"},
}


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_vmap_and_loop_agree_on_logits_and_meta_gradients(kw):
    torch.manual_seed(0)
    loop = MAML(conv4(hidden=8, variant="strided"), 3, batched="loop", **kw).double()
    vmap = copy.deepcopy(loop)
    vmap.batched = "vmap"
    assert_same_meta_gradients_and_predictions(loop, vmap, batch())


@pytest.mark.parametrize("batched", ["loop", "vmap"])
def test_second_order_through_batch_norm_matches_finite_differences(batched):
    """A directional derivative of the meta-loss against a central difference (float64).
    Before batch norm was written out, vmap got this wrong by about 0.2% (F.batch_norm's
    double backward under vmap)."""
    torch.manual_seed(0)
    learner = MAML(smooth_bn_net(), 3, inner_steps=2, inner_lr=0.4, batched=batched).double()
    assert sum(isinstance(m, BatchStatisticsNorm) for m in learner.modules()) == 2
    ep = batch()
    direction = [torch.randn_like(p) for p in learner.parameters()]
    analytic = sum((g * d).sum() for g, d in zip(meta_grads(learner, ep), direction))
    base = [p.detach().clone() for p in learner.parameters()]
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, p0, d in zip(learner.parameters(), base, direction):
                p.copy_(p0 + sign * 1e-6 * d)
            values.append(meta_loss(learner, ep))
    numeric = (values[0] - values[1]) / 2e-6
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_batch_statistics_norm_equals_batch_norm_in_training_mode():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    x = torch.randn(6, 4, 5, 5)
    expected = bn.train()(x)
    norm = BatchStatisticsNorm(bn)
    torch.testing.assert_close(norm(x), expected)
    # the written-out form, used inside torch.func transforms
    written = torch.func.vmap(norm)(x[None])[0]
    torch.testing.assert_close(written, expected)


def test_vmap_with_running_statistics_is_refused():
    with pytest.raises(ConfigError, match="batched=loop"):
        MAML(conv4(hidden=8, variant="strided"), 3, batched="vmap", batch_norm="running")
    with pytest.raises(ConfigError, match="algo.batched"):
        MAML(conv4(hidden=8, variant="strided"), 3, batched="sometimes")


# -- batched="threads": groups of tasks on worker threads ---------------------------------


def step_grads(learner, ep):
    """The gradients meta_train_step leaves in .grad (an optimizer that does not move)."""
    learner.optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    out = learner.meta_train_step(ep)
    return out, [p.grad.clone() for p in learner.parameters()]


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_threads_and_loop_agree_on_logits_and_meta_gradients(two_threads, kw):
    torch.manual_seed(0)
    loop = MAML(conv4(hidden=8, variant="strided"), 3, batched="loop", **kw).double()
    threads = copy.deepcopy(loop)
    threads.batched = "threads"
    ep = batch(b=5)  # two groups of unequal size: 2 and 3 tasks
    assert threads.formulation(ep.support_x.device, ep.batch_size) == "threads"
    # meta_train_step: each thread takes its group's share of the meta-gradient
    (out_loop, g_loop), (out_threads, g_threads) = step_grads(loop, ep), step_grads(threads, ep)
    for a, b in zip(g_loop, g_threads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out_loop["loss"], out_threads["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(out_loop["acc"], out_threads["acc"])
    # predict (evaluation and any caller's own backward)
    assert_same_meta_gradients_and_predictions(loop, threads, ep)


def test_threads_steps_are_repeatable_and_train_as_the_loop_does(two_threads):
    """Threads twice give bit-identical weights (Adam, float32, as trained). Against the loop
    only the order of float additions differs, so the two are compared in float64 with plain
    SGD, whose steps are lr times the gradients: float64 rounding (1e-16), amplified by the
    curvature of batch norm over 3 support images through 2 inner and 3 outer steps, leaves
    differences of about 1e-11 (measured over seeds on torch 2.13 and 2.14); atol=rtol=1e-9
    keeps a 100x margin and is still far below float32's resolution, so a float32 path or
    any real difference in the computation fails. (Adam would not do: it divides by
    sqrt(v) + 1e-8, so the rounding noise in the gradients of the biases before batch norm,
    zero in exact arithmetic, becomes steps of lr * noise / 1e-8 that vary by machine.)"""
    torch.manual_seed(0)
    start = MAML(conv4(hidden=8, variant="strided"), 3, inner_steps=2, batched="loop")
    runs = {}
    for name, batched, dtype in [
        ("threads", "threads", torch.float32),
        ("again", "threads", torch.float32),
        ("loop64", "loop", torch.float64),
        ("threads64", "threads", torch.float64),
    ]:
        learner = copy.deepcopy(start).to(dtype)
        learner.batched = batched
        if dtype == torch.float32:
            configure(learner, 1e-2)  # Adam, as trained
        else:
            learner.optimizer = torch.optim.SGD(learner.parameters(), lr=1e-2)
        for seed in range(3):
            learner.meta_train_step(batch(b=4, seed=seed, dtype=dtype))
        runs[name] = [p.detach() for p in learner.parameters()]
    for a, b in zip(runs["threads"], runs["again"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(runs["loop64"], runs["threads64"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for name in ("threads", "loop64"):  # and both trained
        assert not all(
            torch.equal(a.to(b), b) for a, b in zip(start.parameters(), runs[name], strict=True)
        )


def test_auto_picks_threads_for_convolutions_on_a_multithreaded_cpu(two_threads):
    cpu = torch.device("cpu")
    conv = MAML(conv4(hidden=8, variant="strided"), 3)
    assert conv.formulation(cpu, 4) == "threads"
    assert conv.formulation(cpu, 1) == "loop"  # one task: nothing to share out
    assert conv.formulation(torch.device("cuda"), 4) == "vmap"
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    mlp.feature_shape = (8,)
    assert MAML(mlp, 3).formulation(cpu, 4) == "vmap"
    running = MAML(conv4(hidden=8, variant="strided"), 3, batch_norm="running")
    assert running.formulation(cpu, 4) == "loop"
    assert running.formulation(torch.device("cuda"), 4) == "loop"
    torch.set_num_threads(1)
    assert conv.formulation(cpu, 4) == "loop"
    assert MAML(conv4(hidden=8, variant="strided"), 3, batched="threads").formulation(cpu, 4) == (
        "loop"
    )


def test_threads_with_running_statistics_are_refused():
    with pytest.raises(ConfigError, match="algo.batched=threads.*algo.batched=loop"):
        MAML(conv4(hidden=8, variant="strided"), 3, batched="threads", batch_norm="running")


def test_a_failing_task_raises_and_the_thread_count_is_restored(two_threads):
    learner = MAML(conv4(hidden=8, variant="strided"), 3, batched="threads")
    configure(learner, 1e-3)
    ep = batch(b=4, dtype=torch.float32)
    ep.query_y[3, 0] = 7  # a label beyond the 3 classes, in the second group's last task
    before = [p.detach().clone() for p in learner.parameters()]
    with pytest.raises(IndexError, match="out of bounds"):
        learner.meta_train_step(ep)
    assert torch.get_num_threads() == 2
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    with pytest.raises(ConfigError, match="3-way output layer"):  # more classes than the head
        learner.meta_train_step(batch(b=4, way=4, dtype=torch.float32))
    assert torch.get_num_threads() == 2


def test_task_groups_and_replicas():
    assert [list(r) for r in task_threads.groups(5, 2)] == [[0, 1], [2, 3, 4]]
    assert [len(r) for r in task_threads.groups(16, 3)] == [5, 5, 6]
    assert [list(r) for r in task_threads.groups(2, 8)] == [[0], [1]]
    net = conv4(hidden=4, variant="strided", out_features=3)
    twin = task_threads.replica(net)
    for (n, p), (m, q) in zip(net.named_parameters(), twin.named_parameters(), strict=True):
        assert n == m and p is q  # the same tensors
    x = torch.rand(2, 1, 12, 12)
    fast = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    inside = []
    net[1][0].register_forward_hook(lambda m, i, o: inside.append(net[1][0].weight))
    torch.func.functional_call(twin, fast, (x,))
    assert all(w is net[1][0].weight for w in inside)  # the original kept its weights
    assert torch.equal(torch.func.functional_call(twin, fast, (x,)), net[-1].bias.new_zeros(2, 3))


def pools_then_run() -> tuple[int, list[int]]:
    """In a forked child: how many pools it inherited, and a run on fresh ones."""
    inherited = len(task_threads._POOLS)
    return inherited, task_threads.run(len, task_threads.groups(4, 2))


def test_a_forked_child_makes_its_own_worker_threads(two_threads):
    """A pool made before a fork has no threads in the child (a plain ThreadPoolExecutor
    whose workers had gone idle hung there): the child starts without the parent's pools."""
    import multiprocessing

    task_threads.run(len, task_threads.groups(4, 2))  # the parent's pool
    assert task_threads._POOLS
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(pools_then_run).get(timeout=60) == (0, [2, 2])
