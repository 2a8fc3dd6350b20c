"""Meta-learners and backbones."""

from .backbones import conv4, koch_siamese, mlp, pixels, resnet12
from .base import MetaLearner
from .baseline import Baseline
from .imaml import IMAML
from .lstm_meta import LSTMMetaLearner
from .maml import MAML
from .mann import MANN
from .matching import MatchingNet
from .metanet import MetaNet
from .protonet import ProtoNet
from .relation import RelationNet
from .reptile import Reptile
from .siamese import Siamese

__all__ = [
    "Baseline",
    "IMAML",
    "LSTMMetaLearner",
    "MAML",
    "MANN",
    "MatchingNet",
    "MetaNet",
    "MetaLearner",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "Siamese",
    "conv4",
    "koch_siamese",
    "mlp",
    "pixels",
    "resnet12",
]
