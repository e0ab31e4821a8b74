"""Data-parallel meta-training across processes, GPUs and machines with torch.distributed.

Launched by PyTorch's own launcher (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):

    torchrun --nproc_per_node 4 -m metalearn train CONFIG.yaml [key=value ...]
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             --rdzv-id RUN -m metalearn train CONFIG.yaml ...

What is split, and why the result does not depend on the number of processes W:

* The meta-batch. Every process holds the same episode sampler (same seed, same generator state) and
  draws the indices of the whole global meta-batch of T tasks (cheap), but assembles and adapts only
  its slice `shard(T)`: contiguous blocks, the first T mod W processes one task more. So the tasks
  are exactly the tasks of a one-process run, and the sampler state (saved by rank 0) is global.
* The meta-gradient. A process's meta_step accumulates the gradient of its mean query loss over
  its T_r tasks; `all_reduce_gradients` scales it by T_r / T and sums over processes, giving the
  gradient of the global mean for the model's trained parameters and the algorithm's learnables
  (Meta-SGD's alpha, MAML++'s lrs). Every process then takes the same optimiser step. The sum is
  the same quantity as in one process, added in another order: equal to rounding (tests check
  float64 parameters after several Adam steps to 1e-10 relative).
* Metrics (loss, accuracy/MSE) are weighted by T_r / T and summed; evaluation episodes are
  sharded in whole batches (`shard_batches`) and gathered in episode order, so the mean and CI are
  those of one process, bit for bit.

Backends: nccl with device cuda:LOCAL_RANK when the run's device is CUDA, gloo on CPU.

Only rank 0 prints, shows progress, writes the run folder (config, metrics.jsonl, checkpoints,
evaluation JSON) and logs to W&B. Decisions that could differ between processes (does the run
folder exist, is the checkpoint readable, did a signal arrive) are taken once and shared, so an
error is raised on every rank alike instead of leaving the others waiting in a collective.

Limits: an algorithm whose capabilities declare shardable=False is refused with more than one
process (reptile: it carries one inner-Adam state from task to task, OpenAI's code, so a task's
adaptation depends on every earlier task of the meta-batch), as is one that is not meta-trained
(meta_trained=False: the transfer baseline). MAML++'s per-step BatchNorm running statistics (used
only by inductive evaluation, eval.transductive=false) are momentum averages updated task by task; with several
processes each updates them on its own tasks and they are averaged across processes after every
step, which is close to, but not the same as, a one-process run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as tdist

from .algorithms import registry
from .errors import MetalearnError

T_ = TypeVar("T_")


@dataclass(frozen=True)
class Context:
    """This process's place in the job; the default is a single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: Optional[str] = None
    """cuda:LOCAL_RANK under nccl, else None (the run's device setting applies)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT = Context()


def context() -> Context:
    """The current process's Context (single process unless `init` joined a torchrun job)."""
    return _CONTEXT


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: str = "cpu") -> Context:
    """Join the torchrun job described by the environment (no-op for one process).

    device: the run's `device` setting: cpu -> gloo; cuda / cuda:N / auto with CUDA -> nccl on
    cuda:LOCAL_RANK (one GPU per process). Timeout of collectives: $METALEARN_DIST_TIMEOUT seconds
    (default 1800).
    """
    global _CONTEXT
    if not launched_by_torchrun():
        return _CONTEXT
    if _CONTEXT.enabled:
        return _CONTEXT
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dev = None
    if use_cuda:
        if not torch.cuda.is_available():
            raise MetalearnError(f"device={device} but CUDA is not available on this machine")
        if local >= torch.cuda.device_count():
            raise MetalearnError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s): "
                                 f"use --nproc_per_node <= {torch.cuda.device_count()}")
        dev = f"cuda:{local}"
        torch.cuda.set_device(dev)
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("METALEARN_DIST_TIMEOUT", 1800)))
    tdist.init_process_group(backend=backend, timeout=timeout)
    _CONTEXT = Context(rank, world, local, backend, dev)
    return _CONTEXT


def shutdown() -> None:
    """Leave the job (destroy the process group); safe to call when none was joined."""
    global _CONTEXT
    if _CONTEXT.enabled and tdist.is_initialized():
        try:  # no process tears its connections down while a peer may still be using them
            tdist.barrier()
        except Exception:  # a peer already failed: tear down anyway, the original error is what matters
            pass
        tdist.destroy_process_group()
    _CONTEXT = Context()


# --- who does what ------------------------------------------------------------------------------

def shard(n: int, ctx: Optional[Context] = None) -> Tuple[int, int]:
    """[lo, hi) of n items for this process: contiguous blocks, the first n mod W get one more."""
    ctx = ctx or _CONTEXT
    base, extra = divmod(n, ctx.world_size)
    lo = ctx.rank * base + min(ctx.rank, extra)
    return lo, lo + base + (1 if ctx.rank < extra else 0)


def shard_batches(count: int, batch_size: int, ctx: Optional[Context] = None) -> Tuple[int, int]:
    """[lo, hi) of `count` items, sharded in whole batches of `batch_size` (lo is a multiple of it),
    so each process's batches are exactly batches of the one-process enumeration."""
    ctx = ctx or _CONTEXT
    batches = -(-count // batch_size)
    b_lo, b_hi = shard(batches, ctx)
    return min(count, b_lo * batch_size), min(count, b_hi * batch_size)


def check_meta_batch(meta_batch_size: int, ctx: Optional[Context] = None) -> None:
    ctx = ctx or _CONTEXT
    if meta_batch_size < ctx.world_size:
        raise MetalearnError(f"outer.meta_batch_size={meta_batch_size} is smaller than the {ctx.world_size} "
                             f"processes: every process needs at least one task")


def check_algorithm(name: str, ctx: Optional[Context] = None) -> None:
    """Refuse what cannot be split across processes (see the module docstring): an algorithm that is not
    meta-trained, or whose declared capabilities say its meta-batch cannot be sharded."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return
    caps = registry.capabilities(name)
    if not caps.meta_trained:
        raise MetalearnError(f"outer.algorithm={name} is not meta-trained; run it with one process")
    if not caps.shardable:
        raise MetalearnError(f"outer.algorithm={name} cannot be split across processes: its tasks are not "
                             f"independent (state is carried from task to task, so every task depends on the "
                             f"earlier ones); run it with one process, or use one of "
                             f"{', '.join(registry.supporting('shardable'))}")


# --- collectives --------------------------------------------------------------------------------

def _buffer_device(ctx: Context) -> torch.device:
    return torch.device(ctx.device) if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_gradients(params: Sequence[torch.Tensor], weight: float, ctx: Optional[Context] = None) -> None:
    """p.grad <- sum over processes of weight_r * p.grad_r, for every p with a gradient (one flat
    all-reduce per dtype). Which parameters have a gradient is the same on every process (same
    code path, at least one task each)."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group]).mul_(weight)
        tdist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def reduce_metrics(metrics: Dict[str, float], weight: float, flags: Sequence[float] = (),
                   ctx: Optional[Context] = None) -> Tuple[Dict[str, float], List[float]]:
    """(sum over processes of weight_r * metrics_r, sum over processes of flags_r) in one all-reduce.
    flags: e.g. 1.0 where a stop signal arrived, so every process stops after the same step."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return dict(metrics), list(flags)
    keys = sorted(metrics)
    buf = torch.tensor([metrics[k] * weight for k in keys] + list(flags), dtype=torch.float64,
                       device=_buffer_device(ctx))
    tdist.all_reduce(buf)
    values = buf.tolist()
    return dict(zip(keys, values[:len(keys)])), values[len(keys):]


def average_buffers(module: torch.nn.Module, ctx: Optional[Context] = None) -> None:
    """Floating-point buffers (e.g. BatchNorm running statistics) <- their mean over processes."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            tdist.all_reduce(b)
            b.div_(ctx.world_size)


def broadcast_parameters(tensors: Sequence[torch.Tensor], ctx: Optional[Context] = None) -> None:
    """Copy rank 0's values into every process's tensors (in place)."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return
    with torch.no_grad():
        for t in tensors:
            tdist.broadcast(t.data, src=0)


def gather_cat(local: torch.Tensor, ctx: Optional[Context] = None) -> torch.Tensor:
    """Concatenate every process's 1-d CPU tensor in rank order (same result on every process)."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return local
    parts: List[Any] = [None] * ctx.world_size
    tdist.all_gather_object(parts, local.cpu())
    return torch.cat(parts)


def broadcast_object(obj: Any, ctx: Optional[Context] = None) -> Any:
    """Rank 0's `obj` on every process."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    tdist.broadcast_object_list(box, src=0, device=_buffer_device(ctx) if ctx.backend == "nccl" else None)
    return box[0]


def on_main(fn: Callable[[], T_], ctx: Optional[Context] = None) -> T_:
    """Run `fn` on rank 0 only and return its result on every process; a MetalearnError it raises
    is raised on every process (so none is left waiting in a collective)."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return fn()
    outcome: Any = None
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except MetalearnError as e:
            outcome = ("error", str(e))
    kind, value = broadcast_object(outcome, ctx)
    if kind == "error":
        raise MetalearnError(value)
    return value


def main_only(fn: Callable[[], T_], ctx: Optional[Context] = None) -> Optional[T_]:
    """Run `fn` on rank 0 only; its result there, None elsewhere. A MetalearnError it raises is
    raised on every process (the result itself is not sent: it may be unpicklable, e.g. a W&B run)."""
    ctx = ctx or _CONTEXT
    if not ctx.enabled:
        return fn()
    result: Any = None
    status: Optional[str] = None
    if ctx.is_main:
        try:
            result = fn()
        except MetalearnError as e:
            status = str(e)
    status = broadcast_object(status, ctx)
    if status is not None:
        raise MetalearnError(status)
    return result


def main_first(fn: Callable[[], T_], ctx: Optional[Context] = None) -> T_:
    """Run `fn` on rank 0, then (if it succeeded) on the other processes: e.g. rank 0 decodes and
    caches a data set, the others then read the cache. A MetalearnError on rank 0 is raised everywhere."""
    ctx = ctx or _CONTEXT
    result = main_only(fn, ctx)  # rank 0's outcome, shared
    return result if ctx.is_main else fn()


def barrier(ctx: Optional[Context] = None) -> None:
    ctx = ctx or _CONTEXT
    if ctx.enabled:
        tdist.barrier()
