"""Continual learning's groundwork: task sequences cut from class stores, and the accuracy
matrix with the Lopez-Paz & Ranzato (2017) summaries."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metarun.algorithms.continual import FineTune
from metarun.data.sequences import class_sequence, domain_sequence, split_class_images
from metarun.data.store import ClassStore
from metarun.data.synthetic import synthetic
from metarun.errors import ConfigError
from metarun.runners.continual_metrics import AccuracyMatrix


def alphabet_store(alphabets=3, chars=4, images=5, rotations=1) -> ClassStore:
    """Pixel (0, 0) of an image = its class, pixel (0, 1) = its index within the class."""
    per_class, names = [], []
    for a in range(alphabets):
        for c in range(chars):
            x = torch.zeros(images, 1, 4, 4, dtype=torch.uint8)
            x[:, 0, 0, 0] = a * chars + c
            x[:, 0, 0, 1] = torch.arange(images, dtype=torch.uint8)
            per_class.append(x)
            names.append(f"Alpha{a}/char{c}")
    return ClassStore.from_classes(per_class, names, rotations)


def test_class_tasks_are_disjoint_cover_their_classes_and_label_globally():
    store = alphabet_store()
    seq = class_sequence(store, tasks=3, seed=1, classes_per_task=4)
    seen = [c for t in seq.tasks for c in t.classes]
    assert len(seen) == len(set(seen)) == 12 and seq.scenario == "class"
    offset = 0
    for task in seq.tasks:
        assert task.offset == offset and task.way == 4
        for x, y in ((task.train_x, task.train_y), (task.test_x, task.test_y)):
            assert set(y.tolist()) == set(range(offset, offset + 4))
            # each image's label is its class's position in the task, after the offset
            for label, cls in enumerate(task.classes):
                assert (x[y == offset + label, 0, 0, 0] == cls).all()
        offset += 4
    assert seq.num_labels == 12


def test_train_and_test_images_of_a_class_never_overlap_and_follow_the_fraction():
    store = alphabet_store(images=8)
    parts = split_class_images(store, range(store.num_classes), 0.25, seed=0)
    for train, test in parts:
        assert len(test) == 2 and len(train) == 6
        assert not set(train[:, 0, 0, 1].tolist()) & set(test[:, 0, 0, 1].tolist())


def test_sequences_are_deterministic_from_the_seed():
    store = alphabet_store()
    a = class_sequence(store, 3, seed=5, classes_per_task=3)
    b = class_sequence(store, 3, seed=5, classes_per_task=3)
    c = class_sequence(store, 3, seed=6, classes_per_task=3)
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks]
    assert all(torch.equal(x.train_x, y.train_x) for x, y in zip(a.tasks, b.tasks))
    assert [t.classes for t in a.tasks] != [t.classes for t in c.tasks]


def test_prefix_grouping_makes_one_task_per_alphabet_with_its_rotated_copies():
    store = alphabet_store(rotations=4)
    seq = class_sequence(store, tasks=3, seed=0, grouping="prefix")
    for task in seq.tasks:
        alphabets = {store.names[c % store.n_base].split("/")[0] for c in task.classes}
        assert len(alphabets) == 1 and task.way == 16  # 4 characters x 4 rotations


def test_domain_tasks_share_classes_and_labels_and_differ_by_their_transform():
    store = synthetic("test", samples=8)
    seq = domain_sequence(store, tasks=3, seed=0, transform="permutation", classes=5)
    first = seq.tasks[0]
    assert seq.scenario == "domain" and seq.num_labels == 5
    for task in seq.tasks:
        assert task.classes == first.classes and torch.equal(task.train_y, first.train_y)
    # a permutation moves pixels, keeping each image's multiset of values
    moved = seq.tasks[1].train_x
    assert not torch.equal(moved, first.train_x)
    assert torch.equal(moved.flatten(1).sort(1).values, first.train_x.flatten(1).sort(1).values)
    rotated = domain_sequence(store, tasks=4, seed=0, transform="rotation", classes=5)
    half_turn = rotated.tasks[2].train_x.float()  # 180 degrees: flips both axes exactly
    torch.testing.assert_close(
        half_turn, rotated.tasks[0].train_x.float().flip(-1, -2), atol=1, rtol=0
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: class_sequence(s, tasks=7, classes_per_task=2), "7 tasks of 2 classes need 14"),
        (lambda s: class_sequence(s, tasks=4, grouping="prefix"), "this split has 3"),
        (lambda s: class_sequence(s, tasks=0), "tasks must be a positive integer"),
        (lambda s: class_sequence(s, tasks=2, grouping="alphabet"), "grouping='alphabet'"),
        (lambda s: class_sequence(s, tasks=2, test_fraction=1.0), "test_fraction"),
        (lambda s: domain_sequence(s, tasks=2, classes=13), "2 to 12 classes"),
        (lambda s: domain_sequence(s, tasks=2, transform="blur"), "transform='blur'"),
    ],
)
def test_impossible_sequences_are_refused_with_the_fix(call, message):
    with pytest.raises(ConfigError, match=message):
        call(alphabet_store())


def test_a_stream_of_single_classes_is_class_incremental_only():
    stream = class_sequence(alphabet_store(), tasks=12, seed=3, classes_per_task=1)
    assert [t.way for t in stream.tasks] == [1] * 12
    assert sorted(c for t in stream.tasks for c in t.classes) == list(range(12))
    assert [t.offset for t in stream.tasks] == list(range(12))  # one head, labels in order
    learner = FineTune(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    learner.backbone.feature_shape = (3,)
    learner.setup("class", [1] * 12)
    assert learner.heads[0].out_features == 12
    with pytest.raises(ConfigError, match="continual.scenario=class for a stream"):
        learner.setup("task", [1] * 12)


def test_accuracy_matrix_summaries_follow_the_gem_definitions():
    m = AccuracyMatrix(3)
    initial = [0.2, 0.25, 0.3]
    r = [[0.9, 0.3, 0.4], [0.6, 0.8, 0.5], [0.5, 0.7, 0.95]]
    for i, b in enumerate(initial):
        m.record(-1, i, b)
    for t, row in enumerate(r):
        for i, a in enumerate(row):
            m.record(t, i, a)
    s = m.summary()
    assert s["average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert s["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert s["forward_transfer"] == pytest.approx(((0.3 - 0.25) + (0.5 - 0.3)) / 2)
    assert s["accuracy_curve"] == pytest.approx([0.9, 0.7, (0.5 + 0.7 + 0.95) / 3])
    lines = m.csv().splitlines()
    assert lines[0] == "after_task,task_0,task_1,task_2" and lines[1].startswith("-1,0.2,")
    assert AccuracyMatrix.from_state(m.state_dict()).summary() == s
    assert math.isnan(AccuracyMatrix(1).backward_transfer())
    with pytest.raises(IndexError):
        m.record(3, 0, 1.0)
