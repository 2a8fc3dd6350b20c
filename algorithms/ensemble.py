"""An ensemble of trained learners, for evaluation: `mode=test ckpt=[RUN_A,RUN_B,...]`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metarun.errors import ConfigError

from .base import MetaLearner, mean_log_probs


class Ensemble(MetaLearner):
    """Scores each task with every member and averages their class log-probabilities.

    The members are learners trained on their own (e.g. one preset under several seeds).
    Each adapts to a task's support set in its own way and gives its scores; the ensemble's
    score of a class is the mean over members of log softmax(scores), so the ensemble
    labels each query with the class of the largest geometric mean of the members'
    probabilities. Classification only; it is not trained (meta_train_step refuses).
    """

    title = "ensemble"

    def __init__(self, members: Sequence[MetaLearner]):
        super().__init__()
        if len(members) < 1:
            raise ConfigError("an ensemble needs at least one member checkpoint")
        self.members = nn.ModuleList(members)
        ways = [m.way for m in members if m.way is not None]
        self.way = min(ways) if ways else None

    def predict(self, support_x, support_y, query_x, way=None):
        return mean_log_probs(self.scores(support_x, support_y, query_x, way))

    def scores(self, support_x, support_y, query_x, way):
        """Each member's scores of the queries, in its own precision."""
        for member in self.members:
            with member.autocast():
                logits = member.predict(support_x, support_y, query_x, way)
            yield logits

    def check_way(self, way: int) -> None:
        for member in self.members:
            member.check_way(way)

    def meta_train_step(self, episodes):
        raise ConfigError(
            "an ensemble of checkpoints is for mode=test and mode=predict; train each member "
            "on its own (e.g. metarun -m experiment=... seed=0,1,2,3)"
        )

    @property
    def device(self) -> torch.device:
        return self.members[0].device
