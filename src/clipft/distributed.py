"""Multi-process training with PyTorch's own launcher (torchrun) and DistributedDataParallel.

`torchrun --nproc_per_node N -m clipft train ...` starts N copies of the same command and tells each
one who it is through environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). `setup()` reads them and joins the process group (nccl on CUDA, gloo on CPU); without
them (plain `clipft train`) every helper here degrades to the single-process answer, so the training
loop has one code path.

What lives here (this module imports nothing of clipft above config/runtime, so every stage may use it):
  setup / teardown / DistContext          process group and the device of this process
  get_rank, get_world_size, is_main, barrier
  all_gather_with_grad, all_gather_cat    variable-size gathers (with / without gradient)
  all_gather_ints, all_gather_objects, broadcast_buffers
  main_process_first                      rank 0 does a step first (text cache, weight download)
  shard_train_indices, micro_batches_per_epoch   the per-epoch data order, sharded by rank
  wrap_model, unwrap                      SyncBatchNorm + DDP, and back to the ImageTower
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .config import ConfigError

log = logging.getLogger(__name__)

# Rank 0 may build the text cache while the others wait in a collective: NCCL's default 10 minute
# timeout is too short for that on a large caption set (`clipft cache-text` beforehand avoids the wait).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
# Under nccl, a gloo group over the same processes for small host-side exchanges (batch sizes,
# flags): an nccl collective needs CUDA tensors and the host then waits for every kernel queued
# before it, i.e. one GPU sync per exchange; gloo swaps CPU ints without touching the GPU stream.
_HOST_GROUP: "dist.ProcessGroup | None" = None


class DistributedError(RuntimeError):
    """A multi-process run that cannot go on consistently (e.g. rank 0 failed, ranks disagree)."""


@dataclass(frozen=True)
class DistContext:
    """Who this process is. world_size 1 (no torchrun) is the ordinary single-process run."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # "nccl" | "gloo" | None (single process)
    created: bool  # setup() initialised the process group, so teardown() is its job

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# --------------------------------------------------------------------------- setup

def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def device_for_rank(name: str, local_rank: int) -> torch.device:
    """The device of one process in a multi-process run: cuda:LOCAL_RANK for 'auto'/'cuda' when CUDA
    is available, else the CPU. A fixed 'cuda:N' cannot be right for every process, so it is refused."""
    if name == "cpu":
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            if local_rank >= n:
                raise ConfigError(f"LOCAL_RANK={local_rank} but only {n} GPU(s) are visible: start at most "
                                  f"{n} processes per node (torchrun --nproc_per_node {n})")
            return torch.device("cuda", local_rank)
        if name == "cuda":
            raise ConfigError("device 'cuda': CUDA is not available on this machine; run on the CPU instead "
                              "(--device cpu; for train: --set train.device=cpu)")
        return torch.device("cpu")
    raise ConfigError(f"train.device={name!r}: under torchrun use auto, cuda or cpu "
                      "(each process takes the GPU cuda:LOCAL_RANK)")


def setup(device_name: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment variables, if any.

    WORLD_SIZE unset or 1: single process, device from `runtime.resolve_device(device_name)`.
    WORLD_SIZE > 1: init_process_group (nccl when this process gets a GPU, gloo on the CPU) unless a
    group is already initialised (tests, notebooks), and pin this process to cuda:LOCAL_RANK.
    Ranks other than 0 only log warnings and errors from here on (one readable log per job).
    """
    from .runtime import resolve_device

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        device = device_for_rank(device_name, local_rank) if world > 1 else resolve_device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        ctx = DistContext(rank, world, local_rank, device, dist.get_backend(), created=False)
    else:
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return DistContext(0, 1, 0, resolve_device(device_name), None, created=False)
        if "RANK" not in os.environ:
            raise ConfigError(f"WORLD_SIZE={world} is set but RANK is not: start multi-process runs with torchrun")
        if not dist.is_available():
            raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        device = device_for_rank(device_name, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before init: NCCL binds this process to its GPU
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        ctx = DistContext(rank, world, local_rank, device, backend, created=True)
    global _HOST_GROUP
    if ctx.backend == "nccl":  # collective: every rank runs setup, so every rank creates it, in order
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
    if not ctx.is_main:
        logging.getLogger("clipft").setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s), rank %d on %s", ctx.world_size, ctx.backend, ctx.rank, ctx.device)
    return ctx


def teardown(ctx: DistContext | None = None) -> None:
    """Leave the process group (only if `setup` created it, when ctx is given)."""
    global _HOST_GROUP
    if ctx is not None and not ctx.created:
        return
    _HOST_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # also destroys the host group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Rank in the process group; before/without one, torchrun's RANK (0 when absent)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0: the only process that logs and writes files."""
    return get_rank() == 0


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _host_group() -> tuple["dist.ProcessGroup | None", torch.device]:
    """(group, device) for exchanging host values: the gloo side group under nccl (no GPU sync),
    else the default group on its own device."""
    if _HOST_GROUP is not None and dist.get_backend() == "nccl":
        return _HOST_GROUP, torch.device("cpu")
    return None, _comm_device()


def barrier() -> None:
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# --------------------------------------------------------------------------- gathers

def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's list of ints, in rank order: [[rank 0 values], [rank 1 values], ...]."""
    if not is_distributed():
        return [list(values)]
    group, dev = _host_group()
    t = torch.tensor(values, dtype=torch.long, device=dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order (small things only: RNG states, flags)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _padded_all_gather(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """all_gather needs equal shapes: pad dim 0 to max(sizes), gather, cut each part back."""
    dev = _comm_device()
    padded = x.new_zeros((max(sizes), *x.shape[1:]), device=dev)
    padded[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:n].to(x.device) for p, n in zip(parts, sizes)]


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of x [n_r, ...]; n_r may differ between ranks.
    No gradient: for constants such as the cached text embeddings and for evaluation."""
    if not is_distributed():
        return x
    sizes = [s[0] for s in all_gather_ints([x.shape[0]])]
    with torch.no_grad():
        return torch.cat(_padded_all_gather(x.detach(), sizes))


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: x [n_r, D] -> cat over ranks [sum n, D]. Backward: every rank's loss depends on every
    rank's rows, so the gradient of MY rows is the SUM over ranks of their gradients w.r.t. them: an
    all-reduce of the incoming gradient, then my slice. (torch.distributed.nn's all_gather needs equal
    sizes and reduce_scatter/all_to_all support; an all_reduce of [sum n, D] costs a few MB at most.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat(_padded_all_gather(x, sizes))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g = grad.contiguous().to(_comm_device(), copy=True)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return g[start: start + ctx.sizes[ctx.rank]].to(grad.device), None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenation over ranks of x [n_r, D] that back-propagates into this rank's x.
    `sizes` (every rank's n_r) saves one small collective when the caller already has them."""
    if not is_distributed():
        return x
    if sizes is None:
        sizes = [s[0] for s in all_gather_ints([x.shape[0]])]
    return _AllGatherWithGrad.apply(x, sizes)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. Without SyncBatchNorm each
    rank updates them from its own batches; evaluation and the checkpoint must use one set."""
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


@contextlib.contextmanager
def main_process_first(what: str = "this step") -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds the text cache or downloads weights); the others wait,
    then run it too (and find the cache built). If rank 0 fails, the others stop with a
    DistributedError instead of waiting forever."""
    if not is_distributed():
        yield
        return
    if is_main():
        try:
            yield
        except BaseException as e:
            dist.broadcast_object_list([f"{e.__class__.__name__}: {e}"], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
    else:
        msg: list[Any] = [None]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise DistributedError(f"rank 0 failed during {what} ({msg[0]}); stopping rank {get_rank()} too")
        yield


# --------------------------------------------------------------------------- data order

def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global shuffle of n items for one epoch: a function of (seed, epoch) only, identical on
    every rank and for any number of ranks (the same order the single-process run has always used)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def micro_batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Loader batches per rank and epoch: full global batches of batch_size x world_size (the
    incomplete last one is dropped), or one smaller batch when n does not fill a single one."""
    g = batch_size * world_size
    return n // g if n > g else 1


def shard_train_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                        world_size: int = 1, order: torch.Tensor | None = None) -> list[int]:
    """This rank's item indices for one epoch, in loader order (consecutive runs of batch_size).

    Global batch k is order[k*G:(k+1)*G] (G = batch_size * world_size) and rank r takes its r-th
    contiguous slice, so step k of an N-process run sees exactly the images (and, with the caption
    choice a function of (seed, epoch, image), the captions) of step k of a single-process run with
    batch G, in the same order once gathered. Every rank gets the same number of batches.
    n <= G: the one global batch is split into near-equal contiguous parts.
    order: the epoch's permutation [n] when the dataset has its own (webdataset shards: a function
    of (seed, epoch) too); default `epoch_order`.
    """
    order = epoch_order(n, seed, epoch) if order is None else order
    g = batch_size * world_size
    if n <= g:
        return order[rank * n // world_size:(rank + 1) * n // world_size].tolist()
    steps = n // g
    per_step = order[: steps * g].view(steps, world_size, batch_size)  # [steps, ranks, B]
    return per_step[:, rank].reshape(-1).tolist()


# --------------------------------------------------------------------------- models

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside torch.compile's wrapper and/or DistributedDataParallel (or the model itself)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_model(model: torch.nn.Module, ctx: DistContext, sync_batchnorm: bool = False,
               find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP around `model` for a multi-process run (the model itself otherwise).

    sync_batchnorm: BatchNorm layers become SyncBatchNorm, whose batch statistics are computed over the
    global batch (all ranks) instead of each rank's B images; needs CUDA. Convert BEFORE creating the
    optimizer: `convert_to_sync_batchnorm` is the step that does that, this only wraps.
    """
    if not ctx.distributed:
        return model
    # DDP broadcasts rank 0's parameters and buffers here, so every rank starts identical.
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


def convert_to_sync_batchnorm(model: torch.nn.Module, ctx: DistContext, enabled: bool) -> torch.nn.Module:
    """BatchNorm -> SyncBatchNorm when enabled and running on several processes (a no-op alone).
    The state dict keys are unchanged, so checkpoints load into a plain ImageTower."""
    if not enabled:
        return model
    if not ctx.distributed:
        log.info("train.sync_batchnorm has no effect in a single process")
        return model
    if ctx.device.type != "cuda":
        raise ConfigError("train.sync_batchnorm=true needs CUDA (torch's SyncBatchNorm has no CPU "
                          "implementation); set it to false for CPU runs")
    if getattr(model, "is_timm", False):
        # timm's converter keeps the activation of its fused BatchNormAct2d layers (torch's would drop it)
        from timm.layers import convert_sync_batchnorm
        return convert_sync_batchnorm(model)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
