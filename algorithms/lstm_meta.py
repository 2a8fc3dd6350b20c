"""The LSTM meta-learner: an LSTM that learns the learner's update rule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from metarun.data.params import NonNegativeInt, PositiveInt

from .base import HeadLearner, infer_way, positive_ints, supervised_loss


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """The gradient preprocessing of Andrychowicz et al. (2016) that Ravi & Larochelle apply
    to the learner's gradients and loss: x -> (log|x| / p, sign x) when |x| >= e^-p, else
    (-1, e^p x). Two numbers of comparable scale per value: [...] -> [..., 2]."""
    big = x.abs() >= math.exp(-p)
    first = torch.where(big, x.abs().clamp_min(1e-30).log() / p, torch.full_like(x, -1.0))
    second = torch.where(big, x.sign(), math.exp(p) * x)
    return torch.stack([first, second], -1)


class LSTMMetaLearner(HeadLearner):
    """Optimization as a model for few-shot learning (Ravi & Larochelle, ICLR 2017).

    The learner is the backbone plus a linear head (the module's own backbone and head);
    its initial weights theta_0 are meta-learned, as the paper's initial cell state c_0.
    For each task, `inner_steps` updates on the support set, each made by the meta-learner,
    a two-layer LSTM applied to every coordinate (weight) of the learner separately, with
    its parameters shared across coordinates:

    - input per coordinate: the preprocessed gradient and loss of the learner on the
      support set (`preprocess`, 4 numbers);
    - layer 1: an ordinary LSTM with `hidden_size` units (paper: 20);
    - layer 2 (Eq. 2 and the gates of Sec. 3.2): its cell state is the learner's weight,
      c_t = f_t * c_{t-1} + i_t * (-grad_t), with
      i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I) the learned learning rate and
      f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F) the learned shrinkage (weight
      decay); theta_t = c_t.

    The query loss of theta_T trains the LSTM's weights and theta_0 (Adam, gradient norm
    clipped at trainer.grad_clip, the paper's 0.25 in its yaml), back through the T updates. As in the paper
    (Sec. 3.3), the learner's gradients and losses are inputs whose own derivatives are
    dropped ("ignore second derivatives"), so no Hessian is formed. Batch norm: the
    learner uses the statistics of the batch it sees, in training and at test time, and
    keeps none (the paper's choice, Sec. 3.4). Gate biases start with the forget gate near
    1 (b_F in [4, 6]) and the input gate small (b_I in [-5, -4]), so the meta-learner starts
    as plain gradient descent with a small step, as the paper describes.

    Departures: the paper evaluates on miniImageNet only; the Omniglot settings of the
    presets are chosen here. The meta-learner's gate weights for the hidden state are
    shared by all coordinates, as in the paper; all tasks of a meta-batch are updated at
    once (their coordinates stacked).
    """

    compile_refusal = (
        "its inner loop runs the learner through torch.func.functional_call with per-task "
        "weights inside torch.autograd.grad, which torch.compile leaves uncompiled"
    )
    title = "LSTM meta-learner"
    supports_regression = False  # the paper's learner is a classifier; not tried on sinusoid

    def __init__(
        self,
        backbone: nn.Module,
        way: PositiveInt,
        inner_steps: PositiveInt = 5,
        test_inner_steps: NonNegativeInt | None = None,
        hidden_size: PositiveInt = 20,
        forget_bias: tuple[float, float] = (4.0, 6.0),
        input_bias: tuple[float, float] = (-5.0, -4.0),
    ):
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        positive_ints(
            inner_steps=inner_steps, test_inner_steps=test_inner_steps, hidden_size=hidden_size
        )
        super().__init__(backbone, way, batch_statistics=True)
        self.inner_steps, self.test_inner_steps = inner_steps, test_inner_steps
        # the learner's weights: those registered before the LSTM's
        self.learner_names = [n for n, _ in self.named_parameters()]
        self.learner_shapes = [p.shape for p in self.parameters()]
        self.lstm = nn.LSTMCell(4, hidden_size)
        # layer 2: [h_t, theta_{t-1}, gate_{t-1}] -> gate, for the input and forget gates
        self.gate_weights = nn.Parameter(torch.empty(2, hidden_size + 2).uniform_(-0.01, 0.01))
        self.gate_biases = nn.Parameter(
            torch.stack(
                [torch.empty(()).uniform_(*input_bias), torch.empty(()).uniform_(*forget_bias)]
            )
        )

    def learner_params(self) -> list[nn.Parameter]:
        params = dict(self.named_parameters())
        return [params[n] for n in self.learner_names]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A task's weight vector [n] -> the learner's named weights."""
        shapes = self.learner_shapes
        parts = flat.split([math.prod(s) for s in shapes])
        return {n: t.view(s) for n, t, s in zip(self.learner_names, parts, shapes)}

    def learner_logits(self, flat: torch.Tensor, x: torch.Tensor, way: int) -> torch.Tensor:
        with self.autocast():
            return functional_call(self, self.unflatten(flat), (x,))[:, :way]

    def loss_and_grad(self, flat: torch.Tensor, x, y, way: int):
        """The learner's support loss and its gradient at `flat`, both as constants."""
        flat = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = supervised_loss(self.learner_logits(flat, x, way), y)
            (grad,) = torch.autograd.grad(loss, flat)
        return loss.detach(), grad

    def adapt(self, support_x, support_y, steps: int, way: int) -> torch.Tensor:
        """theta_T for every task: [B, n]. Differentiable in theta_0 and the LSTM's weights
        when gradients are enabled."""
        b = support_x.shape[0]
        theta0 = torch.cat([p.flatten() for p in self.learner_params()])
        theta = theta0.expand(b, -1)
        n = theta.shape[1]
        hidden = cell = None
        gates = theta.new_zeros(2, b, n)  # i_{t-1}, f_{t-1}
        for _ in range(steps):
            losses, grads = zip(
                *(self.loss_and_grad(theta[t], support_x[t], support_y[t], way) for t in range(b))
            )
            grad = torch.stack(grads)  # [B, n]
            loss = preprocess(torch.stack(losses))[:, None].expand(b, n, 2)  # one per task
            inputs = torch.cat([preprocess(grad), loss], -1).reshape(b * n, 4)
            state = None if hidden is None else (hidden, cell)
            hidden, cell = self.lstm(inputs, state)  # layer 1, one row per coordinate
            h = hidden.view(b, n, -1)
            pre = torch.stack(
                [
                    torch.cat([h, theta[..., None], gates[k][..., None]], -1) @ self.gate_weights[k]
                    + self.gate_biases[k]
                    for k in range(2)
                ]
            )
            gates = torch.sigmoid(pre)
            theta = gates[1] * theta - gates[0] * grad  # c_t = f c_{t-1} + i (-grad)
        return theta

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        self.check_way(way)
        steps = self.inner_steps if self.training else self.test_inner_steps
        theta = self.adapt(support_x, support_y, steps, way)
        return torch.stack([self.learner_logits(t, qx, way) for t, qx in zip(theta, query_x)])
