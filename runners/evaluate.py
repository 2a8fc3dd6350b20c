"""How runs are scored: fixed episodes (drawn by eval.protocol), mean accuracy, 95% CI."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from metarun.algorithms.base import MetaLearner, mean_ci95, metric_name, task_scores
from metarun.data.episodes import FixedEpisodes


def auto_batch(episodes: FixedEpisodes) -> int:
    """Episodes per pass: ~320 images on a CPU (cache-sized batches ran fastest), ~8k on a GPU."""
    images = episodes.way * (episodes.shot + episodes.query)
    budget = 8192 if episodes.device.type == "cuda" else 320
    return max(1, budget // images)


@torch.no_grad()
def evaluate(learner: MetaLearner, episodes: FixedEpisodes, batch_size: int | None = None) -> dict:
    """Score of `learner` on every fixed episode: mean and 95% CI.

    Classification: {"metric": "acc", "acc": mean accuracy in [0, 1], ...}.
    Regression: {"metric": "mse", "mse": mean squared error after adaptation, ...}.
    "scores" holds each episode's score, in the order of the fixed episodes.
    batch_size: episodes per forward pass; None picks one from the device and
    the episode size (the result does not depend on it).
    """
    batch_size = batch_size or auto_batch(episodes)
    was_training = learner.training
    learner.eval()
    scores = []
    for batch in episodes.batches(batch_size):
        with learner.autocast():
            logits = learner.predict(batch.support_x, batch.support_y, batch.query_x, batch.way)
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
