"""Meta-learning algorithms. Each returns metric dicts and never imports tracking."""
from .anil import ANIL
from .base import GradientMetaLearner, MetaLearner
from .boil import BOIL
from .finetune import FineTune
from .maml import MAML
from .mamlpp import MAMLPlusPlus
from .metasgd import MetaSGD
from .protonet import ProtoNet
from .reptile import Reptile

from .maml import FOMAML
from .registry import ALGORITHMS, Capabilities, capabilities, register

__all__ = ["ALGORITHMS", "ANIL", "BOIL", "Capabilities", "FOMAML", "FineTune", "capabilities", "register", "GradientMetaLearner", "MAML", "MAMLPlusPlus", "MetaLearner", "MetaSGD", "ProtoNet", "Reptile"]
