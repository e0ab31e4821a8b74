"""Meta-learning algorithms. Each returns metric dicts and never imports tracking."""
from .anil import ANIL
from .base import GradientMetaLearner, MetaLearner
from .boil import BOIL
from .cavia import CAVIA
from .finetune import FineTune
from .imaml import IMAML
from .maml import MAML
from .mamlpp import MAMLPlusPlus
from .metasgd import MetaSGD
from .protonet import ProtoNet
from .r2d2 import R2D2
from .reptile import Reptile

from .maml import FOMAML
from .registry import ALGORITHMS, Capabilities, capabilities, register

__all__ = ["ALGORITHMS", "ANIL", "BOIL", "CAVIA", "Capabilities", "FOMAML", "FineTune", "GradientMetaLearner", "IMAML",
           "MAML", "MAMLPlusPlus", "MetaLearner", "MetaSGD", "ProtoNet", "R2D2", "Reptile", "capabilities", "register"]
