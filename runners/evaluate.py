"""How runs are scored: fixed episodes (drawn by eval.protocol), each query labelled on its
own or the queries of an episode assigned together (eval.assignment), mean accuracy, 95% CI."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from metarun.algorithms.base import MetaLearner, is_regression, mean_ci95, metric_name, task_scores
from metarun.data.episodes import FixedEpisodes
from metarun.errors import ConfigError

# eval.assignment:
# - "independent": each query gets the class of its largest score, whatever the other
#   queries of its episode look like (inductive; how every published figure metarun quotes
#   was scored)
# - "balanced": transductive; uses that every class of an episode has the same number of
#   queries (eval.query each, as every metarun episode has) and labels an episode's queries
#   together: the most probable labelling, under the learner's class probabilities (the
#   softmax of its scores), among those that give every class exactly eval.query queries
#   (an assignment problem, solved exactly by scipy's linear_sum_assignment). It never
#   looks at the queries' labels.
ASSIGNMENTS = ("independent", "balanced")


def balanced_labels(logits: torch.Tensor, query: int) -> torch.Tensor:
    """[B, n, way] scores of n = way * query queries -> [B, n] labels: for each episode the
    labelling that maximises the sum of the queries' log-probabilities with each class
    given to exactly `query` queries. Non-finite scores count as the least likely."""
    from scipy.optimize import linear_sum_assignment

    logp = torch.log_softmax(logits.detach().double(), -1).cpu().numpy()
    cost = -np.nan_to_num(logp, nan=-1e12, neginf=-1e12, posinf=0.0)
    labels = np.empty(cost.shape[:2], dtype=np.int64)
    for i, episode in enumerate(cost):
        # column j is the j // query-th class's (j % query)-th place
        rows, places = linear_sum_assignment(np.repeat(episode, query, axis=1))
        labels[i, rows] = places // query
    return torch.from_numpy(labels).to(logits.device)


def assign(logits: torch.Tensor, way: int, query: int, assignment: str) -> torch.Tensor:
    """The scores each query is labelled by (its largest one): the logits themselves
    ("independent"), or for "balanced" a one-hot of balanced_labels."""
    if assignment == "independent":
        return logits
    if assignment not in ASSIGNMENTS:
        raise ConfigError(f"eval.assignment={assignment!r}; choose {' or '.join(ASSIGNMENTS)}")
    if logits.dim() != 3 or logits.shape[-2:] != (way * query, way):
        raise ConfigError(
            f"eval.assignment=balanced needs {query} queries of each of the {way} classes and "
            f"one score per class; the learner gave scores of shape {tuple(logits.shape)}. Use "
            "eval.assignment=independent"
        )
    return F.one_hot(balanced_labels(logits, query), way).to(logits.dtype)


def auto_batch(episodes: FixedEpisodes) -> int:
    """Episodes per pass: ~320 images on a CPU (cache-sized batches ran fastest), ~8k on a GPU."""
    images = episodes.way * (episodes.shot + episodes.query)
    budget = 8192 if episodes.device.type == "cuda" else 320
    return max(1, budget // images)


@torch.no_grad()
def evaluate(
    learner: MetaLearner,
    episodes: FixedEpisodes,
    batch_size: int | None = None,
    assignment: str = "independent",
) -> dict:
    """Score of `learner` on every fixed episode: mean and 95% CI.

    Classification: {"metric": "acc", "acc": mean accuracy in [0, 1], ...}.
    Regression: {"metric": "mse", "mse": mean squared error after adaptation, ...}.
    "scores" holds each episode's score, in the order of the fixed episodes.
    batch_size: episodes per forward pass; None picks one from the device and
    the episode size (the result does not depend on it).
    assignment: "independent" or "balanced" (eval.assignment, see ASSIGNMENTS);
    classification only.
    """
    batch_size = batch_size or auto_batch(episodes)
    was_training = learner.training
    learner.eval()
    scores = []
    for batch in episodes.batches(batch_size):
        with learner.autocast():
            logits = learner.predict(batch.support_x, batch.support_y, batch.query_x, batch.way)
        if assignment != "independent":
            if is_regression(batch.query_y):
                raise ConfigError(
                    f"eval.assignment={assignment} assigns classes; this data set is "
                    "regression: use eval.assignment=independent"
                )
            logits = assign(logits, batch.way, episodes.query, assignment)
        scores.append(task_scores(logits, batch.query_y))  # [b]
    learner.train(was_training)
    per_episode = torch.cat(scores).cpu()
    mean, ci = mean_ci95(per_episode)
    metric = metric_name(batch.query_y)
    return {
        "metric": metric,
        metric: mean,
        "ci95": ci,
        "episodes": len(per_episode),
        "scores": per_episode.double().tolist(),  # each episode's, in the episodes' order
    }


def higher_is_better(result: dict) -> float:
    """A score to maximise from evaluate's result: accuracy, or minus the MSE."""
    return result["acc"] if result["metric"] == "acc" else -result["mse"]


def eval_protocol(cfg: DictConfig) -> tuple[str, list[str] | None]:
    """(eval.protocol, eval.alphabets), as "random" and None for a config written before
    they existed (a checkpoint's)."""
    alphabets = cfg.eval.get("alphabets")
    if alphabets is not None and not isinstance(alphabets, str):
        alphabets = list(alphabets)
    return cfg.eval.get("protocol", "random"), alphabets


def eval_assignment(cfg: DictConfig) -> str:
    """eval.assignment, "independent" for a config written before it existed."""
    return cfg.eval.get("assignment", "independent")
