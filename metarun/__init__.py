"""metarun: a command-line experiment runner for few-shot meta-learning.

Public API: `metarun.load(ckpt)` returns a trained learner ready for
`learner.predict(support_x, support_y, query_x)`, with its preprocessing in
`learner.preprocess`.
"""

__version__ = "0.1.0"


def load(ckpt, device: str = "cpu", trust: bool = False):
    """Load a learner from a checkpoint written by `metarun` (see runners/checkpoint.py).
    trust=True also loads checkpoints that need more than tensors and metarun's own
    targets, which can run code: only for files you trust."""
    from metarun.runners.checkpoint import load_learner

    return load_learner(ckpt, device=device, trust=trust)


__all__ = ["__version__", "load"]
