"""Transfer-learning baselines: supervised pre-training, then per-episode fine-tuning of selected
layers with a fresh head (full or LoRA), evaluated on the same fixed episodes as the meta-learners.

    pretrain(cfg)       metalearn/transfer/pretrain.py (`metalearn pretrain CONFIG`)
    run_transfer(cfg)   metalearn/transfer/run.py: initial weights (pretrain / maml / a checkpoint),
                        then fine-tuning evaluation (what `metalearn ablate` runs for outer.algorithm=finetune)
The fine-tuning itself is metalearn/algorithms/finetune.py: an evaluation-time adapter (`finetune` in the
registry, capabilities().meta_trained False), never meta-trained. Pre-training runs through meta-training's
loop (metalearn/train.py) with a supervised step.
"""
from .pretrain import finetune_eval, pretrain, summary_line
from .run import initial_checkpoint, load_initial_model, run_transfer

__all__ = ["finetune_eval", "initial_checkpoint", "load_initial_model", "pretrain", "run_transfer", "summary_line"]
