"""Memory-Augmented Neural Network (Santoro, Bartunov, Botvinick, Wierstra, Lillicrap,
ICML 2016, "Meta-Learning with Memory-Augmented Neural Networks").

An episode is a sequence. At step t the network sees an image x_t together with the label
of the previous step, y_{t-1} (nothing at t=1), and must output y_t. Class labels are
shuffled per episode, so the only way to be right is to bind images to labels as they
arrive: the first presentation of a class is a guess, later ones can be read back from
memory. The memory is wiped between episodes.

Equations of the paper (Sec. 3, "Least Recently Used Access") and where they live here:

  controller   (h_t, c_t) = LSTM([x_t ; y_{t-1} ; r_{t-1}], (h_{t-1}, c_{t-1}))   `step`
               for each read head: key k_t = W_k h_t, gate alpha_t = w_a h_t
  (2) K(k_t, M_t(i)) = k_t . M_t(i) / (||k_t|| ||M_t(i)||)                       `read_weights`
  (3) w^r_t(i) = exp K(k_t, M_t(i)) / sum_j exp K(k_t, M_t(j))                   `read_weights`
  (4) r_t = sum_i w^r_t(i) M_t(i)                                                `memory_step`
  (5) w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t    (summed over heads)              `memory_step`
  (6) w^lu_t(i) = 1 if w^u_t(i) <= m(w^u_t, n) else 0: the n least-used slots,
      n = number of read heads; m(v, n) is v's n-th smallest element              `least_used`
  (7) w^w_t = sigmoid(alpha_t) w^r_{t-1} + (1 - sigmoid(alpha_t)) w^lu_{t-1}      `memory_step`
  (8) before writing, the slot least used by w^u_{t-1} is set to zero; then
      M_t(i) = M_{t-1}(i) + w^w_t(i) k_t                                          `memory_step`
  output       o_t = W_o [h_t ; r_t] + b_o   (logits; softmax in the loss)        `step`

Choices the paper leaves open, stated: reads use the memory after this step's write (the
order of the equations); w^lu has exactly n ones, ties in usage broken by the lower slot
index; the memory, usage and previous read weights start at zero (cosine similarity with a
zero slot is 0); the previous reads r_{t-1} are part of the controller's input, as in the
Neural Turing Machine the paper builds on.

Labels: "onehot" (the paper's 5-way experiments) or "string" (the paper's encoding for
more classes: each class gets a random 5-character string over an alphabet of 5 per
episode, the input is 5 concatenated one-hots, the output 5 softmaxes; a class's score is
the sum of its characters' log-probabilities and training minimises their negative sum).

Images enter as flattened pixels (`backbone=pixels`, the paper) or as any backbone's
embedding (e.g. `backbone=conv4_strided`), trained end to end with the rest.

memory=False is the paper's LSTM baseline: the same controller and output layer, no memory.

Within the runner: meta_train_step shuffles each task's support and query images into
one labelled sequence and minimises the loss over every step, logging accuracy by
instance (the k-th presentation of a class). `predict` (the N-way K-shot contract)
presents the support set as a labelled sequence in a fixed shuffled order, then each
query alone (from the state the support set left, so queries do not see each other) with
the last support label as its previous-label input, and reads the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.params import PositiveInt, Probability
from metarun.errors import ConfigError

from .base import MetaLearner, feature_shape, infer_way, mean_ci95, positive_ints

LABELS = ("onehot", "string")
# instance numbers reported like the paper's Table 1
REPORTED_INSTANCES = (1, 2, 3, 4, 5, 10)


def read_weights(
    keys: torch.Tensor,
    memory: torch.Tensor,
    strength: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Eqs. (2)-(3): softmax over slots of the cosine similarity between each head's key and
    each memory row. keys [B, R, W], memory [B, N, W] -> weights [B, R, N]. strength [B, R]
    (optional, not in the paper) multiplies the similarities first, as the Neural Turing
    Machine's key strength beta."""
    k = F.normalize(keys, dim=-1, eps=eps)
    m = F.normalize(memory, dim=-1, eps=eps)
    similarity = torch.einsum("brw,bnw->brn", k, m)
    if strength is not None:
        similarity = similarity * strength.unsqueeze(-1)
    return similarity.softmax(-1)


_COMPILED_STEP = []


def compiled_step():
    """MANN.step under torch.compile, made once per process on first use (a function, not a
    module attribute, so copies and pickles of a MANN stay plain)."""
    if not _COMPILED_STEP:
        _COMPILED_STEP.append(torch.compile(MANN.step))
    return _COMPILED_STEP[0]


def least_used(usage: torch.Tensor, n: int) -> torch.Tensor:
    """Eq. (6): 1 at the n least-used slots, 0 elsewhere (ties: lower slot index first).
    usage [B, N] -> [B, N]."""
    idx = usage.argsort(dim=-1, stable=True)[:, :n]
    return torch.zeros_like(usage).scatter_(1, idx, 1.0)


@dataclass
class MemoryState:
    """What the network carries from one step to the next within an episode."""

    h: torch.Tensor  # [B, H] controller output
    c: torch.Tensor  # [B, H] controller cell
    reads: torch.Tensor  # [B, R*W] r_{t-1}
    memory: torch.Tensor | None = None  # [B, N, W] M_{t-1}
    usage: torch.Tensor | None = None  # [B, N] w^u_{t-1}
    read_w: torch.Tensor | None = None  # [B, R, N] w^r_{t-1}
    lu: torch.Tensor | None = None  # [B, N] w^lu_{t-1}

    def expand(self, k: int) -> MemoryState:
        """Each task's state repeated k times along the batch (one copy per query)."""
        return MemoryState(
            **{
                name: None if v is None else v.repeat_interleave(k, dim=0)
                for name, v in self.__dict__.items()
            }
        )


class MANN(MetaLearner):
    """MANN with Least Recently Used Access (see the module docstring for the equations)."""

    title = "MANN"
    # trainer.compile=true also compiles the recurrent step (see compile_network)
    compile_step = False

    def __init__(
        self,
        backbone: nn.Module,
        way: PositiveInt,
        controller_size: PositiveInt = 200,
        memory_slots: PositiveInt = 128,
        memory_width: PositiveInt = 40,
        read_heads: PositiveInt = 4,
        gamma: Probability = 0.95,
        memory: bool = True,
        key_strength: bool = False,
        read_first: bool = False,
        labels: str = "onehot",
        string_length: PositiveInt = 5,
        string_chars: PositiveInt = 5,
    ):
        super().__init__()
        positive_ints(
            way=way,
            controller_size=controller_size,
            memory_slots=memory_slots,
            memory_width=memory_width,
            read_heads=read_heads,
            string_length=string_length,
            string_chars=string_chars,
        )
        if labels not in LABELS:
            raise ConfigError(f"algo.labels={labels!r}; choose one of {', '.join(LABELS)}")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"algo.gamma (usage decay) must be in [0, 1], got {gamma!r}")
        if memory and read_heads > memory_slots:
            raise ConfigError(
                f"algo.read_heads={read_heads} exceeds algo.memory_slots={memory_slots}; "
                "least-recently-used writing needs at least one slot per head"
            )
        if labels == "string" and string_chars**string_length < way:
            raise ConfigError(
                f"{string_chars}^{string_length} label strings cannot name {way} classes; "
                "raise algo.string_length or algo.string_chars"
            )
        self.backbone, self.way = backbone, way
        self.use_memory, self.labels = bool(memory), labels
        self.slots, self.width, self.heads = memory_slots, memory_width, read_heads
        self.gamma = float(gamma)
        self.string_length, self.string_chars = string_length, string_chars
        self.label_dim = way if labels == "onehot" else string_length * string_chars
        features = math.prod(feature_shape(backbone, "MANN"))
        read_dim = read_heads * memory_width if memory else 0
        self.controller = nn.LSTMCell(features + self.label_dim + read_dim, controller_size)
        if memory:
            self.key = nn.Linear(controller_size, read_heads * memory_width)
            self.gate = nn.Linear(controller_size, read_heads)
        self.read_first = bool(read_first)
        self.key_strength = bool(key_strength) and self.use_memory
        if self.key_strength:  # beta = softplus(w h + b), starting near 10 (sharp reads)
            self.strength = nn.Linear(controller_size, read_heads)
            nn.init.zeros_(self.strength.weight)
            nn.init.constant_(self.strength.bias, 10.0)
        self.out = nn.Linear(controller_size + read_dim, self.label_dim)

    def compile_network(self) -> None:
        """trainer.compile=true: the backbone as for every learner, and the recurrent step,
        which the sequence loop calls once per time step: torch.compile fuses its many small
        operations (on a 2-core CPU the preset's training step ran 1.36x as fast, after a
        compilation of about 20 s). The weights and the state dict are unchanged."""
        super().compile_network()
        self.compile_step = True

    # -- the recurrent step ------------------------------------------------------
    def initial_state(self, batch: int, like: torch.Tensor) -> MemoryState:
        z = like.new_zeros
        h = self.controller.hidden_size
        if not self.use_memory:
            return MemoryState(h=z(batch, h), c=z(batch, h), reads=z(batch, 0))
        usage = z(batch, self.slots)
        return MemoryState(
            h=z(batch, h),
            c=z(batch, h),
            reads=z(batch, self.heads * self.width),
            memory=z(batch, self.slots, self.width),
            usage=usage,
            read_w=z(batch, self.heads, self.slots),
            lu=least_used(usage, self.heads),
        )

    def memory_step(
        self,
        state: MemoryState,
        keys: torch.Tensor,
        alpha: torch.Tensor,
        strength: torch.Tensor | None = None,
    ) -> MemoryState:
        """One write then one read with Least Recently Used Access, Eqs. (2)-(8).
        keys [B, R, W], alpha [B, R] -> the next state (h and c are the caller's)."""
        gate = torch.sigmoid(alpha).unsqueeze(-1)  # [B, R, 1]
        write_w = gate * state.read_w + (1 - gate) * state.lu.unsqueeze(1)  # (7) [B, R, N]
        # (8) zero the slot least used so far (by w^u_{t-1}), then add each head's key
        oldest = least_used(state.usage, 1)  # [B, N], one 1
        memory = state.memory * (1 - oldest).unsqueeze(-1)
        memory = memory + torch.einsum("brn,brw->bnw", write_w, keys)
        seen = state.memory if self.read_first else memory
        read_w = read_weights(keys, seen, strength)  # (2)-(3)
        reads = torch.einsum("brn,bnw->brw", read_w, seen)  # (4)
        usage = self.gamma * state.usage + read_w.sum(1) + write_w.sum(1)  # (5)
        return MemoryState(
            h=state.h,
            c=state.c,
            reads=reads.flatten(1),
            memory=memory,
            usage=usage,
            read_w=read_w,
            lu=least_used(usage, self.heads),  # (6)
        )

    def static_gates(self, features: torch.Tensor, prev_label: torch.Tensor) -> torch.Tensor:
        """The controller's gate inputs from x_t and y_{t-1}, for every step at once (both are
        known before the sequence runs): [..., D], [..., L] -> [..., 4H]. Only the parts from
        h_{t-1} and r_{t-1} are left to the step loop."""
        cell = self.controller
        n = features.shape[-1] + prev_label.shape[-1]
        return F.linear(
            torch.cat([features, prev_label], dim=-1),
            cell.weight_ih[:, :n],
            cell.bias_ih + cell.bias_hh,
        )

    def step_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The weights every step uses, assembled once per sequence (fewer, larger matrix
        products per step; and a slice of a parameter taken at every step would cost a
        parameter-sized gradient each time):
        - recurrent [4H, H (+ R*W)]: the LSTM's weights on h_{t-1} (and on r_{t-1});
        - heads [R*W + R (+ R), H] and its bias: the keys, the gates alpha (and the key
          strengths) computed from h_t in one product."""
        cell = self.controller
        if not self.use_memory:
            return cell.weight_hh, None, None
        recurrent = torch.cat([cell.weight_hh, cell.weight_ih[:, -self.heads * self.width :]], 1)
        layers = [self.key, self.gate] + ([self.strength] if self.key_strength else [])
        return (
            recurrent,
            torch.cat([m.weight for m in layers]),
            torch.cat([m.bias for m in layers]),
        )

    def step_function(self):
        """MANN.step, or its compiled form after compile_network; called as f(self, ...)."""
        return compiled_step() if self.compile_step else MANN.step

    def step(self, state: MemoryState, static: torch.Tensor, weights) -> tuple:
        """One time step: static [B, 4H] from static_gates, weights from step_weights ->
        (readout [h_t ; r_t] of shape [B, H + R*W] for the output layer, next state). The LSTM
        cell is nn.LSTMCell's (its weights, and its gate order: input, forget, cell, output)."""
        recurrent, heads, head_bias = weights
        previous = torch.cat([state.h, state.reads], dim=-1) if self.use_memory else state.h
        gates = static + F.linear(previous, recurrent)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if self.use_memory:
            n_keys = self.heads * self.width
            emitted = F.linear(h, heads, head_bias)
            keys = emitted[:, :n_keys].view(h.shape[0], self.heads, self.width)
            alpha = emitted[:, n_keys : n_keys + self.heads]
            strength = F.softplus(emitted[:, n_keys + self.heads :]) if self.key_strength else None
            state = self.memory_step(state, keys, alpha, strength)
            state.h, state.c = h, c
        else:
            state = MemoryState(h=h, c=c, reads=state.reads)
        return torch.cat([h, state.reads], dim=-1), state

    def run(
        self, features: torch.Tensor, prev_labels: torch.Tensor, state: MemoryState | None = None
    ) -> tuple[torch.Tensor, MemoryState]:
        """A whole sequence: features [B, T, D], prev_labels [B, T, L] -> outputs [B, T, L]."""
        if state is None:
            state = self.initial_state(features.shape[0], features)
        readouts, weights = [], self.step_weights()
        step = self.step_function()
        # unbind, not static[:, t]: the backward of one unbind is one stack, while each
        # slice's backward would fill and add a tensor of the whole sequence's size
        for static in self.static_gates(features, prev_labels).unbind(1):  # [B, 4H] per step
            readout, state = step(self, state, static, weights)
            readouts.append(readout)
        return self.out(torch.stack(readouts, dim=1)), state  # the output layer, once

    # -- labels --------------------------------------------------------------------
    def label_codes(self, b: int, way: int, device, generator=None) -> torch.Tensor | None:
        """String mode: per task, `way` distinct random strings as character indices
        [B, way, length]; one-hot mode: None."""
        if self.labels == "onehot":
            return None
        n = self.string_chars**self.string_length
        if generator is None:
            ids = torch.rand(b, n).argsort(-1)[:, :way]  # distinct per task
        else:  # evaluation: the same strings for every task, whatever the batch
            ids = torch.rand(1, n, generator=generator).argsort(-1)[:, :way].expand(b, -1)
        digits = self.string_chars ** torch.arange(self.string_length - 1, -1, -1)
        codes = (ids.unsqueeze(-1) // digits) % self.string_chars
        return codes.to(device)

    def encode_labels(self, y: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """Labels [B, T] -> network input [B, T, L]."""
        if codes is None:
            return F.one_hot(y, self.way).float()
        chars = torch.gather(codes, 1, y.unsqueeze(-1).expand(-1, -1, self.string_length))
        return F.one_hot(chars, self.string_chars).flatten(-2).float()

    def shifted(self, y: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """The previous-label input: y_{t-1} at step t, zeros at the first step."""
        enc = self.encode_labels(y, codes)
        return torch.cat([torch.zeros_like(enc[:, :1]), enc[:, :-1]], dim=1)

    def class_scores(self, outputs: torch.Tensor, codes: torch.Tensor | None, way: int):
        """Outputs [B, T, L] -> per-class scores [B, T, way]: the logits (one-hot), or each
        class string's log-probability under the 5 character softmaxes (string)."""
        if codes is None:
            return outputs[..., :way]
        logp = outputs.unflatten(-1, (self.string_length, self.string_chars)).log_softmax(-1)
        # logp [B, T, len, chars]; codes [B, way, len] -> [B, T, way]
        idx = codes.unsqueeze(1).expand(-1, logp.shape[1], -1, -1)  # [B, T, way, len]
        per_char = torch.gather(
            logp.unsqueeze(2).expand(-1, -1, way, -1, -1), 4, idx.unsqueeze(-1)
        ).squeeze(-1)
        return per_char.sum(-1)

    def sequence_loss(self, scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One-hot: cross-entropy over classes. String: the 5 characters' negative
        log-likelihoods summed (the string's log-probability is the class score)."""
        if self.labels == "onehot":
            return F.cross_entropy(scores.flatten(0, 1).float(), y.flatten())
        return -torch.gather(scores.float(), -1, y.unsqueeze(-1)).mean()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, T, C, H, W] -> features [B, T, D], in one backbone call."""
        return self.backbone(x.flatten(0, 1)).flatten(1).unflatten(0, x.shape[:2])

    # -- the contract ----------------------------------------------------------------
    def sequence_scores(self, x, y, way, generator=None):
        """Present labelled sequences x [B, T, ...], y [B, T]: per-step class scores
        [B, T, way] (scores at step t are made before y_t is shown)."""
        codes = self.label_codes(x.shape[0], way, x.device, generator)
        with self.autocast():
            outputs, _ = self.run(self.embed(x), self.shifted(y, codes))
        return self.class_scores(outputs, codes, way), codes

    def meta_train_step(self, episodes) -> dict[str, torch.Tensor]:
        self.train()
        way = episodes.way
        self.check_way(way)
        x = torch.cat([episodes.support_x, episodes.query_x], dim=1)
        y = torch.cat([episodes.support_y, episodes.query_y], dim=1)
        x, y = shuffled(x, y)  # a fresh order per task
        scores, _ = self.sequence_scores(x, y, way)
        loss = self.sequence_loss(scores, y)
        self.outer_update(loss)
        correct = (scores.argmax(-1) == y).float().detach()
        metrics = {"loss": loss.detach(), "acc": correct.mean(-1)}
        instance = instance_numbers(y, way)
        for k in range(1, min(int(instance.max()), 10) + 1):
            metrics[f"acc_inst{k}"] = correct[instance == k].mean()
        return metrics

    def predict(self, support_x, support_y, query_x, way=None):
        way = infer_way(support_y, way)
        self.check_way(way)
        b, n_query = support_x.shape[0], query_x.shape[1]
        # a shuffled support order that is the same on every call (evaluation is repeatable)
        gen = torch.Generator().manual_seed(0)
        sx, sy = shuffled(support_x, support_y, gen)
        codes = self.label_codes(b, way, support_x.device, gen)
        with self.autocast():
            _, state = self.run(self.embed(sx), self.shifted(sy, codes))
            # every query right after the support set, from the same state, with y_T as input
            last = self.encode_labels(sy[:, -1:], codes)  # [B, 1, L]
            qf = self.embed(query_x).flatten(0, 1)  # [B*nq, D]
            static = self.static_gates(qf, last.expand(-1, n_query, -1).flatten(0, 1))
            readout, _ = self.step_function()(
                self, state.expand(n_query), static, self.step_weights()
            )
            out = self.out(readout)
        qcodes = None if codes is None else codes.repeat_interleave(n_query, dim=0)
        scores = self.class_scores(out.unsqueeze(1), qcodes, way)  # [B*nq, 1, way]
        return scores.view(b, n_query, way)

    @torch.no_grad()
    def test_report(self, episodes, batch_size: int | None = None) -> dict:
        """Accuracy by instance on the fixed test episodes, each presented as one labelled
        sequence (support and query images in a fixed shuffled order), as in the paper's
        Table 1: {"instance_acc": {"1": mean, ...}, "instance_ci95": {...}}."""
        was_training = self.training
        self.eval()
        per_k: dict[int, list[torch.Tensor]] = {}
        for batch in episodes.batches(batch_size or 32):
            gen = torch.Generator().manual_seed(1)  # the same order for every episode
            x = torch.cat([batch.support_x, batch.query_x], dim=1)
            y = torch.cat([batch.support_y, batch.query_y], dim=1)
            x, y = shuffled(x, y, gen)
            scores, _ = self.sequence_scores(x, y, batch.way, gen)
            correct = (scores.argmax(-1) == y).float()
            instance = instance_numbers(y, batch.way)
            for k in REPORTED_INSTANCES:
                mask = instance == k
                if mask.any():  # per episode: mean over the classes' k-th presentations
                    per_k.setdefault(k, []).append(
                        (correct * mask).sum(-1) / mask.sum(-1).clamp(min=1)
                    )
        self.train(was_training)
        acc, ci = {}, {}
        for k, values in per_k.items():
            acc[str(k)], ci[str(k)] = mean_ci95(torch.cat(values).cpu())
        return {"instance_acc": acc, "instance_ci95": ci}

    def test_summary(self, report: dict) -> dict:
        return {f"test/acc_inst{k}": acc for k, acc in report.get("instance_acc", {}).items()}


def shuffled(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
    """Each task's items x [B, T, ...] and labels y [B, T] in a random order: its own from
    the global RNG on y's device (training), or, from `generator` (evaluation), one order
    drawn on the CPU for every task, so that a task's order, and so its score, depends on
    neither the device nor the other tasks of its batch (eval.batch)."""
    if generator is None:
        order = torch.rand(y.shape, device=y.device).argsort(-1)
    else:
        order = torch.rand(y.shape[-1], generator=generator).argsort().to(y.device)
        order = order.expand(y.shape)
    index = order.view(*order.shape, *[1] * (x.dim() - 2)).expand_as(x)
    return torch.gather(x, 1, index), torch.gather(y, 1, order)


def instance_numbers(y: torch.Tensor, way: int) -> torch.Tensor:
    """For labels [B, T]: at each step, which presentation of its class this is (1 = the
    first time the class appears in the episode)."""
    onehot = F.one_hot(y, way)
    return torch.gather(onehot.cumsum(1), -1, y.unsqueeze(-1)).squeeze(-1)


__all__ = ["MANN", "instance_numbers", "least_used", "read_weights"]
