"""Supervised pre-training of a backbone on all meta-training classes jointly.

Chen et al. "A Closer Look at Few-shot Classification." ICLR 2019 (Baseline / Baseline++ training
stage, Sec. 3.1-3.2): the meta-training split's C classes become one C-way classification problem
(global labels 0..C-1), trained with cross-entropy on mini-batches of images:

    linear head   logits = W z + b                        (Baseline)
    cosine head   logits = s * cos(z, W_c), s = cosine_scale  (Baseline++)
    z = features(x).flatten(1); BatchNorm normalises with the mini-batch's statistics (conv4 is
    transductive, so the same rule holds when the episodes are fine-tuned later).

Mini-batches: a seeded generator permutes all training images once per epoch (without
replacement); the optional augmentations transfer.pretrain.augment (metalearn/data/augment.py: `crop` =
zero-pad image_size // 8 and crop back at random, `flip` = random horizontal flip, `rotate`, `jitter`,
`erase`) draw from the same generator.

The run is meta-training's loop (metalearn/train.py `loop`) with `SupervisedStep` as its step:
the same run folder (config.yaml, run.json, metrics.jsonl, checkpoint.pt with the batch generator's
state, learning_curve.png, eval-<split>.json), signals, non-finite guards and exact `--resume` on
CPU. Validation and the final evaluation fine-tune on fixed episodes (metalearn/algorithms/finetune.py,
an evaluation-time adapter) and report support accuracy beside query accuracy.
"""
from __future__ import annotations

import copy
from datetime import datetime
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, eval_settings
from ..data.augment import augment
from ..data.benchmark import ImageBenchmark, open_benchmark
from ..errors import MetalearnError
from ..evaluation import EvalResult, evaluate, mean_ci95, plural
from ..guards import StopSignals, guarded_step
from ..models import build_model
from ..runfolder import RunFolder
from ..train import Scored, loop, seed_and_device


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


def finetune_eval(cfg: Config, model: nn.Module, benchmark: ImageBenchmark, split: str, episodes: int, *,
                  progress: bool = False) -> Dict[str, Any]:
    """Fine-tune `model` on `episodes` fixed episodes of `split` of the (loaded) benchmark: the evaluation
    result dict plus support accuracy (mean, CI) and the adapted-parameter count."""
    ev = eval_settings(cfg)
    algorithm = finetuner(cfg, model)
    result = evaluate(algorithm, None, ways=ev["ways"], shots=ev["shots"], query_shots=ev["query_shots"],
                      episodes=episodes, seed=benchmark.eval_seed(split, cfg.eval.seed), inner_steps=ev["inner_steps"],
                      inner_lr=ev["inner_lr"], batch_size=cfg.eval.batch_size, split=split,
                      batchnorm=benchmark.batchnorm, dtype=next(model.parameters()).dtype, progress=progress,
                      transductive=cfg.eval.transductive, benchmark=benchmark)
    support = algorithm.take_support()
    s_mean, s_ci = mean_ci95(support)
    size = algorithm.adapted_size(ev["ways"])
    return {**result.to_dict(), "support_mean": s_mean, "support_ci95": s_ci, "support_accuracies": support.tolist(),
            "adapted_parameters": size["parameters"], "adapted_bytes": size["bytes"],
            "finetune": {"blocks": cfg.transfer.blocks, "head": cfg.transfer.head, "head_init": cfg.transfer.head_init,
                         "optimizer": cfg.transfer.optimizer, "weight_decay": cfg.transfer.weight_decay,
                         "lora_rank": cfg.inner.lora_rank, "init": cfg.transfer.init}}


def summary_line(ev: Dict[str, Any]) -> str:
    """The result line of a fine-tuning evaluation (finetune_eval's dict): query accuracy ± 95% CI, the protocol,
    support accuracy and the adapted-parameter count."""
    return (f"{ev['split']} accuracy: {100 * ev['mean']:.2f} ± {100 * ev['ci95']:.2f}% (95% CI) over {ev['episodes']} "
            f"{ev['ways']}-way {ev['shots']}-shot episodes, {plural(ev['inner_steps'], 'fine-tuning step')} "
            f"(support accuracy {100 * ev['support_mean']:.2f}%; {ev['adapted_parameters']} adapted parameters)")


def pretrain_settings(cfg: Config) -> str:
    """The key settings of a pre-training run, for the learning curve's title."""
    p, ev = cfg.transfer.pretrain, eval_settings(cfg)
    return (f"pre-training {p.steps} steps, batch {p.batch_size}, {p.optimizer} lr {p.lr:g}; fine-tuning "
            f"{ev['ways']}-way {ev['shots']}-shot, {plural(ev['inner_steps'], 'step')} (lr {ev['inner_lr']:g}), "
            f"{cfg.transfer.head} head, {cfg.transfer.blocks} blocks; seed {cfg.seed}")


def check_pretrain_data(cfg: Config, pretraining: bool = True) -> ImageBenchmark:
    """Open the benchmark and check the validation / evaluation episodes fit; nothing decoded or written."""
    if pretraining and cfg.data.rotation == "per_task":
        raise MetalearnError("data.rotation=per_task rotates episodes; pre-training uses rotation=none or classes")
    if pretraining and cfg.data.augment:
        raise MetalearnError("data.augment augments meta-training episodes; pre-training: transfer.pretrain.augment")
    benchmark = open_benchmark(cfg)
    ev = eval_settings(cfg)
    if benchmark.classes("train") < 2:
        raise MetalearnError(f"pre-training needs >= 2 training classes, the train split has "
                             f"{benchmark.classes('train')}")
    if cfg.eval.val_every:
        benchmark.check_episodes("val", ev["ways"], ev["shots"], ev["query_shots"])
    benchmark.check_episodes(cfg.eval.split, ev["ways"], ev["shots"], ev["query_shots"])
    return benchmark


class SupervisedStep:
    """One step of pre-training (the `Step` of metalearn/train.py's loop): a mini-batch of training images
    (augmented if transfer.pretrain.augment), cross-entropy over all C training classes, the optimiser's update.

    flat: uint8 (C * P, ch, H, W) training images on the device; labels: (C * P,) their classes 0..C-1, in order.
    The checkpoint records kind="pretrain" and the number of classes C (the head's width)."""

    name = "pre-train"
    metric = "accuracy"
    note = ""

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, batches: ImageBatches,
                 flat: Tensor, labels: Tensor, *, kept: Callable[[], str]):
        self.cfg, self.model, self.optimizer, self.batches = cfg, model, optimizer, batches
        self.flat, self.labels = flat, labels
        self.kept, self.params = kept, dict(model.named_parameters())
        self.classes = int(labels[-1]) + 1
        p = cfg.transfer.pretrain
        self.total, self.rate = p.steps, ("images_per_s", "img_s", p.batch_size)
        self.dtype = next(model.parameters()).dtype

    def __call__(self, step: int, stop: StopSignals) -> Tuple[Dict[str, float], Optional[str]]:
        cfg, p = self.cfg, self.cfg.transfer.pretrain
        idx = self.batches.next().to(self.flat.device)
        x = self.flat[idx].to(self.dtype).div_(255.0)
        if p.augment:
            x = augment(x, p.augment, self.batches.generator)
        y = self.labels[idx]
        self.optimizer.zero_grad(set_to_none=True)
        out = logits(self.model, x, cfg.transfer.head, cfg.transfer.cosine_scale)
        loss = F.cross_entropy(out, y)
        if not torch.isfinite(loss):
            raise MetalearnError(f"non-finite pre-training loss at step {step}; {self.kept()}. "
                                 f"Lower transfer.pretrain.lr")
        loss.backward()
        guarded_step(self.optimizer, self.params, where=f"update of pre-training step {step}", kept=self.kept,
                     hint="Lower transfer.pretrain.lr")
        return {"loss": loss.item(), "accuracy": (out.argmax(-1) == y).double().mean().item()}, stop.received

    def counters(self) -> Dict[str, Any]:
        return {"epoch": self.batches.epoch}

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "algorithm": {},
                "sampler": self.batches.state_dict(), "kind": "pretrain", "classes": self.classes}

    def load_state_dict(self, checkpoint: Dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.batches.load_state_dict(checkpoint["sampler"])


def pretrain(cfg: Config, *, resume: bool = False, final_eval: bool = True) -> Dict[str, Any]:
    """Pre-train cfg.model on the train split's classes (transfer.pretrain.*), checkpointing as it goes; then
    (final_eval) fine-tune on the fixed eval.split episodes. Returns the loop's summary, whose "eval" also
    holds support_mean / support_ci95 / adapted_parameters.

    As meta-training (the same loop): a non-finite loss, parameter or optimiser state stops the run before
    it is applied or saved (the last good checkpoint stays); resuming a run that finished and was evaluated
    returns its saved result ("finished": True) without evaluating or logging again."""
    cfg = copy.deepcopy(cfg)
    p = cfg.transfer.pretrain
    if not cfg.tracking.name:
        if resume:
            raise MetalearnError("--resume needs the run's name: pass the run's config.yaml or tracking.name=...")
        cfg.tracking.name = f"pretrain-{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"

    # --- seeding and device, data, run folder -----------------------------------------------------
    device, dtype = seed_and_device(cfg)
    benchmark = check_pretrain_data(cfg)
    run = RunFolder.open(cfg, resume, kind="pretrain")
    finished = run.finished(p.steps) if final_eval else None
    if finished is not None:  # resuming a finished run: nothing to train, evaluate or log again
        return finished
    benchmark.load(device)
    train_images = benchmark.split_images("train")  # (C, P, ch, H, W) uint8
    C, P = train_images.shape[:2]
    flat = train_images.reshape(C * P, *train_images.shape[2:])
    labels = torch.arange(C, device=device).repeat_interleave(P)
    batches = ImageBatches(C * P, p.batch_size, cfg.seed)

    # --- model, optimiser ---------------------------------------------------------------------------
    model = build_model(cfg.model, benchmark.channels, C, cfg.data.image_size).to(device=device, dtype=dtype)
    finetuner(cfg, model)  # fine-tuning settings that cannot work on this model stop here, before any file
    if p.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=0.9, weight_decay=p.weight_decay)

    def evaluate_finetuning(split: str, episodes: int, progress: bool) -> Scored:
        ev = finetune_eval(cfg, model, benchmark, split, episodes, progress=progress)
        return Scored(EvalResult.from_dict(ev), ev, summary_line(ev), {"support_accuracy": ev["support_mean"]})

    step = SupervisedStep(cfg, model, optimizer, batches, flat, labels, kept=run.kept)
    return loop(cfg, run, step, evaluate_finetuning, settings=pretrain_settings(cfg), final_eval=final_eval)


__all__ = ["ImageBatches", "SupervisedStep", "augment", "check_pretrain_data", "finetune_eval", "logits", "pretrain",
           "summary_line"]
