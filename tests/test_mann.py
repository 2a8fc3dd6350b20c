"""MANN: the memory's read/write and LRU bookkeeping by hand, the label shift, the
predict contract, string labels, the LSTM-only ablation, and that it learns."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import configure, read_jsonl, run_cli

from metarun.algorithms.backbones import pixels
from metarun.algorithms.mann import MANN, MemoryState, instance_numbers, least_used
from metarun.data import Episodes
from metarun.errors import ConfigError


def small(way=3, **kw):
    args = dict(controller_size=16, memory_slots=8, memory_width=4, read_heads=2)
    args.update(kw)
    return MANN(pixels(1, 2), way=way, **args)


def test_memory_step_matches_the_paper_equations_by_hand():
    """One write then one read on 4 slots of width 2, one head, gamma 0.5, alpha 0."""
    m = MANN(pixels(1, 2), way=2, memory_slots=4, memory_width=2, read_heads=1, gamma=0.5)
    usage = torch.tensor([[0.5, 0.1, 0.3, 0.2]])
    state = MemoryState(
        h=torch.zeros(1, 1),
        c=torch.zeros(1, 1),
        reads=torch.zeros(1, 2),
        memory=torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]]),
        usage=usage,
        read_w=torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]),
        lu=least_used(usage, 1),  # slot 1 is the least used
    )
    assert state.lu.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    key = torch.tensor([[[2.0, 0.0]]])
    new = m.memory_step(state, key, alpha=torch.zeros(1, 1))
    # (7) write weights: sigmoid(0) = 0.5 of the last read (slot 0) + 0.5 of the least used
    # (slot 1) = [0.5, 0.5, 0, 0]. (8) slot 1, least used so far, is zeroed, then the key
    # is added: slot 0 = [1, 0] + 0.5 [2, 0] = [2, 0]; slot 1 = 0 + 0.5 [2, 0] = [1, 0].
    expected_memory = [[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    torch.testing.assert_close(new.memory[0], torch.tensor(expected_memory))
    # (2)-(3) cosine similarities with [2, 0]: 1, 1, 0 (an empty slot), 1/sqrt(2); softmax
    e, e_half = math.e, math.exp(1 / math.sqrt(2))
    total = 2 * e + 1 + e_half
    w = [e / total, e / total, 1 / total, e_half / total]
    torch.testing.assert_close(new.read_w[0, 0], torch.tensor(w))
    # (4) r = sum_i w_i M_i
    torch.testing.assert_close(
        new.reads[0], torch.tensor([2 * w[0] + w[1] + w[3], w[3]]), rtol=1e-5, atol=1e-6
    )
    # (5) usage = 0.5 * old + read + write weights
    u = [0.25 + w[0] + 0.5, 0.05 + w[1] + 0.5, 0.15 + w[2], 0.1 + w[3]]
    torch.testing.assert_close(new.usage[0], torch.tensor(u))
    # (6) the least used slot is now slot 2
    assert new.lu.tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_least_used_marks_exactly_n_slots_and_breaks_ties_by_index():
    usage = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.3, 0.1, 0.2, 0.1]])
    assert least_used(usage, 2).tolist() == [[1, 1, 0, 0], [0, 1, 0, 1]]


def test_state_shapes_through_a_sequence():
    m = small(read_heads=3)
    feats, labels = torch.randn(2, 7, 4), torch.zeros(2, 7, 3)
    out, state = m.run(feats, labels)
    assert out.shape == (2, 7, 3)
    assert state.memory.shape == (2, 8, 4) and state.usage.shape == (2, 8)
    assert state.read_w.shape == (2, 3, 8) and state.reads.shape == (2, 12)
    assert torch.allclose(state.read_w.sum(-1), torch.ones(2, 3))
    assert (state.lu.sum(-1) == 3).all()


def test_instance_numbers():
    y = torch.tensor([[0, 1, 0, 2, 1, 0]])
    assert instance_numbers(y, 3).tolist() == [[1, 1, 2, 1, 2, 3]]


@pytest.mark.parametrize("labels", ["onehot", "string"])
def test_label_of_step_t_is_given_at_t_plus_1_never_at_t(labels):
    """Changing y_t changes no output at steps <= t and changes the output at t + 1."""
    torch.manual_seed(0)
    m = small(labels=labels).eval()
    x = torch.randn(2, 6, 1, 2, 2)
    y = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 2, 1, 0]])
    codes = m.label_codes(2, 3, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        shifted = m.shifted(y, codes)
        assert (shifted[:, 0] == 0).all()  # nothing before the first step
        torch.testing.assert_close(shifted[:, 1:], m.encode_labels(y[:, :-1], codes))
        out, _ = m.run(m.embed(x), shifted)
        t = 3
        y2 = y.clone()
        y2[:, t] = (y[:, t] + 1) % 3
        out2, _ = m.run(m.embed(x), m.shifted(y2, codes))
    torch.testing.assert_close(out[:, : t + 1], out2[:, : t + 1])
    assert not torch.allclose(out[:, t + 1], out2[:, t + 1])


def episodes(batch=2, way=3, shot=2, query=2, seed=0, side=2):
    g = torch.Generator().manual_seed(seed)
    return Episodes(
        support_x=torch.randn(batch, way * shot, 1, side, side, generator=g),
        support_y=torch.arange(way).repeat(shot).repeat(batch, 1),
        query_x=torch.randn(batch, way * query, 1, side, side, generator=g),
        query_y=torch.arange(way).repeat(query).repeat(batch, 1),
        classes=torch.arange(way).repeat(batch, 1),
    )


@pytest.mark.parametrize("labels", ["onehot", "string"])
def test_each_query_is_scored_from_the_support_sequence_alone(labels):
    """Queries are not written to the memory: changing one query changes only its scores."""
    torch.manual_seed(0)
    m = small(labels=labels).eval()
    ep = episodes()
    with torch.no_grad():
        logits = m.predict(ep.support_x, ep.support_y, ep.query_x, 3)
        other = ep.query_x.clone()
        other[:, 0] = torch.randn_like(other[:, 0])
        changed = m.predict(ep.support_x, ep.support_y, other, 3)
    torch.testing.assert_close(logits[:, 1:], changed[:, 1:])  # only query 0 moved
    assert not torch.allclose(logits[:, 0], changed[:, 0])
    if labels == "string":  # scores are log-probabilities of whole strings
        assert (logits <= 0).all()


def test_string_labels_are_distinct_per_task_and_score_their_characters():
    m = small(labels="string", way=5)
    codes = m.label_codes(64, 5, "cpu", torch.Generator().manual_seed(0))
    assert codes.shape == (64, 5, 5) and codes.min() >= 0 and codes.max() <= 4
    as_int = (codes * 5 ** torch.arange(4, -1, -1)).sum(-1)
    assert all(len(set(row.tolist())) == 5 for row in as_int)
    outputs = torch.randn(64, 1, 25)
    scores = m.class_scores(outputs, codes, 5)
    logp = outputs.view(64, 1, 5, 5).log_softmax(-1)
    by_hand = sum(logp[0, 0, j, codes[0, 2, j]] for j in range(5))
    torch.testing.assert_close(scores[0, 0, 2], by_hand)


def test_lstm_only_ablation_has_no_memory():
    m = small(memory=False)
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.startswith(("key", "gate")) for n in names)
    configure(m, 1e-3)
    metrics = m.meta_train_step(episodes())
    assert torch.isfinite(metrics["loss"]) and "acc_inst2" in metrics


def test_meta_train_step_reports_accuracy_by_instance():
    m = small()
    configure(m, 1e-3)
    metrics = m.meta_train_step(episodes(shot=2, query=3))
    assert {f"acc_inst{k}" for k in range(1, 6)} <= set(metrics)
    assert "acc_inst6" not in metrics  # 5 presentations of each class


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="algo.labels"):
        small(labels="words")
    with pytest.raises(ConfigError, match="read_heads"):
        small(read_heads=9)
    with pytest.raises(ConfigError, match="string"):
        MANN(pixels(1, 2), way=30, labels="string", string_length=2, string_chars=5)
    with pytest.raises(ConfigError, match="gamma"):
        small(gamma=1.5)
    with pytest.raises(ConfigError, match="5-way"):
        small().predict(
            *[torch.zeros(1, 5, 1, 2, 2), torch.arange(5)[None]], torch.zeros(1, 5, 1, 2, 2), 5
        )


def bound_sequences(batch, way, instances, side, g):
    """Tasks whose classes are random prototype vectors plus a little noise: to be right
    after the first presentation, a network must bind each prototype to its label."""
    d = side * side
    protos = torch.randn(batch, way, d, generator=g)
    y = torch.arange(way).repeat(batch, instances)
    x = protos.gather(1, y.unsqueeze(-1).expand(-1, -1, d))
    x = (x + 0.1 * torch.randn(x.shape, generator=g)).view(batch, way * instances, 1, side, side)
    return Episodes(
        x[:, :way], y[:, :way], x[:, way:], y[:, way:], torch.arange(way).repeat(batch, 1)
    )


@pytest.mark.slow
def test_mann_learns_to_bind_labels_second_instance_beats_first():
    """Before training every instance is at chance; after, the 2nd presentation of a class
    is answered far better than the 1st (which can only be guessed)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = MANN(
        pixels(1, 4),
        3,
        controller_size=32,
        memory_slots=16,
        memory_width=8,
        read_heads=1,
        key_strength=True,
    )
    configure(m, 1e-2)
    log = []
    for _ in range(700):
        log.append(m.meta_train_step(bound_sequences(16, 3, 4, 4, g)))
    last = log[-100:]
    first = sum(float(r["acc_inst1"]) for r in last) / len(last)
    second = sum(float(r["acc_inst2"]) for r in last) / len(last)
    fourth = sum(float(r["acc_inst4"]) for r in last) / len(last)
    # the 1st presentation is a guess among the labels not yet seen (at best 61% for
    # 3 classes); binding lifts the later ones above it
    assert second > first + 0.05 and fourth > 0.65, (first, second, fourth)


@pytest.mark.slow
def test_cli_trains_mann_and_reports_accuracy_by_instance(tmp_path):
    """metarun algo=mann: per-instance accuracy in metrics.jsonl, results.json and the wandb
    summary (offline), beside the standard 5-way 1-shot test accuracy."""
    from wandb_records import item_key, read_wandb_records

    run = tmp_path / "run"
    run_cli(
        "algo=mann",
        "algo.controller_size=32",
        "algo.memory_slots=16",
        "algo.memory_width=8",
        "data.images.size=12",
        "shot=2",
        "query=2",
        "trainer.steps=20",
        "trainer.meta_batch=4",
        "trainer.val_every=10",
        "trainer.val_episodes=10",
        "trainer.log_every=10",
        "eval.shot=1",
        "eval.query=5",
        "eval.episodes=20",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env={"WANDB_MODE": None, "WANDB_SILENT": "true"},
    )
    rows = read_jsonl(run / "metrics.jsonl")
    assert {"acc_inst1", "acc_inst2", "acc_inst3", "acc_inst4"} <= set(rows[0])
    assert "acc_inst5" not in rows[0]  # 2 support + 2 query images of each class
    results = json.loads((run / "results.json").read_text())
    assert results["algo"] == "mann" and results["episodes"] == 20 and results["shot"] == 1
    assert 0 <= results["test_acc"] <= 1
    # the test episodes as sequences: 1 + 5 = 6 presentations per class -> 1..5 reported
    assert set(results["instance_acc"]) == {"1", "2", "3", "4", "5"}
    assert all(0 <= v <= 1 for v in results["instance_acc"].values())
    assert set(results["instance_ci95"]) == set(results["instance_acc"])
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    summary = {
        item_key(i): i.value_json
        for r in read_wandb_records(run_file)
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    for k, acc in results["instance_acc"].items():
        assert float(summary[f"test/acc_inst{k}"]) == pytest.approx(acc)


def test_mann_takes_a_convolutional_embedding():
    from metarun.algorithms.backbones import conv4

    m = MANN(
        conv4(1, 8, "strided", image_size=8),
        3,
        controller_size=16,
        memory_slots=8,
        memory_width=4,
        read_heads=1,
    )
    configure(m, 1e-3)
    ep = episodes(side=8)
    before = [p.detach().clone() for p in m.backbone.parameters()]
    metrics = m.meta_train_step(ep)
    assert torch.isfinite(metrics["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, m.backbone.parameters()))
    with torch.no_grad():
        assert m.eval().predict(ep.support_x, ep.support_y, ep.query_x, 3).shape == (2, 6, 3)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
def test_compiled_recurrent_step_gives_the_eager_losses_gradients_and_predictions():
    """trainer.compile=true compiles MANN's recurrent step; the results stay the eager ones
    (up to float rounding), in training (sequence loss and its gradients) and in predict."""
    torch.manual_seed(0)
    eager = small(key_strength=True, read_first=True)
    compiled = copy.deepcopy(eager)
    compiled.compile_network()
    assert compiled.compile_step and not eager.compile_step
    ep = episodes()
    x = torch.cat([ep.support_x, ep.query_x], 1)
    y = torch.cat([ep.support_y, ep.query_y], 1)
    results = []
    for m in (eager, compiled):
        scores, _ = m.sequence_scores(x, y, 3)
        loss = m.sequence_loss(scores, y)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        m.eval()
        with torch.no_grad():
            logits = m.predict(ep.support_x, ep.support_y, ep.query_x, 3)
        results.append((loss, grads, logits))
    (l0, g0, p0), (l1, g1, p1) = results
    torch.testing.assert_close(l0, l1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p0, p1, rtol=1e-4, atol=1e-5)
    assert copy.deepcopy(compiled).compile_step  # a copy stays a plain module with the flag
