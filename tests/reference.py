"""An independent MAML reference: conv4 written with torch.nn.functional, one task at a time,
plain torch.autograd. Shares no code with metalearn's inner loop or model."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv4_forward(w: dict, x: torch.Tensor, batchnorm: bool = True) -> torch.Tensor:
    for i in range(4):
        x = F.conv2d(x, w[f"features.{i}.conv.weight"], w[f"features.{i}.conv.bias"], padding=1)
        if batchnorm:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5)
            x = x * w[f"features.{i}.norm.weight"].view(1, -1, 1, 1) + w[f"features.{i}.norm.bias"].view(1, -1, 1, 1)
        x = F.max_pool2d(F.relu(x), 2)
    return x.flatten(1) @ w["head.weight"].t() + w["head.bias"]


def maml_meta_gradient(w0: dict, batch, *, lr: float, steps: int, first_order: bool,
                       adapt=None, batchnorm: bool = True) -> dict:
    """d/dw0 of (1/T) sum_t L_query(w_t'), each task adapted by `steps` SGD steps on its support set."""
    w0 = {k: v.detach().clone().requires_grad_(True) for k, v in w0.items()}
    adapt = list(w0) if adapt is None else list(adapt)
    T = batch.support.x.shape[0]
    total = 0.0
    for t in range(T):
        w = dict(w0)
        for _ in range(steps):
            loss = F.cross_entropy(conv4_forward(w, batch.support.x[t], batchnorm), batch.support.y[t])
            g = torch.autograd.grad(loss, [w[k] for k in adapt], create_graph=not first_order)
            for k, gk in zip(adapt, g):
                w[k] = w[k] - lr * (gk.detach() if first_order else gk)
        total = total + F.cross_entropy(conv4_forward(w, batch.query.x[t], batchnorm), batch.query.y[t])
    grads = torch.autograd.grad(total / T, list(w0.values()))
    return dict(zip(w0, grads))
