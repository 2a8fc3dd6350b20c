"""The fused second-order kernels (algorithms/second_order.py and .cpp): their first and
second derivatives against finite differences and against PyTorch's, the learners'
meta-gradients with and without them, and the fallback when they cannot be built."""

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms import IMAML, MAML, conv4, second_order
from metarun.data import Episodes

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.fixture(scope="module")
def ext():
    """The compiled extension. With a C++ compiler on PATH it must build; without one the
    tests that need it skip (the fallback tests below still run)."""
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler on PATH: the fused kernels cannot be built here")
    module = second_order.extension()
    assert module is not None, "a C++ compiler is on PATH, yet the extension did not build"
    return module


def f64(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


@pytest.mark.parametrize(
    "stride,padding,dilation,groups,bias,x_grad",
    [
        (2, 1, 1, 1, True, True),  # conv4 strided
        (2, 1, 1, 1, True, False),  # its first layer: the images need no gradient
        (1, 1, 1, 1, False, True),
        (1, 0, 2, 2, True, True),
    ],
)
def test_conv2d_derivatives_match_finite_differences(
    ext, stride, padding, dilation, groups, bias, x_grad
):
    x = f64(3, 4, 7, 7, grad=x_grad)
    w = f64(6, 4 // groups, 3, 3)
    b = f64(6) if bias else None
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)

    def conv(*t):
        xx = t[0] if x_grad else x
        rest = t[1:] if x_grad else t
        return ext.conv2d(xx, rest[0], rest[1] if bias else None, *args)

    inputs = tuple(t for t in (x if x_grad else None, w, b) if t is not None)
    assert torch.autograd.gradcheck(conv, inputs)
    assert torch.autograd.gradgradcheck(conv, inputs)


@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (6, 3), (2, 3, 3, 2, 2)])
def test_batch_norm_derivatives_match_finite_differences(ext, shape):
    x, w, b = f64(*shape), f64(shape[1]), f64(shape[1])
    bn = lambda x, w, b: ext.batch_norm(x, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(bn, (x, w, b))
    assert torch.autograd.gradgradcheck(bn, (x, w, b))


def second_derivatives(op, inputs):
    """Gradients of a scalar made of first derivatives: the second-order path MAML takes."""
    out = op(*inputs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out.sin() * weights).sum(), inputs, create_graph=True)
    total = sum((g * g.detach().cos()).sum() for g in grads)
    return grads, torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_values_as_pytorch(ext, channels_last):
    """Forward and first backward are PyTorch's own kernels (equal bits in float32); the
    second derivatives equal PyTorch's to rounding in float64."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(8, 4, 9, 9, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        w, b = (
            torch.randn(5, 4, 3, 3, dtype=dtype, requires_grad=True),
            torch.randn(5, dtype=dtype, requires_grad=True),
        )
        g, beta = (
            torch.rand(5, dtype=dtype, requires_grad=True),
            torch.randn(5, dtype=dtype, requires_grad=True),
        )
        ours = lambda x, w, b, g, beta: ext.batch_norm(  # noqa: E731
            ext.conv2d(x, w, b, [2, 2], [1, 1], [1, 1], 1), g, beta, 1e-5
        )
        theirs = lambda x, w, b, g, beta: F.batch_norm(  # noqa: E731
            F.conv2d(x, w, b, stride=2, padding=1), None, None, g, beta, True, 0.0, 1e-5
        )
        inputs = (x, w, b, g, beta)
        assert torch.equal(ours(*inputs), theirs(*inputs))
        (g1, h1), (g2, h2) = second_derivatives(ours, inputs), second_derivatives(theirs, inputs)
        for a, c in zip(g1, g2):
            assert torch.equal(a, c)
        if dtype == torch.float64:  # the conv bias's is 0 up to rounding (batch norm follows)
            scale = max(c.abs().max() for c in h2)
            for a, c in zip(h1, h2):
                assert (a - c).abs().max() <= 1e-10 * scale


def episodes(way, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(way)
    return Episodes(
        torch.rand(batch, way, 1, 28, 28, generator=g, dtype=torch.float64),
        labels.expand(batch, -1).contiguous(),
        torch.rand(batch, 3 * way, 1, 28, 28, generator=g, dtype=torch.float64),
        labels.repeat_interleave(3).expand(batch, -1).contiguous(),
        labels.expand(batch, -1).contiguous(),
    )


def meta_gradient(make, eps):
    torch.manual_seed(0)
    learner = make().double()
    learner.configure_optimizer(lambda p: torch.optim.SGD(p, lr=0.0))
    learner.meta_train_step(eps)
    return torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])


@pytest.mark.parametrize("batched", ["loop", "threads"])
@pytest.mark.parametrize("learner", ["maml", "imaml"])
def test_meta_gradient_same_with_and_without_fused_kernels(ext, monkeypatch, learner, batched):
    def make():
        backbone = conv4(variant="strided", channels_last=False)
        if learner == "maml":
            return MAML(backbone, 5, inner_steps=2, inner_lr=0.4, batched=batched)
        return IMAML(backbone, 5, inner_steps=3, cg_steps=2, batched=batched)

    eps = episodes(5, 2)
    monkeypatch.setenv("METARUN_FUSED_KERNELS", "0")
    calls = []
    monkeypatch.setattr(second_order, "extension", lambda: calls.append(1) or ext)
    reference = meta_gradient(make, eps)
    assert not calls  # disabled: never asked for
    monkeypatch.setenv("METARUN_FUSED_KERNELS", "1")
    fused = meta_gradient(make, eps)
    assert calls  # enabled: the convolutions and batch norms went through it
    assert (fused - reference).abs().max() <= 1e-10 * reference.abs().max()


def test_learners_convolutions_become_fused_and_keep_their_parameters():
    backbone = conv4(variant="strided", channels_last=False)
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    params = [id(p) for p in backbone.parameters()]
    keys = [
        f"{name}.{key}"
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Conv2d)
        for key in m.state_dict()
    ]
    learner = MAML(backbone, 5)
    assert all(type(m) is second_order.FusedConv2d for m in convs)
    assert [id(p) for p in learner.backbone.parameters()] == params
    assert set(keys) <= set(learner.backbone.state_dict()) and len(keys) == 8


def test_fallback_when_the_extension_cannot_be_built(monkeypatch):
    """A failed build warns once, names the fix, and leaves PyTorch's ops in place: the
    learner still trains and its meta-gradient is the same."""
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(second_order, "_state", {})
    monkeypatch.setenv("METARUN_FUSED_KERNELS", "1")
    make = lambda: MAML(conv4(variant="strided", channels_last=False), 5, inner_steps=1)  # noqa: E731
    eps = episodes(5, 2)
    with pytest.warns(
        RuntimeWarning, match="could not build its fused second-order kernels.*C\\+\\+ compiler"
    ):
        fused_attempt = meta_gradient(make, eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second use does not warn again
        meta_gradient(make, eps)
    monkeypatch.setenv("METARUN_FUSED_KERNELS", "0")
    assert torch.equal(fused_attempt, meta_gradient(make, eps))


def test_not_applied_where_it_cannot_run(ext):
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    assert second_order.applies(x)
    with torch.no_grad():
        assert not second_order.applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not second_order.applies(x)
    assert not second_order.applies(x.to(torch.bfloat16))
    assert not second_order.applies(torch.randn(3, dtype=torch.float64).to("meta"))
    seen = []
    torch.func.vmap(lambda t: seen.append(second_order.applies(t)) or t)(x)
    assert seen == [False]


def test_cache_dir_is_per_torch_version(monkeypatch, tmp_path):
    monkeypatch.setenv("METARUN_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert second_order.cache_dir().parent == tmp_path / "kernels"
    monkeypatch.delenv("METARUN_KERNEL_CACHE")
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "cache"))
    folder = second_order.cache_dir()
    assert folder.parent == tmp_path / "cache" / "kernels"
    assert torch.__version__.split("+")[0] in folder.name
