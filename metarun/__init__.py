"""metarun: a command-line experiment runner for few-shot meta-learning.

Public API: `metarun.load(ckpt)` returns a trained learner ready for
`learner.predict(support_x, support_y, query_x)`, with its preprocessing in
`learner.preprocess`.
"""

__version__ = "0.1.0"


def load(ckpt, device: str = "cpu"):
    """Load a learner from a checkpoint written by `metarun` (see runners/checkpoint.py)."""
    from metarun.runners.checkpoint import load_learner

    return load_learner(ckpt, device=device)


__all__ = ["__version__", "load"]
