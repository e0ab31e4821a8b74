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

ALGORITHMS = {"maml": MAML, "fomaml": MAML, "anil": ANIL, "boil": BOIL, "metasgd": MetaSGD,
              "reptile": Reptile, "protonet": ProtoNet, "mamlpp": MAMLPlusPlus,
              "finetune": FineTune}

__all__ = ["ALGORITHMS", "ANIL", "BOIL", "FineTune", "GradientMetaLearner", "MAML", "MAMLPlusPlus", "MetaLearner", "MetaSGD", "ProtoNet", "Reptile"]
