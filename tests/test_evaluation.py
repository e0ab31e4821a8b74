"""evaluate(): what the result records, and that it depends only on the fixed episodes."""
import torch

from metalearn.algorithms import MAML, MetaSGD
from metalearn.engine import Engine
from metalearn.evaluation import evaluate
from metalearn.models import Conv4


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (12, 20, 1, 28, 28), generator=g, dtype=torch.uint8)


def _run(algo, batch_size=4):
    return evaluate(algo, _images(), ways=5, shots=1, query_shots=3, episodes=8, seed=3, inner_steps=2,
                    inner_lr=0.3, batch_size=batch_size)


def test_result_records_protocol_and_learned_lrs_are_marked():
    torch.manual_seed(0)
    maml = _run(Engine(MAML(Conv4(hidden=4), inner_lr=0.4, inner_steps=1)))
    assert (maml.inner_steps, maml.inner_lr, maml.episodes, maml.seed) == (2, 0.3, 8, 3)
    assert len(maml.accuracies) == 8 and abs(maml.mean - sum(maml.accuracies) / 8) < 1e-12
    torch.manual_seed(0)
    metasgd = _run(Engine(MetaSGD(Conv4(hidden=4), inner_lr=0.4, inner_steps=1)))
    assert metasgd.inner_lr is None  # adapted with its learned per-element lrs, not 0.3


def test_result_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    algo = Engine(MAML(Conv4(hidden=4), inner_lr=0.4, inner_steps=1))
    assert _run(algo, batch_size=3).accuracies == _run(algo, batch_size=8).accuracies
