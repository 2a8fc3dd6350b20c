"""Fused second-order kernels: convolution and batch norm with cheaper second derivatives.

MAML's meta-gradient (and iMAML's Hessian-vector products) differentiate the inner loop's
gradients, so each convolution and batch norm of the inner loop is differentiated twice.
On the CPU, PyTorch's second derivatives of these two ops took 44% of a second-order MAML
step at 20-way 1-shot with 5 inner steps (profile in benchmarks/README.md): batch norm's
is a general formula of some forty elementwise passes over the activations; a strided
convolution's takes its weight term as a dilated convolution with the batch as channels,
and computes an input term for the first layer, whose input (the images) needs none.

`algorithms/second_order.cpp` defines both ops as custom autograd functions whose backward
is itself a custom function with a hand-derived derivative:

- convolution: the backward is linear in the output gradient gy (gx = the input-adjoint
  of the convolution under w, gw = the weight-adjoint under x), so with incoming ggx, ggw,
  ggb: d/dgy = conv(ggx, w) + conv(x, ggw) + ggb, d/dw = the weight-adjoint of gy under
  ggx, d/dx = the input-adjoint of gy under ggw (only when x needs a gradient): two
  convolutions and one or two `convolution_backward` calls.
- batch norm (per channel, n values, xhat = (x - mean) r, r = 1/sqrt(var + eps)): the
  backward gives gbias = sum(gy), gweight = sum(gy xhat) and gx = weight r (gy - a -
  xhat b) with a = mean(gy), b = mean(gy xhat). With incoming ggx, ggw, ggb and the sums
  s1 = sum(ggx gy), s2 = sum(ggx), s3 = sum(ggx xhat), q = s1 - a s2 - b s3:
  d/dweight = r q; d/dgy = weight r (ggx - s2/n - xhat s3/n) + ggw xhat + ggb; and d/dx =
  r P(v) - (weight q r^2 / n) xhat, where v = (ggw - weight r s3/n) gy - weight r b ggx
  is the derivative with respect to xhat and P(v) = v - mean(v) - xhat mean(v xhat) is
  batch norm's own projection. Three reductions and a few fused multiply-adds.

Forward passes and first derivatives call the same ATen kernels as F.conv2d and
F.batch_norm, so they give the same values; second derivatives agree with PyTorch's to
rounding (tests/test_second_order.py checks them against finite differences and against
PyTorch in float64). Written in C++ so that MAML's worker threads run them without
Python's global lock.

The extension is compiled on first use (about 35 s on a 2-core CPU; g++ or clang++ and
ninja, which metarun installs) into `cache_dir()`, once per torch and Python version. It
is used on the CPU, in float32 and float64, with autograd on and no autocast, and outside
torch.func transforms and torch.compile; everywhere else, and when it cannot be built (one
warning says why), the ops are PyTorch's own. METARUN_FUSED_KERNELS=0 turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("metarun")

_SOURCE = Path(__file__).with_name("second_order.cpp")
_lock = threading.Lock()
_state: dict = {}  # "module": the extension (None if it failed to build); "off": a count
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def enabled() -> bool:
    """Whether the fused kernels may be used: METARUN_FUSED_KERNELS is not 0/false/off/no,
    and no `turned_off()` block is running."""
    if _state.get("off"):
        return False
    setting = os.environ.get("METARUN_FUSED_KERNELS", "1").strip().lower()
    return setting not in ("0", "false", "off", "no")


@contextlib.contextmanager
def turned_off():
    """PyTorch's own convolution and batch norm inside the block, in every thread (the
    benchmarks time the learners both ways)."""
    _state["off"] = _state.get("off", 0) + 1
    try:
        yield
    finally:
        _state["off"] -= 1


def cache_dir() -> Path:
    """Where the extension is built: $METARUN_KERNEL_CACHE, else $METARUN_CACHE/kernels,
    else ~/.cache/metarun/kernels; one folder in it per torch and Python version."""
    root, cache = os.environ.get("METARUN_KERNEL_CACHE"), os.environ.get("METARUN_CACHE")
    if root:
        base = Path(root)
    else:
        base = (Path(cache) if cache else Path.home() / ".cache" / "metarun") / "kernels"
    tag = re.sub(
        r"[^A-Za-z0-9_.-]",
        "_",
        f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}",
    )
    return base / tag


def extension():
    """The compiled extension, building it on first call; None if it cannot be built (a
    warning says why, once per process) or METARUN_FUSED_KERNELS=0."""
    if not enabled():
        return None
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def _build():
    folder = cache_dir()
    # pip installs ninja's executable beside Python's; the build looks for it on PATH
    path = os.environ.get("PATH", "")
    bindir = str(Path(sys.executable).parent)
    # torch's CUDA builds log where CUDA_HOME is on import, which a CPU extension never uses
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        folder.mkdir(parents=True, exist_ok=True)
        os.environ["PATH"] = bindir + os.pathsep + path
        if not list(folder.glob("*.so")) and not list(folder.glob("*.pyd")):
            log.info(
                "building the fused second-order kernels into %s (once per torch version; "
                "about half a minute)",
                folder,
            )
        return cpp_extension.load(
            name="metarun_second_order",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, a failed build: PyTorch's ops instead
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(
            f"metarun could not build its fused second-order kernels ({type(err).__name__}: "
            f"{first}); second-order MAML and iMAML use PyTorch's own (slower) second "
            "derivatives instead, with the same results. Install a C++ compiler (g++ or "
            "clang++) and ninja to get them, or set METARUN_FUSED_KERNELS=0 to skip this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    finally:
        os.environ["PATH"] = path
        quiet.setLevel(level)


def _compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(check and check())


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can take these tensors: CPU, float32/float64, autograd
    on, no autocast, no torch.func transform, not being compiled."""
    if _compiling():  # first: what torch.compile traces stays simple
        return False
    if not enabled() or not torch.is_grad_enabled() or _autocast_on():
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or _wrapped(t):
            return False
    return extension() is not None


def batch_norm(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Batch norm with the batch's statistics and none kept (F.batch_norm's training mode
    without running statistics), fused where `applies`."""
    if weight is not None and bias is not None and applies(x, weight, bias):
        return extension().batch_norm(x, weight, bias, float(eps))
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


class FusedConv2d(nn.Conv2d):
    """nn.Conv2d whose convolution runs the fused kernel where `applies`. The parameters
    and state-dict keys are nn.Conv2d's."""

    def _conv_forward(self, x, weight, bias):
        if (
            self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and applies(x, weight, *(() if bias is None else (bias,)))
        ):
            return extension().conv2d(
                x,
                weight,
                bias,
                list(self.stride),
                list(self.padding),
                list(self.dilation),
                self.groups,
            )
        return super()._conv_forward(x, weight, bias)


def use_fused_convolutions(module: nn.Module) -> None:
    """Make every nn.Conv2d in `module` a FusedConv2d, keeping its Parameters."""
    for child in module.modules():
        if type(child) is nn.Conv2d:
            child.__class__ = FusedConv2d  # the same module: parameters, hooks, everything
