"""Matching Networks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.params import PositiveFloat, PositiveInt
from metarun.errors import ConfigError

from .base import MetaLearner, embed_tasks, feature_shape, infer_way, positive_ints


class MatchingNet(MetaLearner):
    """Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra, NeurIPS 2016).

    A query's class distribution is an attention-weighted sum of the support
    labels: P(y | x, S) = sum_i a(x, x_i) y_i with a = softmax over the support
    set of the cosine similarity c(f(x), g(x_i)) (paper eqs. 1-2). `predict`
    returns log P as logits, so the default cross-entropy loss is the paper's
    objective, -log P(true class | x, S), trained episodically.

    fce=True adds the full context embeddings of the paper's appendix:
    g(x_i, S) = g'(x_i) + forward + backward hidden states of a bidirectional
    LSTM over the support set (A.2), and f(x, S) = h_K of an attention LSTM run
    for K = fce_steps processing steps (A.1):
        r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)
        h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1});  h_k = h^_k + f'(x)
    f' = g' is the backbone (one shared network, flattened to D features).

    Departures and choices the paper leaves open:
    - Optimizer: the runner's Adam and its learning rate (trainer.lr), as for
      every learner here.
    - Support and query images go through the backbone in one batch, so in
      training mode batch norm statistics cover both; evaluation uses running
      statistics.
    - The attention LSTM's hidden state [h, r] is fed as an LSTMCell with input
      [f'(x), r] and hidden h: the gates are the same linear function of
      f'(x), h and r, so this is the paper's cell with the weights laid out
      differently. Its start state is h^_0 = 0, c_0 = 0, i.e. h_0 = f'(x) (the
      paper does not give one; this follows Hariharan & Girshick's, ICCV 2017,
      reimplementation, which also uses K = 5, our default fce_steps).
    - The bidirectional LSTM reads the support set in the order given, which is
      class-major as sampled (the paper treats S as a sequence without fixing
      an order), so a reordered support set can give slightly different logits.
    - scale (default 1.0, the paper's plain cosine) multiplies the cosine
      similarities before the softmax; learn_scale=True learns it. Neither is
      in the paper: without a scale the attention can be no sharper than
      e^1 : e^-1, which caps P(true class) (0.65 for 5-way 1-shot).
    - Probabilities are clamped at float32's smallest normal number before the
      log, so a class with vanishing attention gives a finite loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        fce: bool = False,
        fce_steps: PositiveInt = 5,
        scale: PositiveFloat = 1.0,
        learn_scale: bool = False,
    ):
        super().__init__()
        if not scale > 0:
            raise ConfigError(f"algo.scale must be positive, got {scale}; 1.0 is the paper's")
        self.backbone = backbone
        self.fce = fce
        self.fce_steps = fce_steps
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learn_scale else float(scale)
        if fce:
            dim = feature_dim(backbone, fce_steps)
            # hidden size D on both sides, so the skip connections g' + h and f' + h^ add up
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_lstm = nn.LSTMCell(2 * dim, dim)

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        z_support, z_query = self.embed(support_x, query_x)  # [B, ns, D], [B, nq, D]
        if self.fce:
            z_support = self.support_context(z_support)  # g(x_i, S)
            z_query = self.query_context(z_query, z_support)  # f(x, S)
        attention = self.cosine_attention(z_query, z_support)  # [B, nq, ns]
        return label_log_probs(attention, support_y, way)

    def embed(self, support_x, query_x) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone call for every image of every task, feature maps flattened."""
        return embed_tasks(self.backbone, support_x, query_x)  # [B, ns, D], [B, nq, D]

    def support_context(self, g: torch.Tensor) -> torch.Tensor:
        """g(x_i, S) = g'(x_i) + forward + backward BiLSTM states: [B, ns, D] -> [B, ns, D]."""
        states, _ = self.support_lstm(g)  # [B, ns, 2D]
        forward, backward = states.chunk(2, dim=-1)
        return g + forward + backward

    def query_context(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """f(x, S): K attention-LSTM steps for every query at once, [B, nq, D] -> [B, nq, D]."""
        b, n_query, d = f.shape
        f_flat = f.reshape(b * n_query, d)
        h, c = f_flat, torch.zeros_like(f_flat)  # h^_0 = 0, so h_0 = f'(x)
        for _ in range(self.fce_steps):
            # content-based read of the support set: softmax over h . g(x_i)
            weights = torch.softmax(h.reshape(b, n_query, d) @ g.transpose(1, 2), dim=-1)
            read = (weights @ g).reshape(b * n_query, d)  # r_{k-1}: [B*nq, D]
            h_hat, c = self.query_lstm(torch.cat([f_flat, read], dim=-1), (h, c))
            h = h_hat + f_flat
        return h.view(b, n_query, d)

    def cosine_attention(self, z_query: torch.Tensor, z_support: torch.Tensor) -> torch.Tensor:
        """Softmax over the support set of (scaled) cosine similarities: [B, nq, ns]."""
        sims = F.normalize(z_query, dim=-1) @ F.normalize(z_support, dim=-1).transpose(1, 2)
        return torch.softmax(self.scale * sims.float(), dim=-1)


def label_log_probs(attention: torch.Tensor, support_y: torch.Tensor, way: int) -> torch.Tensor:
    """log sum_i a_i onehot(y_i): attention [B, nq, ns] -> log-probabilities [B, nq, way]."""
    onehot = F.one_hot(support_y, way).float()  # [B, ns, way]
    # float32 even under autocast: the log of a bf16 probability would be coarse
    with torch.autocast(attention.device.type, enabled=False):
        probs = attention.float() @ onehot  # [B, nq, way]
    return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


def feature_dim(backbone: nn.Module, fce_steps: int) -> int:
    """D, the flattened embedding size the FCE LSTMs are built for."""
    positive_ints(fce_steps=fce_steps)
    return math.prod(feature_shape(backbone, "fce=true (its LSTMs)"))
