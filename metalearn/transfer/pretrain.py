"""Supervised pre-training of a backbone on all meta-training classes jointly.

Chen et al. "A Closer Look at Few-shot Classification." ICLR 2019 (Baseline / Baseline++ training
stage, Sec. 3.1-3.2): the meta-training split's C classes become one C-way classification problem
(global labels 0..C-1), trained with cross-entropy on mini-batches of images:

    linear head   logits = W z + b                        (Baseline)
    cosine head   logits = s * cos(z, W_c), s = cosine_scale  (Baseline++)
    z = features(x).flatten(1); BatchNorm normalises with the mini-batch's statistics (conv4 is
    transductive, so the same rule holds when the episodes are fine-tuned later).

Mini-batches: a seeded generator permutes all training images once per epoch (without
replacement); optional augmentation `crop` (zero-pad image_size // 8, random crop back) and
`flip` (random horizontal flip) draws from the same generator. Validation: few-shot
fine-tuning (metalearn/algorithms/finetune.py) on fixed episodes of the validation split every
eval.val_every steps. The run folder is like a meta-training run's: config.yaml, run.json,
metrics.jsonl, checkpoint.pt (atomic; model, optimiser, batch generator, RNG states, config;
`--resume` continues it exactly on CPU), learning_curve.png, eval-<split>.json (fine-tuning
accuracy on the fixed test episodes, with support accuracy beside it).
"""
from __future__ import annotations

import copy
import time
from datetime import datetime
from typing import Any, Dict

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._io import atomic_json, atomic_write
from ..checkpoint import CHECKPOINT_NAME, git_info, nonfinite_tensor, rng_state, save_checkpoint, set_rng_state
from ..config import Config, to_dict
from ..data import check_episode_fits, open_dataset
from ..errors import MetalearnError
from ..evaluation import evaluate, mean_ci95
from ..models import build_model
from ..tracking import (JsonlTracker, TensorboardTracker, Trackers, WandbTracker, curve_title, plot_learning_curve,
                        read_jsonl)


class ImageBatches:
    """Mini-batches of image indices 0..n-1: a fresh permutation per epoch from one seeded generator,
    which also drives the augmentations. state_dict / load_state_dict resume the stream exactly."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos, self.epoch = 0, 0

    def next(self) -> Tensor:
        out = []
        need = self.batch_size
        while need:
            if self.pos == self.n:
                self.perm, self.pos, self.epoch = torch.randperm(self.n, generator=self.generator), 0, self.epoch + 1
            take = min(need, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos, self.epoch = state["perm"], int(state["pos"]), int(state["epoch"])


def augment(x: Tensor, kinds, g: torch.Generator) -> Tensor:
    """x (B, C, H, W) -> augmented copy: `crop` = zero-pad H // 8 (>= 1) and crop back at a random offset
    per image; `flip` = mirror left-right with probability 1/2 per image. Draws from g (CPU)."""
    B, C, H, W = x.shape
    if "crop" in kinds:
        pad = max(1, H // 8)
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (B,), generator=g).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (B,), generator=g).to(x.device)
        rows = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
        x = xp[torch.arange(B, device=x.device)[:, None, None, None], torch.arange(C, device=x.device)[None, :, None, None],
               rows, cols]
    if "flip" in kinds:
        mask = (torch.rand(B, generator=g) < 0.5).to(x.device).view(B, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x


def logits(model: nn.Module, x: Tensor, head: str, scale: float) -> Tensor:
    """The pre-training classifier on x (B, ...): linear (the model itself) or cosine (Baseline++)."""
    if head == "linear":
        return model(x)
    z = model.features(x).flatten(1)
    return scale * F.normalize(z, dim=-1) @ F.normalize(model.head.weight, dim=-1).t()


def finetuner(cfg: Config, model: nn.Module):
    """The fine-tuning algorithm of cfg (transfer.*, inner.lora_*) on `model`."""
    from ..algorithms.finetune import FineTune

    return FineTune.from_config(cfg, model)


def finetune_eval(cfg: Config, model: nn.Module, images: Tensor, split: str, episodes: int, *,
                  progress: bool = False) -> Dict[str, Any]:
    """Fine-tune `model` on `episodes` fixed episodes of `split` (images of that split, on the device):
    the evaluation result dict plus support accuracy (mean, CI) and the adapted-parameter count."""
    from ..train import eval_settings

    ev = eval_settings(cfg)
    algorithm = finetuner(cfg, model)
    result = evaluate(algorithm, images, ways=ev["ways"], shots=ev["shots"], query_shots=ev["query_shots"],
                      episodes=episodes, seed=cfg.eval.seed, inner_steps=ev["inner_steps"], inner_lr=ev["inner_lr"],
                      batch_size=cfg.eval.batch_size, split=split, batchnorm=cfg.model.batchnorm,
                      dtype=next(model.parameters()).dtype, progress=progress, transductive=cfg.eval.transductive)
    support = algorithm.take_support()
    s_mean, s_ci = mean_ci95(support)
    size = algorithm.adapted_size(ev["ways"])
    return {**result.to_dict(), "support_mean": s_mean, "support_ci95": s_ci, "support_accuracies": support.tolist(),
            "adapted_parameters": size["parameters"], "adapted_bytes": size["bytes"],
            "finetune": {"blocks": cfg.transfer.blocks, "head": cfg.transfer.head, "head_init": cfg.transfer.head_init,
                         "optimizer": cfg.transfer.optimizer, "weight_decay": cfg.transfer.weight_decay,
                         "lora_rank": cfg.inner.lora_rank, "init": cfg.transfer.init}}


def summary_line(ev: Dict[str, Any]) -> str:
    return (f"{ev['split']} accuracy: {100 * ev['mean']:.2f} ± {100 * ev['ci95']:.2f}% (95% CI) over {ev['episodes']} "
            f"{ev['ways']}-way {ev['shots']}-shot episodes, {ev['inner_steps']} fine-tuning step{'' if ev['inner_steps'] == 1 else 's'} "
            f"(support accuracy {100 * ev['support_mean']:.2f}%; {ev['adapted_parameters']} adapted parameters)")


def pretrain_settings(cfg: Config) -> str:
    """The key settings of a pre-training run, for the learning curve's title."""
    p, ev = cfg.transfer.pretrain, cfg.eval
    steps = cfg.inner.steps if ev.inner_steps is None else ev.inner_steps
    lr = cfg.inner.lr if ev.inner_lr is None else ev.inner_lr
    return (f"pre-training {p.steps} steps, batch {p.batch_size}, {p.optimizer} lr {p.lr:g}; fine-tuning "
            f"{ev.ways or cfg.data.ways}-way {ev.shots or cfg.data.shots}-shot, {steps} step{'' if steps == 1 else 's'} "
            f"(lr {lr:g}), {cfg.transfer.head} head, {cfg.transfer.blocks} blocks; seed {cfg.seed}")


def check_pretrain_data(cfg: Config, pretraining: bool = True):
    """Open the data set and check the validation / evaluation episodes fit; nothing decoded or written."""
    from ..train import eval_settings

    if pretraining and cfg.data.rotation == "per_task":
        raise MetalearnError("data.rotation=per_task rotates episodes; pre-training uses rotation=none or classes")
    ds, splits = open_dataset(cfg.data)
    ev = eval_settings(cfg)
    if len(splits["train"]) < 2:
        raise MetalearnError(f"pre-training needs >= 2 training classes, the train split has {len(splits['train'])}")
    if cfg.eval.val_every:
        check_episode_fits("val", len(splits["val"]), ds.samples_per_class, ev["ways"], ev["shots"], ev["query_shots"])
    check_episode_fits(cfg.eval.split, len(splits[cfg.eval.split]), ds.samples_per_class, ev["ways"], ev["shots"],
                       ev["query_shots"])
    return ds, splits


def pretrain(cfg: Config, *, resume: bool = False, final_eval: bool = True) -> Dict[str, Any]:
    """Pre-train cfg.model on the train split's classes (transfer.pretrain.*), checkpointing as it goes; then
    (final_eval) fine-tune on the fixed eval.split episodes. Returns a summary like `train`'s, whose
    "eval" also holds support_mean / support_ci95 / adapted_parameters.

    As in `train`: parameters and optimiser state are checked after every update and a non-finite one
    stops the run before it is saved (the last good checkpoint stays); resuming a run that finished and
    was evaluated returns its saved result ("finished": True) without evaluating or logging again."""
    from ..train import _StopSignals, _finished_result, guarded_step, open_run_dir, seed_and_device

    cfg = copy.deepcopy(cfg)
    p = cfg.transfer.pretrain
    if not cfg.tracking.name:
        if resume:
            raise MetalearnError("--resume needs the run's name: pass the run's config.yaml or tracking.name=...")
        cfg.tracking.name = f"pretrain-{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    device, dtype = seed_and_device(cfg)
    ds, splits = check_pretrain_data(cfg)
    out, ckpt = open_run_dir(cfg, resume)
    finished = _finished_result(out, ckpt, cfg, total=p.steps) if final_eval else None
    if finished is not None:  # resuming a finished run: nothing to train, evaluate or log again
        return finished

    images = ds.images.to(device)
    train_images = images[splits["train"].to(device)]  # (C, P, ch, H, W) uint8
    C, P = train_images.shape[:2]
    flat = train_images.reshape(C * P, *train_images.shape[2:])
    labels = torch.arange(C, device=device).repeat_interleave(P)
    batches = ImageBatches(C * P, p.batch_size, cfg.seed)

    model = build_model(cfg.model, ds.channels, C, cfg.data.image_size).to(device=device, dtype=dtype)
    finetuner(cfg, model)  # fine-tuning settings that cannot work on this model stop here, before any file
    if p.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=0.9, weight_decay=p.weight_decay)

    git = git_info()
    start, wandb_id = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        batches.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        start, wandb_id = ckpt["step"], ckpt.get("tracking", {}).get("wandb_id")
        bad = nonfinite_tensor(ckpt["model"])
        if bad is not None:
            raise MetalearnError(f"--resume: {out / CHECKPOINT_NAME} holds a non-finite parameter ({bad})")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg))), mode="w")
        from ..train import run_record

        atomic_json(run_record(git, kind="pretrain"), out / "run.json")

    trackers = [JsonlTracker(out / "metrics.jsonl", keep_until=start if resume else None)]
    if cfg.tracking.tensorboard:
        trackers.append(TensorboardTracker(out / "tensorboard", config=to_dict(cfg),
                                           purge_step=start + 1 if resume and start else None))
    wandb_run = None
    if cfg.tracking.wandb.enabled:
        wandb_run = WandbTracker(cfg.tracking.wandb, run_dir=out, name=cfg.tracking.name, config=to_dict(cfg), run_id=wandb_id)
        trackers.append(wandb_run)
    tracker = Trackers(trackers, wandb_run)

    def save(step: int) -> None:
        save_checkpoint(out / CHECKPOINT_NAME, step=step, config=to_dict(cfg), git=git, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), algorithm={}, sampler=batches.state_dict(), rng=rng_state(),
                        tracking={"wandb_id": wandb_run.id if wandb_run else None}, kind="pretrain",
                        classes=C)

    named = dict(model.named_parameters())

    def kept() -> str:
        return (f"the last good checkpoint (step {saved_step}) is kept in {out / CHECKPOINT_NAME}"
                if saved_step is not None else "no checkpoint had been written yet")

    total = p.steps
    bar = tqdm(total=total, initial=start, desc="pre-train", disable=not cfg.tracking.progress, dynamic_ncols=True)
    window, t_window, t_start = [], time.perf_counter(), time.perf_counter()
    saved_step, step, ok = (start if ckpt is not None else None), start, False
    try:
        with _StopSignals() as stop:
            for step in range(start + 1, total + 1):
                idx = batches.next().to(device)
                x = flat[idx].to(dtype).div_(255.0)
                if p.augment:
                    x = augment(x, p.augment, batches.generator)
                y = labels[idx]
                optimizer.zero_grad(set_to_none=True)
                out_logits = logits(model, x, cfg.transfer.head, cfg.transfer.cosine_scale)
                loss = F.cross_entropy(out_logits, y)
                if not torch.isfinite(loss):
                    raise MetalearnError(f"non-finite pre-training loss at step {step}; {kept()}. "
                                         f"Lower transfer.pretrain.lr")
                loss.backward()
                guarded_step(optimizer, named, where=f"update of pre-training step {step}", kept=kept,
                             hint="Lower transfer.pretrain.lr")
                bar.update(1)
                window.append((loss.item(), (out_logits.argmax(-1) == y).double().mean().item()))
                if step % cfg.tracking.log_every == 0 or step == total:
                    now = time.perf_counter()
                    row = {"loss": sum(w[0] for w in window) / len(window),
                           "accuracy": sum(w[1] for w in window) / len(window),
                           "images_per_s": len(window) * p.batch_size / (now - t_window), "epoch": batches.epoch}
                    tracker.log(step, {f"train/{k}": v for k, v in row.items()})
                    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}", img_s=f"{row['images_per_s']:.0f}")
                    window, t_window = [], now
                if cfg.eval.val_every and step % cfg.eval.val_every == 0:
                    val = finetune_eval(cfg, model, images[splits["val"].to(device)], "val", cfg.eval.val_episodes)
                    tracker.log(step, {"val/accuracy": val["mean"], "val/ci95": val["ci95"],
                                       "val/support_accuracy": val["support_mean"]})
                    bar.write(f"step {step}: val {100 * val['mean']:.2f} ± {100 * val['ci95']:.2f}% "
                              f"(support {100 * val['support_mean']:.2f}%)")
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == total or stop.received:
                    save(step)
                    saved_step = step
                if stop.received:
                    break
        bar.close()
        train_seconds = time.perf_counter() - t_start
        if saved_step != step:
            save(step)
        if stop.received:
            ok = True
            return {"run_dir": str(out), "interrupted": stop.received, "step": step,
                    "train_seconds": round(train_seconds, 2), "eval": None}
        summary: Dict[str, Any] = {"run_dir": str(out), "interrupted": None, "step": total,
                                   "train_seconds": round(train_seconds, 2), "eval": None}
        if final_eval:
            ev = finetune_eval(cfg, model, images[splits[cfg.eval.split].to(device)], cfg.eval.split, cfg.eval.episodes,
                               progress=cfg.tracking.progress)
            final = {f"{cfg.eval.split}/accuracy": ev["mean"], f"{cfg.eval.split}/ci95": ev["ci95"],
                     f"{cfg.eval.split}/support_accuracy": ev["support_mean"]}
            tracker.log(total, final)
            tracker.summary(final)
            summary["eval"] = ev
            atomic_json(summary, out / f"eval-{cfg.eval.split}.json")
            tracker.log_text(f"eval/{cfg.eval.split}", summary_line(ev), step=total)
        # after the evaluation: the curve's title carries the run name, its settings and the final result
        curve = plot_learning_curve(read_jsonl(out / "metrics.jsonl", tolerant=True), out / "learning_curve.png",
                                    title=curve_title(cfg.tracking.name, pretrain_settings(cfg),
                                                      summary_line(summary["eval"]) if summary["eval"] else ""))
        tracker.log_image("learning_curve", curve, step=total)
        if wandb_run is not None:
            if cfg.tracking.wandb.log_checkpoint:
                wandb_run.log_checkpoint(out / CHECKPOINT_NAME, name=f"checkpoint-{wandb_run.id}", metadata={"step": total})
        ok = True
        return summary
    finally:
        bar.close()
        tracker.close(ok)


__all__ = ["ImageBatches", "augment", "check_pretrain_data", "finetune_eval", "logits", "pretrain", "summary_line"]
