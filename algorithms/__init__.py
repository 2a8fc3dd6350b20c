"""Meta-learners and backbones."""

from .backbones import conv4
from .base import MetaLearner
from .protonet import ProtoNet

__all__ = ["MetaLearner", "ProtoNet", "conv4"]
