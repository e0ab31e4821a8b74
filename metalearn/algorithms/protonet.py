"""Prototypical Networks, the metric-learning baseline (no inner gradients).

Snell, Swersky, Zemel. "Prototypical Networks for Few-shot Learning." NeurIPS 2017.
https://arxiv.org/abs/1703.05175

With the body f_phi (conv4's `features`, flattened; the model's head is unused), for each
task (Eq. 1-2):

    c_k = (1/|S_k|) sum_{(x, y) in S, y = k} f_phi(x)                (prototype of class k)
    p(y = k | x) = softmax_k( -|| f_phi(x) - c_k ||^2 )               (squared Euclidean distance)
    phi <- outer step on (1/T) sum_i CE over the query set Q_i        (Adam)

Because no parameter is tied to the number of classes, training ways may differ from test
ways (the paper trains 60-way and tests 5-way on Omniglot); `batch.ways` is read per batch.

BatchNorm (transductive): the support set and the query set are each normalised with their
own batch statistics (as MAML's conv4 is); non-transductive scoring embeds each query
example together with the support set. Deviation: none in the objective; training ways is
data.ways (set it larger than eval.ways to follow the paper's higher-way training).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import MetalearnError
from ..inner.layout import channels_last
from ..types import Params, TaskBatch
from .base import LossSpec, MetaLearner, MetricSpec, scored
from .registry import Capabilities, register


def prototype_logits(z_support: Tensor, y_support: Tensor, z_query: Tensor, ways: int) -> Tensor:
    """-squared distances (Q, N) of query embeddings (Q, D) to the class means of (S, D)."""
    protos = torch.zeros(ways, z_support.shape[1], dtype=z_support.dtype, device=z_support.device)
    protos = protos.index_add(0, y_support, z_support)
    counts = torch.bincount(y_support, minlength=ways).to(z_support.dtype)
    protos = protos / counts[:, None]
    return -((z_query[:, None, :] - protos[None, :, :]) ** 2).sum(-1)


@register("protonet")
class ProtoNet(MetaLearner):
    capabilities = Capabilities(inner_loop=False, test_ways_may_differ=True, regression=False)

    label = "protonet"  # in error messages

    def __init__(self, model: nn.Module, *, loss: LossSpec = "cross_entropy", metric: MetricSpec = None, **_ignored):
        if loss != "cross_entropy":
            raise MetalearnError(f"{self.label} classifies: it needs a classification data set (loss cross_entropy)")
        super().__init__(model, loss=loss, metric=metric)
        if not hasattr(model, "features"):
            raise MetalearnError(f"{self.label} needs a model with a `features` submodule (conv4)")

    def logits(self, z_support: Tensor, y_support: Tensor, z_query: Tensor, ways: int) -> Tensor:
        """Query logits (Q, N) from support and query embeddings: here -squared distances to the prototypes
        (subclasses put another head on the same embedding: R2-D2's ridge regression)."""
        return prototype_logits(z_support, y_support, z_query, ways)

    def embed(self, params: Params, x: Tensor) -> Tensor:
        """(B, ...) -> (B, D) body features. On a CPU, images go in channels-last (as the hybrid path's
        query images: max-pooling runs several times faster; conv4 normalises on NCHW memory, so the
        float32 accuracy is the NCHW path's, see metalearn/models/conv4.py)."""
        body = {n[len("features."):]: p for n, p in params.items() if n.startswith("features.")}
        if x.device.type == "cpu" and x.dim() == 4:
            x = channels_last(x)
        return functional_call(self.model.features, body, (x,), strict=False).flatten(1)

    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        params = self.params()
        total_loss, total_metric, T = 0.0, 0.0, batch.num_tasks
        for i in range(T):
            logits = self.logits(self.embed(params, batch.support.x[i]), batch.support.y[i],
                                 self.embed(params, batch.query.x[i]), batch.ways)
            loss = F.cross_entropy(logits, batch.query.y[i])
            (loss / T).backward()
            total_loss += loss.item()
            total_metric += self.score(logits.detach(), batch.query.y[i]).item()
        return {"loss": total_loss / T, "accuracy": total_metric / T}

    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        """Query accuracy per task, (T,) float64; `steps` and `lr` do not apply (no inner loop)."""
        params = {n: p.detach() for n, p in self.params().items()}
        out = []
        for i in range(batch.num_tasks):
            z_s = self.embed(params, batch.support.x[i])
            z_q = scored(lambda x: self.embed(params, x), batch.support.x[i], batch.query.x[i], transductive)
            logits = self.logits(z_s, batch.support.y[i], z_q, batch.ways)
            out.append(self.score(logits, batch.query.y[i]))
            self.episode_done()
        return torch.stack(out).cpu()
