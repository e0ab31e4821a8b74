"""Fine-tuning baseline: a pre-trained body, a fresh head per episode, selected layers fine-tuned.

Chen, Liu, Kira, Wang, Huang. "A Closer Look at Few-shot Classification." ICLR 2019.
https://arxiv.org/abs/1904.04232  (Baseline and Baseline++, Sec. 3.1 / 3.2)

Per test episode (support S, query Q, N ways), starting every episode from the same
pre-trained weights theta (nothing carries over between episodes):

    head_0   a fresh N-way head: linear  W z + b           (Baseline)
                                 cosine  s * cos(z, W_c)    (Baseline++, s = cosine_scale)
             initialised `random` (nn.Linear's U(-1/sqrt(D), 1/sqrt(D)), from a generator seeded by
             a hash of the episode's support set and head_seed, so an episode's head depends on
             nothing else: not on the batch it is in, nor on its position), `zero` or `prototype`
             (class means of the support features; linear W = 2 mu, b = -|mu|^2, Snell et al. 2017)
    phi_0    = (head_0, the last `blocks` body blocks of theta)   [the rest of theta stays frozen]
    phi_s+1  = rule(phi_s, grad L_S(phi_s) + wd * phi_s)          s = 0..steps-1, rule SGD or Adam
    score    accuracy of phi_steps on Q (and on S: support accuracy shows overfitting)

This is the project's inner loop (`run_inner_loop` with rules.SGD / rules.Adam), first order,
no outer gradient. With inner.lora_rank = r > 0 the unfrozen body weights (conv / linear, >= 2
dims) adapt through rank-r LoRA deltas (metalearn/inner/lora.py) instead of in full; their
biases and BatchNorm parameters adapt in full; the fresh head always adapts in full.

Two execution paths (`execution`):
  loop     the reference: one episode after another, the whole model run at every step.
  batched  conv4 only, transductive scoring: all episodes of a batch at once, episodes as a batch
           dimension (grouped convolutions per episode, BatchNorm statistics per episode and
           channel, batched matmuls for the head); the frozen blocks below the first unfrozen one
           run once per batch, not once per step. Equal to the loop to float rounding
           (tests/test_transfer.py, float64).
  auto     batched where available, else loop.

Not meta-trained: an evaluation-time adapter (capabilities.meta_trained is False; it has no
`meta_step`); weights come from `metalearn pretrain` (metalearn/transfer/pretrain.py, the same
training loop with a supervised step), a MAML run, or any checkpoint.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import MetalearnError
from ..inner import run_inner_loop
from ..inner.lora import LoRA, adapted_size, lora_targets
from ..inner.rules import SGD, Adam
from ..types import Examples, Params, TaskBatch
from .base import LossSpec, MetaLearner, MetricSpec, scored
from .registry import Capabilities, register


def _sub(params: Params, prefix: str) -> Params:
    return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}


def episode_generator(support_x: Tensor, support_y: Tensor, seed: int) -> torch.Generator:
    """A CPU generator seeded by a hash of one episode's support set (x, y) and `seed`."""
    h = hashlib.sha256()
    h.update(support_x.detach().cpu().contiguous().numpy().tobytes())
    h.update(support_y.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(seed).encode())
    return torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") & (2**63 - 1))


class WeightDecay:
    """Wraps an inner-loop rule: grad + wd * theta (coupled L2, as torch.optim's weight_decay)."""

    def __init__(self, rule, wd: float):
        self.rule, self.wd = rule, wd

    def init(self, params: Params, names):
        return self.rule.init(params, names)

    def step(self, fast: Params, grads: Dict[str, Tensor], state, step: int):
        return self.rule.step(fast, {n: g + self.wd * fast[n] for n, g in grads.items()}, state, step)


@register("finetune")
class FineTune(MetaLearner):
    capabilities = Capabilities(meta_trained=False, shardable=False, test_ways_may_differ=True, lora=True,
                                regression=False, own_lr_schedule=True)
    """Transfer-learning baseline evaluated like a meta-learner (`evaluate_batch`)."""


    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, blocks: int = 0,
                 head: str = "linear", cosine_scale: float = 10.0, head_init: str = "random", head_seed: int = 0,
                 optimizer: str = "sgd", weight_decay: float = 0.0, lora_rank: int = 0, lora_alpha: float = 0.0,
                 execution: str = "auto", loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, loss=loss, metric=metric)
        if loss != "cross_entropy":
            raise MetalearnError("finetune is a classification baseline (a fresh N-way head per episode)")
        if not (hasattr(model, "features") and hasattr(model, "head")):
            raise MetalearnError("finetune needs a model with `features` and `head` submodules (conv4, mlp)")
        if head not in ("linear", "cosine") or head_init not in ("random", "zero", "prototype"):
            raise MetalearnError(f"finetune: unknown head {head!r} or head_init {head_init!r}")
        if head == "cosine" and head_init == "zero":
            raise MetalearnError("finetune: a cosine head cannot start at zero")
        if optimizer not in ("sgd", "adam"):
            raise MetalearnError(f"finetune: optimizer must be sgd or adam, got {optimizer!r}")
        if execution not in ("auto", "loop", "batched"):
            raise MetalearnError(f"finetune: execution must be auto, loop or batched, got {execution!r}")
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.head, self.cosine_scale, self.head_init, self.head_seed = head, cosine_scale, head_init, head_seed
        self.optimizer, self.weight_decay = optimizer, weight_decay
        # blocks: the children of model.features that hold parameters, bottom to top
        carrying = [i for i, m in enumerate(model.features) if any(True for _ in m.parameters())]
        if blocks > len(carrying):
            raise MetalearnError(f"transfer.blocks={blocks}, but the model's body has {len(carrying)} blocks")
        self.blocks = blocks
        unfrozen = carrying[len(carrying) - blocks:] if blocks else []
        self.first_unfrozen = unfrozen[0] if unfrozen else len(model.features)
        params = dict(model.named_parameters())
        body = [n for n in params if not n.startswith("head.")]
        self.body_adapt = [n for n in body if any(n.startswith(f"features.{i}.") for i in unfrozen)]
        self.lora: Optional[LoRA] = None
        self.full = list(self.body_adapt)
        if lora_rank and self.body_adapt:
            low, self.full = lora_targets(params, self.body_adapt)
            self.lora = LoRA(params, low, lora_rank, lora_alpha) if low else None
        self.head_names = ["head.weight"] + (["head.bias"] if head == "linear" else [])
        self.execution = execution
        if execution == "batched" and not self._batched_ok():
            raise MetalearnError("finetune: execution=batched needs conv4 (BatchNorm transductive or none)")
        self.support_accuracies: List[Tensor] = []
        """(T,) support-set accuracy after fine-tuning, one tensor per evaluate_batch call (see take_support)."""

    # --- what is adapted, and how much ------------------------------------------------------
    def adapted_names(self) -> List[str]:
        return self.full + self.head_names + (self.lora.delta_names if self.lora else [])

    def adapted_size(self, ways: int) -> Dict[str, int]:
        """Entries adapted per episode (fresh head + unfrozen body, or its LoRA deltas) and their bytes."""
        params = dict(self.model.named_parameters())
        D = params["head.weight"].shape[1]
        size = adapted_size(params, self.full, self.lora)
        head = ways * D + (ways if self.head == "linear" else 0)
        item = params["head.weight"].element_size()
        return {"parameters": size["parameters"] + head, "bytes": size["bytes"] + head * item,
                "body_full": sum(params[n].numel() for n in self.body_adapt)}

    def take_support(self) -> Tensor:
        """Support accuracies recorded since the last call, (episodes,) float64; clears the record."""
        out = torch.cat(self.support_accuracies) if self.support_accuracies else torch.zeros(0, dtype=torch.float64)
        self.support_accuracies = []
        return out

    def rule(self, lr: float):
        rule = SGD(lr) if self.optimizer == "sgd" else Adam(lr, betas=(0.9, 0.999))
        return WeightDecay(rule, self.weight_decay) if self.weight_decay else rule

    # --- model pieces -------------------------------------------------------------------------
    def embed(self, params: Params, x: Tensor) -> Tensor:
        """Body features (B, D) of x (B, ...) at params."""
        return functional_call(self.model.features, _sub(params, "features."), (x,), strict=False).flatten(1)

    def head_fn(self, params: Params, z: Tensor) -> Tensor:
        """Logits of features z (B, D) with a head W (N, D) [b (N,)], or z (T, B, D) with W (T, N, D) [b (T, N)]."""
        w = params["head.weight"]
        if self.head == "cosine":
            return self.cosine_scale * F.normalize(z, dim=-1) @ F.normalize(w, dim=-1).transpose(-1, -2)
        return z @ w.transpose(-1, -2) + params["head.bias"].unsqueeze(-2)

    def predict(self, params: Params, x: Tensor) -> Tensor:
        """The fine-tuned model (body + fresh head, LoRA deltas merged) on one episode's x (B, ...)."""
        p = self.lora.merge(params) if self.lora else params
        return self.head_fn(p, self.embed(p, x))

    def fresh_head(self, z: Tensor, y: Tensor, ways: int, gen: torch.Generator) -> Params:
        """A new N-way head for one episode: z (B, D) support features at the initial weights, y (B,)."""
        D, dtype, dev = z.shape[1], z.dtype, z.device
        if self.head_init == "prototype":
            mu = torch.zeros(ways, D, dtype=dtype, device=dev).index_add_(0, y, z)
            mu = mu / torch.bincount(y, minlength=ways).clamp(min=1).to(dtype).unsqueeze(1)
            if self.head == "cosine":
                return {"head.weight": mu}
            return {"head.weight": 2 * mu, "head.bias": -(mu * mu).sum(1)}
        if self.head_init == "zero":
            return {"head.weight": torch.zeros(ways, D, dtype=dtype, device=dev),
                    "head.bias": torch.zeros(ways, dtype=dtype, device=dev)}
        bound = 1.0 / D ** 0.5
        w = (torch.rand(ways, D, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        b = (torch.rand(ways, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        head = {"head.weight": w.to(dtype=dtype, device=dev)}
        if self.head == "linear":
            head["head.bias"] = b.to(dtype=dtype, device=dev)
        return head

    def _base(self) -> Params:
        return {n: p.detach() for n, p in self.model.named_parameters() if not n.startswith("head.")}

    # --- the reference: one episode --------------------------------------------------------------
    def adapt_episode(self, support: Examples, ways: int, *, steps: int, lr: float) -> Params:
        """Fine-tuned params of one episode (x (B, ...), y (B,)), from the pre-trained weights and a fresh head."""
        base = self._base()
        with torch.no_grad():
            z0 = (self.embed(base, support.x) if self.head_init == "prototype"
                  else support.x.new_zeros(1, self.feature_dim()))
        gen = episode_generator(support.x, support.y, self.head_seed)
        params = {**base, **self.fresh_head(z0, support.y, ways, gen)}
        if self.lora:
            params.update(self.lora.init(support.x))
        adapt = self.adapted_names()
        for n in adapt:
            params[n] = params[n].detach().clone().requires_grad_(True)
        res = run_inner_loop(self.model, params, support, adapt=adapt, steps=steps, rule=self.rule(lr),
                             first_order=True, loss_fn=self.loss_fn, forward_fn=lambda p, x, s: self.predict(p, x))
        return {n: p.detach() for n, p in res.params.items()}

    def feature_dim(self) -> int:
        return self.model.head.weight.shape[1]

    # --- the batched path (conv4): episodes as a batch dimension -----------------------------------
    def _batched_ok(self) -> bool:
        from ..models.conv4 import Conv4

        m = self.model
        return type(m) is Conv4 and all(
            isinstance(b.norm, nn.Identity) or (isinstance(b.norm, nn.BatchNorm2d) and not b.norm.track_running_stats)
            for b in m.features)

    def _blocks(self, params: Params, h: Tensor, start: int, stop: int, T: int) -> Tensor:
        """conv4 blocks start..stop-1 on h (B, T*C, H, W); params shared (shape) or per episode (T, *shape)."""
        for i in range(start, stop):
            block, pre = self.model.features[i], f"features.{i}"
            w, b = params[f"{pre}.conv.weight"], params[f"{pre}.conv.bias"]
            w = w if w.dim() == 5 else w.expand(T, *w.shape)
            b = b if b.dim() == 2 else b.expand(T, *b.shape)
            conv = block.conv
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, groups=T)
            if isinstance(block.norm, nn.BatchNorm2d):  # statistics per (episode, channel) over (B, H, W)
                g, beta = params[f"{pre}.norm.weight"], params[f"{pre}.norm.bias"]
                g = g if g.dim() == 2 else g.expand(T, *g.shape)
                beta = beta if beta.dim() == 2 else beta.expand(T, *beta.shape)
                h = F.batch_norm(h, None, None, g.reshape(-1), beta.reshape(-1), training=True, eps=block.norm.eps)
            h = F.max_pool2d(h, block.pool.kernel_size, block.pool.stride).relu()  # = relu then pool
        return h

    def _batched_predict(self, params: Params, h: Tensor, T: int) -> Tensor:
        """Logits (T, B, N) from the cached output h (B, T*C', H', W') of the frozen blocks."""
        p = self.lora.merge(params) if self.lora else params
        h = self._blocks(p, h, self.first_unfrozen, len(self.model.features), T)
        z = h.reshape(h.shape[0], T, -1).transpose(0, 1)  # (T, B, D): each episode's flatten(1)
        return self.head_fn(p, z)

    def batched_adapt(self, batch: TaskBatch, steps: int, lr: float) -> "tuple[Params, Tensor, Tensor]":
        """Fine-tune every episode of the batch at once: (fast params with an episode dimension on the
        adapted names, cached frozen-block outputs of the support and query sets); logits are
        `_batched_predict(fast, h, T)`."""
        T, ways = batch.num_tasks, batch.ways
        sx, sy, qx = batch.support.x, batch.support.y, batch.query.x

        def layout(x: Tensor) -> Tensor:  # (T, B, C, H, W) -> (B, T*C, H, W)
            return x.transpose(0, 1).reshape(x.shape[1], T * x.shape[2], *x.shape[3:])

        base = self._base()
        with torch.no_grad():  # frozen blocks: once per batch, not once per step
            hs = self._blocks(base, layout(sx), 0, self.first_unfrozen, T)
            hq = self._blocks(base, layout(qx), 0, self.first_unfrozen, T)
            z0 = None
            if self.head_init == "prototype":
                full = self._blocks(base, hs, self.first_unfrozen, len(self.model.features), T)
                z0 = full.reshape(full.shape[0], T, -1).transpose(0, 1)
        heads = [self.fresh_head(z0[t] if z0 is not None else sx.new_zeros(1, self.feature_dim()), sy[t], ways,
                                 episode_generator(sx[t], sy[t], self.head_seed)) for t in range(T)]
        params: Params = dict(base)
        params.update({n: torch.stack([h[n] for h in heads]) for n in self.head_names})
        for n in self.full:
            params[n] = base[n].expand(T, *base[n].shape)
        if self.lora:
            params.update({n: d.expand(T, *d.shape) for n, d in self.lora.init(sx).items()})
        adapt = self.adapted_names()
        for n in adapt:
            params[n] = params[n].detach().clone().requires_grad_(True)

        def loss_fn(out: Tensor, y: Tensor) -> Tensor:  # sum over episodes of each episode's mean loss
            per_example = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
            return per_example.view(y.shape).mean(1).sum()

        res = run_inner_loop(self.model, params, Examples(hs, sy), adapt=adapt, steps=steps, rule=self.rule(lr),
                             first_order=True, loss_fn=loss_fn,
                             forward_fn=lambda p, h, s: self._batched_predict(p, h, T))
        return {n: p.detach() for n, p in res.params.items()}, hs, hq

    def _batched_evaluate(self, batch: TaskBatch, steps: int, lr: float) -> "tuple[Tensor, Tensor]":
        T, qy, sy = batch.num_tasks, batch.query.y, batch.support.y
        fast, hs, hq = self.batched_adapt(batch, steps, lr)
        with torch.no_grad():
            q = (self._batched_predict(fast, hq, T).argmax(-1) == qy).double().mean(1)
            s = (self._batched_predict(fast, hs, T).argmax(-1) == sy).double().mean(1)
        return q, s

    # --- the entry points -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        """Query accuracy of each episode after fine-tuning on its support set: (T,) float64.
        The support accuracies are appended to `support_accuracies`."""
        steps = self.inner_steps if steps is None else steps
        lr = self.inner_lr if lr is None else lr
        if transductive and self.execution != "loop" and self._batched_ok():
            q, s = self._batched_evaluate(batch, steps, lr)
            self.support_accuracies.append(s.cpu())
            return q.cpu()
        qs, ss = [], []
        for i in range(batch.num_tasks):
            sup = batch.support.task(i)
            fast = self.adapt_episode(sup, batch.ways, steps=steps, lr=lr)
            pred = scored(lambda x: self.predict(fast, x), sup.x, batch.query.x[i], transductive)
            qs.append(self.score(pred, batch.query.y[i]))
            ss.append(self.score(self.predict(fast, sup.x), sup.y))
            self.episode_done()
        self.support_accuracies.append(torch.stack(ss).cpu())
        return torch.stack(qs).cpu()

    @classmethod
    def from_config(cls, cfg, model: nn.Module, loss: str = "cross_entropy") -> "FineTune":
        t = cfg.transfer
        return cls(model, inner_lr=cfg.inner.lr, inner_steps=cfg.inner.steps, blocks=t.blocks, head=t.head,
                   cosine_scale=t.cosine_scale, head_init=t.head_init, head_seed=t.head_seed, optimizer=t.optimizer,
                   weight_decay=t.weight_decay, lora_rank=cfg.inner.lora_rank, lora_alpha=cfg.inner.lora_alpha,
                   execution=cfg.outer.execution)


__all__ = ["FineTune", "WeightDecay", "episode_generator"]
