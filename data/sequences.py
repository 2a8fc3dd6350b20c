"""Task sequences for continual learning, cut from any class-based data set.

A continual run trains on tasks 0, 1, ..., T-1 in order and is scored on every task after
each one. Every class's images are split once into training and test images (a seeded
shuffle per class), so a task's test images were never trained on, whichever scenario:

- class-incremental (`class_sequence`): the classes are cut into T disjoint groups, either
  seeded groups of (nearly) equal size or whole groups of a naming prefix (Omniglot's
  alphabets: the part of a class name before '/'). Labels are global: task t's classes are
  numbered after those of tasks 0..t-1, so a single head can score every class seen so far;
  a task-incremental learner uses `label - task.offset` with a head per task.
- domain-incremental (`domain_sequence`): the same classes in every task, seen through a fixed
  per-task transformation (task 0: none; then rotations by multiples of 360/T degrees, or a
  seeded pixel permutation per task, as in permuted MNIST).

Everything is deterministic from `seed`; nothing here draws from the global random state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarun.errors import ConfigError

from .store import ClassStore

GROUPINGS = ("classes", "prefix")
TRANSFORMS = ("rotation", "permutation")


@dataclass
class ContinualTask:
    """One task of a sequence: uint8 images [n, C, H, W] and int64 labels [n]."""

    index: int
    classes: list[int]  # class ids of the store (rotated copies count as their own classes)
    offset: int  # the first label of this task (class-incremental); 0 for domain tasks
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def way(self) -> int:
        return len(self.classes)


@dataclass
class TaskSequence:
    tasks: list[ContinualTask]
    scenario: str  # "class" (labels accumulate) or "domain" (the same labels every task)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def num_labels(self) -> int:
        """Outputs a single head needs for every task of the sequence."""
        return max(t.offset + t.way for t in self.tasks)


def split_class_images(
    store: ClassStore, class_ids: Sequence[int], test_fraction: float, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each class: (train images, test images), a seeded shuffle of its images cut at
    `test_fraction` (at least one image on each side). The split of a class depends only on
    the class and the seed, not on which task or sequence it lands in."""
    check_fraction(test_fraction)
    out = []
    for c in class_ids:
        images = store.class_images(int(c))
        n = len(images)
        if n < 2:
            raise ConfigError(
                f"class {store.names[int(c) % store.n_base]!r} has {n} image(s); a continual "
                "task needs at least 2 per class (one to train on, one to test)"
            )
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(c))
        order = torch.randperm(n, generator=g)
        n_test = min(n - 1, max(1, round(n * test_fraction)))
        out.append((images[order[n_test:]], images[order[:n_test]]))
    return out


def class_sequence(
    store: ClassStore,
    tasks: int,
    seed: int = 0,
    grouping: str = "classes",
    classes_per_task: int | None = None,
    test_fraction: float = 0.25,
) -> TaskSequence:
    """T class-incremental tasks (see the module docstring). grouping="classes": the store's
    classes shuffled by `seed` and cut into `tasks` groups of `classes_per_task` (default:
    all classes, as evenly as possible); grouping="prefix": one task per name prefix
    (Omniglot: per alphabet, rotated copies with their alphabet), `tasks` of them chosen
    in a seeded order."""
    check_count("tasks", tasks)
    if grouping not in GROUPINGS:
        raise ConfigError(f"grouping={grouping!r}; choose one of {', '.join(GROUPINGS)}")
    n = store.num_classes
    g = torch.Generator().manual_seed(seed)
    if grouping == "classes":
        per = classes_per_task if classes_per_task is not None else n // tasks
        check_count("classes_per_task", per)
        if tasks * per > n:
            raise ConfigError(
                f"{tasks} tasks of {per} classes need {tasks * per} classes; this split has "
                f"{n}: use fewer tasks or classes per task"
            )
        order = torch.randperm(n, generator=g).tolist()
        groups = [sorted(order[i * per : (i + 1) * per]) for i in range(tasks)]
    else:
        prefixes: dict[str, list[int]] = {}
        for c in range(n):
            prefixes.setdefault(store.names[c % store.n_base].split("/", 1)[0], []).append(c)
        if tasks > len(prefixes):
            raise ConfigError(
                f"{tasks} tasks by name prefix, but this split has {len(prefixes)} "
                f"({', '.join(sorted(prefixes))}); use tasks <= {len(prefixes)} or "
                "grouping=classes"
            )
        names = sorted(prefixes)
        chosen = [names[i] for i in torch.randperm(len(names), generator=g)[:tasks].tolist()]
        groups = [prefixes[p] for p in chosen]
        if classes_per_task is not None:
            check_count("classes_per_task", classes_per_task)
            groups = [grp[:classes_per_task] for grp in groups]
    out, offset = [], 0
    for t, classes in enumerate(groups):
        parts = split_class_images(store, classes, test_fraction, seed)
        out.append(labelled(t, classes, offset, parts))
        offset += len(classes)
    return TaskSequence(out, "class")


def domain_sequence(
    store: ClassStore,
    tasks: int,
    seed: int = 0,
    transform: str = "permutation",
    classes: int = 10,
    test_fraction: float = 0.25,
) -> TaskSequence:
    """T domain-incremental tasks: `classes` seeded classes of the store, the same in every
    task, labelled 0..classes-1; task t's images go through transformation t (task 0: the
    identity; "rotation": t * 360 / T degrees; "permutation": a seeded pixel shuffle)."""
    check_count("tasks", tasks)
    check_count("classes", classes)
    if transform not in TRANSFORMS:
        raise ConfigError(f"transform={transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if classes < 2 or classes > store.num_classes:
        raise ConfigError(
            f"classes={classes}: a domain sequence needs 2 to {store.num_classes} classes "
            "(the classes of this split)"
        )
    g = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(store.num_classes, generator=g)[:classes].tolist())
    parts = split_class_images(store, chosen, test_fraction, seed)
    base = labelled(0, chosen, 0, parts)
    out = []
    for t in range(tasks):
        change = domain_transform(transform, t, tasks, base.train_x.shape[-1], seed)
        out.append(
            ContinualTask(
                t,
                chosen,
                0,
                change(base.train_x),
                base.train_y.clone(),
                change(base.test_x),
                base.test_y.clone(),
            )
        )
    return TaskSequence(out, "domain")


def domain_transform(kind: str, t: int, tasks: int, side: int, seed: int):
    """Task t's fixed transformation of uint8 images [n, C, side, side]."""
    if t == 0:
        return lambda x: x.clone()
    if kind == "rotation":
        angle = 2 * math.pi * t / tasks
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]])

        def rotate(x: torch.Tensor) -> torch.Tensor:
            grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
            out = F.grid_sample(x.float(), grid, mode="bilinear", align_corners=False)
            return out.round().clamp(0, 255).to(torch.uint8)

        return rotate
    g = torch.Generator().manual_seed(seed * 7919 + t)
    perm = torch.randperm(side * side, generator=g)
    return lambda x: x.flatten(-2)[..., perm].view(x.shape).contiguous()


def labelled(t: int, classes, offset: int, parts) -> ContinualTask:
    def stack(which: int):
        xs = [p[which] for p in parts]
        ys = [torch.full((len(x),), offset + i, dtype=torch.int64) for i, x in enumerate(xs)]
        return torch.cat(xs), torch.cat(ys)

    (train_x, train_y), (test_x, test_y) = stack(0), stack(1)
    return ContinualTask(t, list(classes), offset, train_x, train_y, test_x, test_y)


def check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_fraction(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1 (exclusive), got {value!r}")
