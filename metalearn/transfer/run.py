"""A transfer-learning run: get the initial weights (transfer.init), then fine-tune on fixed episodes.

    transfer.init = pretrain   supervised pre-training (metalearn/transfer/pretrain.py)
                  = maml       meta-train MAML with this config's data/model/inner/outer settings
                               (metalearn/train.py), then fine-tune its body with a fresh head
                  = PATH       any metalearn checkpoint (a pre-training or meta-training run)

`run_transfer(cfg, share_init=True)` (what `metalearn ablate` uses) trains the initial weights
once per distinct setting into `<tracking.out_dir>/_init-<kind>-seed<seed>-<hash>/` (the hash
covers exactly the config fields that change them), so ablation cells that differ only in how
they fine-tune (blocks, steps, lr, shots, LoRA) share one pre-trained network per seed; the
cell's own folder then holds config.yaml, run.json and eval-<split>.json (query and support
accuracy). With share_init=False and init=pretrain, the run folder is the pre-training run itself.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from omegaconf import OmegaConf

from .._io import atomic_json, atomic_write
from ..checkpoint import CHECKPOINT_NAME, git_info, load_checkpoint
from ..config import Config, from_dict, to_dict
from ..errors import MetalearnError
from ..models import build_model
from ..runfolder import run_record
from ..train import resolve_device, seed_everything, train
from .pretrain import check_pretrain_data, finetune_eval, finetuner, pretrain

_EPISODE_FIELDS = ("ways", "shots", "query_shots")


def _hash(d: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def init_key(cfg: Config) -> Tuple[str, Dict[str, Any]]:
    """(kind, the config fields that determine the initial weights) for transfer.init pretrain / maml."""
    d = to_dict(cfg)
    data = {k: v for k, v in d["data"].items() if k not in _EPISODE_FIELDS}
    if cfg.transfer.init == "pretrain":
        t = d["transfer"]
        return "pretrain", {"seed": cfg.seed, "dtype": cfg.dtype, "data": data, "model": d["model"],
                            "pretrain": t["pretrain"], "head": t["head"], "cosine_scale": t["cosine_scale"]}
    inner = dict(d["inner"], lora_rank=0, lora_alpha=0.0)
    outer = dict(d["outer"], algorithm="maml")
    return "maml", {"seed": cfg.seed, "dtype": cfg.dtype, "data": d["data"], "model": d["model"], "inner": inner,
                    "outer": outer}


def initial_checkpoint(cfg: Config, *, progress: bool = True) -> Path:
    """Path of the checkpoint to fine-tune from, training it (once, shared) if transfer.init is pretrain or maml."""
    init = cfg.transfer.init
    if init not in ("pretrain", "maml"):
        path = Path(init)
        path = path / CHECKPOINT_NAME if path.is_dir() else path
        if not path.is_file():
            raise MetalearnError(f"transfer.init: checkpoint not found: {path}")
        return path
    kind, key = init_key(cfg)
    sub = copy.deepcopy(cfg)
    sub.tracking.name = f"_init-{kind}-seed{cfg.seed}-{_hash(key)}"
    sub.tracking.progress = cfg.tracking.progress and progress
    run_dir = Path(sub.tracking.out_dir) / sub.tracking.name
    done = run_dir / "init-done.json"
    if done.is_file():
        return run_dir / CHECKPOINT_NAME
    resume = (run_dir / CHECKPOINT_NAME).is_file()
    if progress:
        print(f"initial weights ({kind}): {run_dir}", file=sys.stderr, flush=True)
    if kind == "pretrain":
        sub.eval.val_every = 0  # the shared weights must not depend on any cell's fine-tuning settings
        summary = pretrain(sub, resume=resume, final_eval=False)
    else:
        sub.outer.algorithm, sub.inner.lora_rank, sub.inner.lora_alpha = "maml", 0, 0.0
        sub.eval.inner_steps = sub.eval.inner_lr = None  # MAML's own evaluation: its training inner loop
        summary = train(sub, resume=resume)
    if summary["interrupted"]:
        raise KeyboardInterrupt
    atomic_json({"key": key, "train_seconds": summary["train_seconds"]}, done)
    return run_dir / CHECKPOINT_NAME


def load_initial_model(cfg: Config, ckpt_path: Path, channels: int) -> "tuple[torch.nn.Module, Dict[str, Any]]":
    """The checkpoint's model (its own model config and head size) on cfg's device and dtype."""
    ckpt = load_checkpoint(ckpt_path)
    saved = from_dict(ckpt["config"])
    state = ckpt["model"]
    if "head.weight" not in state:
        raise MetalearnError(f"{ckpt_path}: the model has no `head` (finetune needs conv4 or mlp)")
    if saved.data.image_size != cfg.data.image_size:
        raise MetalearnError(f"{ckpt_path} was trained at data.image_size={saved.data.image_size}, "
                             f"this run uses {cfg.data.image_size}")
    model = build_model(saved.model, channels, state["head.weight"].shape[0], saved.data.image_size)
    model.load_state_dict(state)
    return model.to(device=resolve_device(cfg.device), dtype=getattr(torch, cfg.dtype)), ckpt


def run_transfer(cfg: Config, *, resume: bool = False, share_init: bool = True,
                 progress: bool = True) -> Dict[str, Any]:
    """Initial weights (shared, see module doc), then fine-tuning on the fixed eval.split episodes.
    Returns a summary like `train`'s; "eval" also has support_mean / support_ci95 / adapted_parameters."""
    if cfg.transfer.init == "pretrain" and not share_init:
        return pretrain(cfg, resume=resume)
    cfg = copy.deepcopy(cfg)
    if not cfg.tracking.name:
        cfg.tracking.name = f"finetune-{cfg.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.tracking.out_dir) / cfg.tracking.name
    finished = out / f"eval-{cfg.eval.split}.json"
    if finished.is_file():
        if not resume:
            raise MetalearnError(f"run folder {out} already holds a run; choose another tracking.name")
        return json.loads(finished.read_text())
    benchmark = check_pretrain_data(cfg, pretraining=cfg.transfer.init == "pretrain")
    if cfg.transfer.init in ("pretrain", "maml"):  # bad fine-tuning settings stop before any training
        finetuner(cfg, build_model(cfg.model, benchmark.channels, 2, cfg.data.image_size))
    ckpt_path = initial_checkpoint(cfg, progress=progress)
    seed_everything(cfg.seed)
    model, ckpt = load_initial_model(cfg, ckpt_path, benchmark.channels)
    finetuner(cfg, model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg))), mode="w")
    atomic_json(run_record(git_info(), kind="finetune", init=str(ckpt_path)), out / "run.json")
    benchmark.load(next(model.parameters()).device)
    ev = finetune_eval(cfg, model, benchmark, cfg.eval.split, cfg.eval.episodes,
                       progress=cfg.tracking.progress and progress)
    done = ckpt_path.parent / "init-done.json"
    seconds = json.loads(done.read_text())["train_seconds"] if done.is_file() else None
    summary = {"run_dir": str(out), "interrupted": None, "step": ckpt["step"], "train_seconds": seconds,
               "init": str(ckpt_path), "eval": ev}
    atomic_json(summary, finished)
    return summary


__all__ = ["initial_checkpoint", "init_key", "load_initial_model", "run_transfer"]
