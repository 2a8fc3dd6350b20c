"""Meta-learners and backbones."""

from .backbones import conv4, koch_siamese
from .base import MetaLearner
from .matching import MatchingNet
from .protonet import ProtoNet
from .relation import RelationNet
from .siamese import Siamese

__all__ = [
    "MatchingNet",
    "MetaLearner",
    "ProtoNet",
    "RelationNet",
    "Siamese",
    "conv4",
    "koch_siamese",
]
