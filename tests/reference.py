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


def conv4_forward_step(w: dict, x: torch.Tensor, step: int) -> torch.Tensor:
    """conv4 whose BatchNorm affine parameters have one row per inner step (MAML++ BNWB):
    norm.weight/bias (steps, C); row min(step, steps - 1) is used."""
    for i in range(4):
        x = F.conv2d(x, w[f"features.{i}.conv.weight"], w[f"features.{i}.conv.bias"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        gamma, beta = w[f"features.{i}.norm.weight"], w[f"features.{i}.norm.bias"]
        r = min(step, gamma.shape[0] - 1)
        x = (x - mean) / torch.sqrt(var + 1e-5) * gamma[r].view(1, -1, 1, 1) + beta[r].view(1, -1, 1, 1)
        x = F.max_pool2d(F.relu(x), 2)
    return x.flatten(1) @ w["head.weight"].t() + w["head.bias"]


def general_meta_gradient(w0: dict, batch, *, steps: int, first_order, adapt=None, lrs: dict,
                          step_weights=None, forward=None, loss=F.cross_entropy) -> tuple[dict, dict]:
    """Per-task autograd reference for the SGD family (MAML, Meta-SGD, MAML++), written out longhand.

    lrs[name]: a tensor, learnable; shape () = one lr, (steps,) = one per step, else elementwise.
    first_order: bool, or a list per step is not supported (one flag for all steps).
    step_weights: None = only the final query loss; else a list of `steps` weights for the query
    loss after each step (MAML++ multi-step loss). forward(w, x, step) defaults to conv4_forward.
    Returns (d/dw0, d/dlrs) of (1/T) sum_t loss_t.
    """
    fwd = forward or (lambda w, x, s: conv4_forward(w, x))
    w0 = {k: v.detach().clone().requires_grad_(True) for k, v in w0.items()}
    lr0 = {k: v.detach().clone().requires_grad_(True) for k, v in lrs.items()}
    adapt = list(w0) if adapt is None else list(adapt)
    T = batch.support.x.shape[0]
    total = 0.0
    for t in range(T):
        w = dict(w0)
        task_loss = 0.0
        for s in range(steps):
            l_s = loss(fwd(w, batch.support.x[t], s), batch.support.y[t])
            g = torch.autograd.grad(l_s, [w[k] for k in adapt], create_graph=not first_order)
            for k, gk in zip(adapt, g):
                a = lr0[k]
                a = a[s] if a.dim() == 1 and a.shape[0] == steps and w[k].shape != a.shape else a
                w[k] = w[k] - a * (gk.detach() if first_order else gk)
            if step_weights is not None:
                task_loss = task_loss + step_weights[s] * loss(fwd(w, batch.query.x[t], s), batch.query.y[t])
        if step_weights is None:
            task_loss = loss(fwd(w, batch.query.x[t], steps - 1), batch.query.y[t])
        total = total + task_loss
    leaves = list(w0.values()) + list(lr0.values())
    grads = torch.autograd.grad(total / T, leaves, allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]
    return dict(zip(w0, grads[:len(w0)])), dict(zip(lr0, grads[len(w0):]))


def protonet_gradient(w0: dict, batch) -> dict:
    """Prototypical networks: d/dw0 of the mean over tasks of the query cross-entropy with
    logits = -squared Euclidean distance to the class means of the support embeddings."""
    w0 = {k: v.detach().clone().requires_grad_(True) for k, v in w0.items()}

    def embed(x):
        for i in range(4):
            x = F.conv2d(x, w0[f"features.{i}.conv.weight"], w0[f"features.{i}.conv.bias"], padding=1)
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5)
            x = x * w0[f"features.{i}.norm.weight"].view(1, -1, 1, 1) + w0[f"features.{i}.norm.bias"].view(1, -1, 1, 1)
            x = F.max_pool2d(F.relu(x), 2)
        return x.flatten(1)

    T, total = batch.support.x.shape[0], 0.0
    for t in range(T):
        zs, zq = embed(batch.support.x[t]), embed(batch.query.x[t])
        protos = torch.stack([zs[batch.support.y[t] == c].mean(0) for c in range(batch.ways)])
        d = ((zq[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
        total = total + F.cross_entropy(-d, batch.query.y[t])
    names = [k for k in w0 if not k.startswith("head.")]
    grads = torch.autograd.grad(total / T, [w0[k] for k in names])
    return dict(zip(names, grads))


def resnet12_forward(w: dict, x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """ResNet-12 (MetaOptNet / FEAT form, no DropBlock) written out: per block three 3x3 convolutions without
    bias, each with BatchNorm from the batch mean and biased variance, LeakyReLU(0.1) after the first two; a
    1x1-convolution + BatchNorm shortcut; add, LeakyReLU, 2x max-pool; then global average pooling and the head."""
    def bn(h, name):
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5) * w[f"{name}.weight"].view(1, -1, 1, 1) \
            + w[f"{name}.bias"].view(1, -1, 1, 1)

    for i in range(blocks):
        p = f"features.{i}"
        h = F.leaky_relu(bn(F.conv2d(x, w[f"{p}.conv1.weight"], padding=1), f"{p}.norm1"), 0.1)
        h = F.leaky_relu(bn(F.conv2d(h, w[f"{p}.conv2.weight"], padding=1), f"{p}.norm2"), 0.1)
        h = bn(F.conv2d(h, w[f"{p}.conv3.weight"], padding=1), f"{p}.norm3")
        s = bn(F.conv2d(x, w[f"{p}.shortcut.conv.weight"]), f"{p}.shortcut.norm")
        x = F.max_pool2d(F.leaky_relu(h + s, 0.1), 2)
    x = x.mean(dim=(2, 3))
    return x @ w["head.weight"].t() + w["head.bias"]
