"""Several processes (``torchrun``): data sharding, all-reduced sums, rank 0 decides and writes.

Every stage that passes over data runs the same code in one process and under
``torchrun --nproc_per_node N`` (one or several nodes):

- `init` joins the process group that torchrun's environment describes
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
  when ``WORLD_SIZE > 1``: nccl when CUDA is available (process ``LOCAL_RANK``
  uses GPU ``LOCAL_RANK``), gloo on CPU. With one process nothing is
  initialised and every helper below is the identity (or runs its function
  directly), so the plain path is the same code.
- Data passes shard *batches*, not examples (`shard`): every rank builds the
  same batch list and takes every N-th batch, so each batch is computed exactly
  as in one process. Additive statistics are float64 sums plus counts,
  all-reduced (`all_reduce_sum`, the ``reduce`` callables that
  `collect_signatures` and `gate_gradients` accept); only the order of the
  float64 additions differs from one process (~1e-16 relative).
- Predictions are gathered (`all_gather_object` of (index, logits)), so every
  rank holds the full prediction vector and takes the same decisions (best
  epoch, curve, knee). Selections are additionally broadcast from rank 0.
- Rank 0 reads caches, writes files and logs (`on_main`, `is_main`); the other
  ranks never touch the output folder and log warnings only. Models are made
  identical across ranks by broadcasting rank 0's weights (`sync_module`), so
  only rank 0 needs the output folder (no shared file system is assumed; every
  node needs the model and the task data).

Functions that shard are collective: under torchrun every rank must call them,
in the same order. To run one of them on a single rank over all the data, wrap
the call in ``with local():``.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "device",
    "init",
    "is_active",
    "is_main",
    "local",
    "local_rank",
    "on_main",
    "pad_batches",
    "rank",
    "shard",
    "show_progress",
    "shutdown",
    "sync_module",
    "unshard",
    "world_size",
    "wrap_ddp",
]

_local_depth = 0  # > 0 inside `local()`: collectives are switched off


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(backend: str | None = None, timeout_s: float | None = None) -> torch.device:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (idempotent); return this process's device.

    Args:
        backend: "gloo" or "nccl"; default nccl when CUDA is available, else gloo.
        timeout_s: collective timeout (torch's default when None).

    Non-main ranks get their ``cahp`` logger set to WARNING.
    """
    if _env_int("WORLD_SIZE", 1) > 1 and not _initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        use_cuda = torch.cuda.is_available()
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if use_cuda:
            torch.cuda.set_device(local_rank())
            if backend == "nccl":
                kwargs["device_id"] = torch.device("cuda", local_rank())
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
        if not is_main():
            logging.getLogger("cahp").setLevel(logging.WARNING)
        log.info("process group: %d processes (%s), this is rank %d", world_size(), backend, rank())
    return device()


def shutdown() -> None:
    """Leave the process group (after a final barrier); no-op without one."""
    if _initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_active() -> bool:
    """True when collectives are in use: several processes, outside `local()`."""
    return _local_depth == 0 and _initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if _initialized() else 1


def local_rank() -> int:
    """Rank within this node (torchrun's ``LOCAL_RANK``; 0 without it)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Whether this process writes outputs and logs (global rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def show_progress(progress: bool) -> bool:
    """Progress bars only on rank 0."""
    return bool(progress) and is_main()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside this block sharding and collectives are off: this rank works alone, on all the data.

    Rank and `is_main` keep their real values.
    """
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- sharding --------------------------------------------------------------------------------------------


def shard(items: Iterable[T]) -> list[T] | Iterator[T]:
    """This rank's share of ``items``: items ``rank, rank + N, rank + 2N, ...`` (round robin).

    Deterministic; every item goes to exactly one rank. A sequence gives a list,
    any other iterable a lazy iterator. With one process (or inside `local()`),
    ``items`` itself.
    """
    if not is_active():
        return items
    r, n = rank(), world_size()
    if isinstance(items, Sequence):
        return list(items[r::n])
    return itertools.islice(items, r, None, n)


def unshard(local_items: Sequence[T]) -> list[T]:
    """Inverse of `shard` for per-item results: every rank's results, back in the original order.

    ``local_items`` are this rank's results for ``shard(items)``, in that order;
    the full list is returned on every rank (``list(local_items)`` with one process).
    """
    parts = all_gather_object(list(local_items))
    n = len(parts)
    total = sum(len(p) for p in parts)
    return [parts[i % n][i // n] for i in range(total)]


def pad_batches(batches: Sequence[T]) -> list[T]:
    """Repeat batches from the start (cyclically) up to a multiple of the world size.

    Training uses it so that every rank takes the same number of steps.
    """
    batches = list(batches)
    n = world_size() if is_active() else 1
    if not batches or len(batches) % n == 0:
        return batches
    total = -(-len(batches) // n) * n
    return [batches[i % len(batches)] for i in range(total)]


# --- collectives -----------------------------------------------------------------------------------------


def all_reduce_sum(tensor: torch.Tensor, count: int | float) -> tuple[torch.Tensor, int | float]:
    """Sum ``tensor`` and ``count`` over all ranks (one float64 all-reduce).

    Matches the ``reduce`` argument of `collect_signatures` and `gate_gradients`.
    Returns a new tensor with the dtype and device of ``tensor``; ``count`` keeps
    its type (exact for integers below 2**53). The identity with one process.
    """
    if not is_active():
        return tensor, count
    flat = torch.cat(
        [tensor.detach().reshape(-1).to(torch.float64).cpu(), torch.tensor([float(count)], dtype=torch.float64)]
    ).to(_comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    out = flat[:-1].reshape(tensor.shape).to(dtype=tensor.dtype, device=tensor.device)
    total = flat[-1].item()
    return out, (int(round(total)) if isinstance(count, int) else total)


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if is_active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; ``obj`` itself with one process)."""
    if not is_active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` with one process)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and return its result on every rank.

    An exception raised by ``fn`` on rank 0 is raised on every rank (a copy on
    the others), so no rank waits forever for one that failed. ``fn`` must not
    use collectives (it runs on rank 0 alone). With one process, simply
    ``fn(*args, **kwargs)``.
    """
    if not is_active():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    sent = (result, error)
    if is_main():
        try:
            pickle.dumps(sent)
        except Exception:  # noqa: BLE001
            sent = (None, RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")) if error else sent
    received = broadcast_object(sent)
    if error is not None:
        raise error
    if received[1] is not None:
        raise received[1]
    return received[0]


# --- models ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sync_module(model: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``model`` on every rank (in place).

    Every rank must hold the same architecture (same kept heads). No-op with one process.
    """
    if is_active():
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.numel() == 0:
                continue
            buf = t.data.to(_comm_device()).contiguous()
            dist.broadcast(buf, src=src)
            if buf.data_ptr() != t.data.data_ptr():
                t.data.copy_(buf)
    return model


def wrap_ddp(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when several processes run, else ``model`` itself.

    The wrapper shares ``model``'s parameters, so training through it trains
    ``model``; rank 0's weights are broadcast when it is built. Pruned models,
    empty layers included (`ResidualOnlyAttention` uses its bias and LayerNorm),
    use every parameter in the forward pass, so ``find_unused_parameters`` stays off.
    """
    if not is_active():
        return model
    dev = next(model.parameters()).device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
