"""The accuracy matrix of a continual run and its summaries (Lopez-Paz & Ranzato, "Gradient
Episodic Memory for Continual Learning", NeurIPS 2017, Sec. 2).

R[t, i] is the test accuracy on task i after training on tasks 0..t (T x T; the entries
above the diagonal, tasks not yet trained on, measure forward transfer). With b[i] the
accuracy on task i of the network before any training (its random initialization):

    average accuracy  ACC = 1/T       sum_{i=0}^{T-1} R[T-1, i]
    backward transfer BWT = 1/(T-1)   sum_{i=0}^{T-2} (R[T-1, i] - R[i, i])
    forward transfer  FWT = 1/(T-1)   sum_{i=1}^{T-1} (R[i-1, i] - b[i])

BWT < 0 is forgetting: how much training on later tasks lost on earlier ones. FWT > 0: what
earlier tasks taught about a task before it was trained on. Both need T >= 2.
"""

from __future__ import annotations

import math

from metarun.errors import ConfigError


class AccuracyMatrix:
    """R, filled row by row as the sequence goes on, and the untrained accuracies b."""

    def __init__(self, tasks: int):
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ConfigError(f"a continual run needs tasks >= 1, got {tasks!r}")
        self.tasks = tasks
        self.r = [[math.nan] * tasks for _ in range(tasks)]
        self.initial = [math.nan] * tasks

    def record(self, after: int, task: int, acc: float) -> None:
        """R[after, task] = acc (after=-1: the untrained network, b[task])."""
        if not (-1 <= after < self.tasks and 0 <= task < self.tasks):
            raise IndexError(f"R[{after}, {task}] is outside a {self.tasks}-task matrix")
        if after == -1:
            self.initial[task] = float(acc)
        else:
            self.r[after][task] = float(acc)

    def row_done(self, after: int) -> bool:
        return all(not math.isnan(a) for a in self.r[after])

    def average_accuracy(self, after: int | None = None) -> float:
        """Mean accuracy over the tasks trained so far, after task `after` (default: the
        last): the curve of the run as the sequence goes on."""
        after = self.tasks - 1 if after is None else after
        return sum(self.r[after][: after + 1]) / (after + 1)

    def backward_transfer(self) -> float:
        t = self.tasks
        if t < 2:
            return math.nan
        return sum(self.r[t - 1][i] - self.r[i][i] for i in range(t - 1)) / (t - 1)

    def forward_transfer(self) -> float:
        t = self.tasks
        if t < 2:
            return math.nan
        return sum(self.r[i - 1][i] - self.initial[i] for i in range(1, t)) / (t - 1)

    def summary(self) -> dict:
        return {
            "tasks": self.tasks,
            "average_accuracy": self.average_accuracy(),
            "backward_transfer": self.backward_transfer(),
            "forward_transfer": self.forward_transfer(),
            "accuracy_curve": [self.average_accuracy(t) for t in range(self.tasks)],
            "R": [list(row) for row in self.r],
            "initial": list(self.initial),
        }

    def csv(self) -> str:
        """continual.csv: one row per training stage (after_task; -1 = untrained), one
        column per task."""
        header = "after_task," + ",".join(f"task_{i}" for i in range(self.tasks))
        rows = [f"-1,{','.join(repr(a) for a in self.initial)}"]
        rows += [f"{t},{','.join(repr(a) for a in row)}" for t, row in enumerate(self.r)]
        return "\n".join([header, *rows]) + "\n"

    def state_dict(self) -> dict:
        return {"tasks": self.tasks, "r": [list(row) for row in self.r], "initial": self.initial}

    @classmethod
    def from_state(cls, state: dict) -> AccuracyMatrix:
        m = cls(state["tasks"])
        m.r = [list(map(float, row)) for row in state["r"]]
        m.initial = list(map(float, state["initial"]))
        return m
