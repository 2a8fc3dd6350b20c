"""How runs are scored: fixed episodes (drawn by eval.protocol), optionally seen under several
test-time views (eval.tta), each query labelled on its own or the queries of an episode
assigned together (eval.assignment), mean accuracy, 95% CI."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from metarun.algorithms.base import (
    MetaLearner,
    is_regression,
    mean_ci95,
    mean_log_probs,
    metric_name,
    task_scores,
)
from metarun.data.augment import tta_views, warp
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


def check_assignment(assignment: str) -> None:
    """A known eval.assignment (ASSIGNMENTS), for the Python callers the config check misses."""
    if assignment not in ASSIGNMENTS:
        raise ConfigError(f"eval.assignment={assignment!r}; choose {' or '.join(ASSIGNMENTS)}")


def assign(logits: torch.Tensor, way: int, query: int, assignment: str) -> torch.Tensor:
    """The scores each query is labelled by (its largest one): the logits themselves
    ("independent"), or for "balanced" a one-hot of balanced_labels."""
    if assignment == "independent":
        return logits
    check_assignment(assignment)
    if logits.dim() != 3 or logits.shape[-2:] != (way * query, way):
        raise ConfigError(
            f"eval.assignment=balanced needs {query} queries of each of the {way} classes and "
            f"one score per class; the learner gave scores of shape {tuple(logits.shape)}. Use "
            "eval.assignment=independent"
        )
    return F.one_hot(balanced_labels(logits, query), way).to(logits.dtype)


def predict_views(learner: MetaLearner, batch, views: torch.Tensor | None) -> torch.Tensor:
    """The learner's scores of a batch of episodes: its predict, or with test-time views
    (eval.tta) the mean over views of log softmax(predict) on the episodes with every image
    (support and query alike) under that view's affine map."""
    if views is None:
        return learner.predict(batch.support_x, batch.support_y, batch.query_x, batch.way)
    if batch.support_x.dim() != 5:
        raise ConfigError(
            "eval.tta transforms images; this data set's examples are not images "
            f"(shape {tuple(batch.support_x.shape[2:])}): use eval.tta=1"
        )

    def scores():
        for i, theta in enumerate(views):
            support_x, query_x = batch.support_x, batch.query_x
            if i > 0:  # the first view is the identity: the images as they are
                support_x, query_x = (
                    warp(x.flatten(0, 1), theta).view_as(x) for x in (support_x, query_x)
                )
            yield learner.predict(support_x, batch.support_y, query_x, batch.way)

    return mean_log_probs(scores())


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
    tta: int = 1,
    seed: int = 0,
    confusions: bool = False,
) -> dict:
    """Score of `learner` on every fixed episode: mean and 95% CI.

    Classification: {"metric": "acc", "acc": mean accuracy in [0, 1], ...}.
    Regression: {"metric": "mse", "mse": mean squared error after adaptation, ...}.
    "scores" holds each episode's score, in the order of the fixed episodes.
    batch_size: episodes per forward pass; None picks one from the device and
    the episode size (the result does not depend on it).
    assignment: "independent" or "balanced" (eval.assignment, see ASSIGNMENTS);
    classification only.
    tta: views per image (eval.tta): 1 scores the images as they are; more adds tta - 1
    small affine maps drawn from `seed` (eval.seed) and averages the class log-probabilities
    over the views (predict_views); classification of images only.
    confusions: also count the queries' mistakes by class (confusion_counts; classification),
    as the test records them; validation has no use for them.
    """
    if tta < 1:
        raise ConfigError(f"eval.tta={tta}; it counts views per image: 1 (off) or more")
    views = tta_views(tta, seed, episodes.device) if tta > 1 else None
    batch_size = batch_size or auto_batch(episodes)
    was_training = learner.training
    learner.eval()
    scores, wrong, queried = [], [], []
    for batch in episodes.batches(batch_size):
        if views is not None and is_regression(batch.query_y):
            raise ConfigError(
                "eval.tta averages class probabilities over views; this data set is "
                "regression: use eval.tta=1"
            )
        with learner.autocast():
            logits = predict_views(learner, batch, views)
        if assignment != "independent":
            if is_regression(batch.query_y):
                raise ConfigError(
                    f"eval.assignment={assignment} assigns classes; this data set is "
                    "regression: use eval.assignment=independent"
                )
            logits = assign(logits, batch.way, episodes.query, assignment)
        scores.append(task_scores(logits, batch.query_y))  # [b]
        if confusions and not is_regression(batch.query_y):
            true, predicted = query_classes(logits, batch)
            queried.append(true.flatten())
            miss = true != predicted
            wrong.append(torch.stack([true[miss], predicted[miss]], -1))
    learner.train(was_training)
    per_episode = torch.cat(scores).cpu()
    mean, ci = mean_ci95(per_episode)
    metric = metric_name(batch.query_y)
    result = {
        "metric": metric,
        metric: mean,
        "ci95": ci,
        "episodes": len(per_episode),
        "scores": per_episode.double().tolist(),  # each episode's, in the episodes' order
    }
    if queried:
        result.update(confusion_counts(torch.cat(queried).cpu(), torch.cat(wrong).cpu()))
    return result


def query_classes(logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's true and predicted class as the data set's class ids (batch.classes maps
    an episode's labels 0..way-1 to them), [b, way * query] each."""
    predicted = logits.argmax(-1)
    return batch.classes.gather(1, batch.query_y), batch.classes.gather(1, predicted)


def confusion_counts(queried: torch.Tensor, wrong: torch.Tensor) -> dict:
    """What the queries' mistakes were, by the data set's class ids: "class_queries" and
    "class_errors" ({class: count}, each class that had queries), and "confusions", a list of
    [true class, predicted class, count] for every pair that was confused, most frequent
    first (ties by class ids)."""
    classes, queries = torch.unique(queried, return_counts=True)
    errors = torch.zeros_like(queries)
    pairs: list[list[int]] = []
    if len(wrong):
        missed, per_class = torch.unique(wrong[:, 0], return_counts=True)
        errors[torch.searchsorted(classes, missed)] = per_class
        unique_pairs, counts = torch.unique(wrong, dim=0, return_counts=True)
        pairs = [[int(t), int(p), int(c)] for (t, p), c in zip(unique_pairs, counts)]
        pairs.sort(key=lambda row: (-row[2], row[0], row[1]))
    return {
        "class_queries": dict(zip(classes.tolist(), queries.tolist())),
        "class_errors": dict(zip(classes.tolist(), errors.tolist())),
        "confusions": pairs,
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


def val_assignment(cfg: DictConfig) -> str:
    """How validation assigns queries, and so which checkpoint becomes best.pt:
    trainer.val_assignment, or eval.assignment when it is null (or unset: a config written
    before it existed)."""
    return cfg.trainer.get("val_assignment") or eval_assignment(cfg)


def eval_tta(cfg: DictConfig) -> int:
    """eval.tta, 1 (no test-time views) for a config written before it existed."""
    return int(cfg.eval.get("tta", 1))


def evaluate_as(
    cfg: DictConfig,
    learner: MetaLearner,
    episodes: FixedEpisodes,
    assignment: str | None = None,
    confusions: bool = False,
) -> dict:
    """evaluate with the run's evaluation settings (eval.batch, eval.assignment, eval.tta,
    eval.seed): how validation and test score a run. assignment: another assignment than
    eval.assignment (validation's, val_assignment); confusions: the test's mistakes by
    class."""
    return evaluate(
        learner,
        episodes,
        cfg.eval.batch,
        assignment or eval_assignment(cfg),
        eval_tta(cfg),
        cfg.eval.seed,
        confusions,
    )
