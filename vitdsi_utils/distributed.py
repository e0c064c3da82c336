"""Data parallelism over ``torch.distributed``, as ``torchrun`` launches it; one process makes every call a no-op.

``torchrun --nproc_per_node=P`` starts P copies of a command and tells each, through the
environment, how many there are (``WORLD_SIZE``), which one it is (``RANK``) and which device of
its machine is its own (``LOCAL_RANK``). :func:`init_distributed` joins them into a process group
(NCCL between GPUs, Gloo between CPU processes) and returns the process's device. From then on
the library runs *SPMD*: every process makes the same calls in the same order, and the functions
here split the work and put the results back together:

* :func:`shard_slice` / :func:`shard_range`: this process's share of a batch or of a list of
  queries (contiguous, in rank order);
* :func:`gather_rows`: every process's rows, concatenated in rank order, on every process;
  :func:`all_reduce_sum`: a sum over the processes;
* :func:`broadcast_object`, :func:`on_main`, :func:`main_first`, :func:`barrier`: rank 0 decides,
  writes or goes first, and the others wait for it;
* :func:`data_parallel`: the model wrapped in ``DistributedDataParallel`` (gradients averaged).

Without a process group (one process, or torchrun with one process) every function returns at
once with the single-process answer (the whole range, the tensor itself, ``fn()``), so nothing a
one-process run computes changes. The design is in ``docs/distributed.md``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

_T = TypeVar("_T")

#: The launcher's environment variables (torchrun sets them; so do ``mpirun`` wrappers that mimic it).
WORLD_SIZE_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"


# ------------------------------------------------------------------------------------------
# Who am I
# ------------------------------------------------------------------------------------------
def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get(WORLD_SIZE_ENV, "1"))


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 without a launcher): the GPU it uses."""
    return int(os.environ.get(LOCAL_RANK_ENV, "0"))


def active() -> bool:
    """Whether a process group of more than one process is up (so work is shared)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this is rank 0: the process that writes files and shows progress."""
    return rank() == 0


def init_distributed(device: str | torch.device = "auto") -> torch.device:
    """Join torchrun's process group when it started more than one process; return this process's device.

    ``device="auto"``: under torchrun with GPUs, ``cuda:LOCAL_RANK`` (one GPU per process, made
    the current device so that ``"cuda"`` means it); otherwise ``cuda`` when there is a GPU, else
    ``cpu``. The group's backend is NCCL for a CUDA device and Gloo for the CPU. With
    ``WORLD_SIZE`` unset or 1 no group is made and nothing changes. Calling it again is harmless.
    """
    world = launched_world_size()
    if str(device) == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank()) if world > 1 else torch.device("cuda")
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if world > 1 and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank())
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"process {local_rank()} of this machine wants {device}, but only {torch.cuda.device_count()} "
                "GPU(s) are visible: start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def close_distributed() -> None:
    """Leave the process group (if one was made), so the process exits without the launcher's warnings."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def warn_if_ungrouped() -> None:
    """Warn when torchrun started several processes but none joined a group: each would train alone."""
    if launched_world_size() > 1 and not active():
        warnings.warn(
            f"{WORLD_SIZE_ENV}={launched_world_size()} but no process group is initialised: every process "
            "trains the whole model alone. Call vitdsi_utils.distributed.init_distributed() first",
            RuntimeWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------
# Sharing out work
# ------------------------------------------------------------------------------------------
def shard_slice(n: int, *, for_rank: int | None = None, world: int | None = None) -> slice:
    """This process's contiguous part of ``n`` items (a global batch): sizes differ by at most one.

    Rank r gets ``[n*r // P, n*(r+1) // P)`` for P processes; concatenated in rank order the
    parts are the whole batch. One process gets ``slice(0, n)``.
    """
    r = rank() if for_rank is None else for_rank
    p = world_size() if world is None else world
    return slice(n * r // p, n * (r + 1) // p)


def shard_range(n: int, block: int = 1, *, for_rank: int | None = None, world: int | None = None) -> range:
    """This process's items of ``n`` cut into blocks of ``block`` items, whole blocks only.

    The ``n // block`` full blocks are shared out in rank order (as evenly as whole blocks allow);
    the partial block at the end, if any, goes with the last full block (to the same process,
    in the same call), and when there is no full block rank 0 takes everything. So a process
    that processes its range ``block`` items at a time meets exactly the batches one process
    would (same sizes, same contents), and its results are bit for bit those of one process.
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    r = rank() if for_rank is None else for_rank
    p = world_size() if world is None else world
    full = n // block
    if full == 0:
        return range(0, n) if r == 0 else range(n, n)
    first, last = full * r // p, full * (r + 1) // p
    return range(first * block, n if last == full else last * block)


# ------------------------------------------------------------------------------------------
# Collectives (each a no-op without a group)
# ------------------------------------------------------------------------------------------
def _comm_device() -> torch.device:
    """Where tensors must be for the group's backend: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here."""
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the processes, on ``tensor``'s device (``tensor`` itself alone).

    ``tensor`` is not changed. The sum is computed once and sent to every process, so every
    process holds the same bits.
    """
    if not active():
        return tensor
    work = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def min_over_ranks(value: int) -> int:
    """The smallest of every process's ``value`` (e.g. a batch size each sized by its own free memory)."""
    if not active():
        return value
    work = torch.tensor([int(value)], dtype=torch.long, device=_comm_device())
    dist.all_reduce(work, op=dist.ReduceOp.MIN)
    return int(work.item())


def gather_rows(tensor: torch.Tensor, *, live: bool = False) -> torch.Tensor:
    """Every process's ``tensor`` (rows along dim 0, counts may differ) concatenated in rank order.

    The result is on ``tensor``'s device and the same on every process. The other processes'
    rows arrive without autograd history; with ``live=True`` this process's own block is
    ``tensor`` itself, so a loss over the gathered rows sends gradients into the local rows
    (and, averaged by ``DistributedDataParallel``, into the model as if one process had
    computed the loss over all rows: see ``docs/distributed.md``).
    """
    if not active():
        return tensor
    comm, world = _comm_device(), world_size()
    local = tensor.detach().to(comm).contiguous()
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=comm)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    biggest = max(sizes)
    if biggest == 0:
        return tensor
    if local.shape[0] < biggest:  # all_gather needs equal shapes: pad, then cut the padding off
        local = torch.cat([local, local.new_zeros(biggest - local.shape[0], *local.shape[1:])])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    rows = [part[:size].to(tensor.device) for part, size in zip(parts, sizes)]
    if live:
        rows[rank()] = tensor
    return torch.cat(rows)


def gather_array(array: np.ndarray) -> np.ndarray:
    """:func:`gather_rows` for a NumPy array (rows along axis 0), through a CPU tensor."""
    if not active():
        return array
    return gather_rows(torch.from_numpy(np.ascontiguousarray(array))).numpy()


def broadcast_object(obj: _T) -> _T:
    """Rank 0's ``obj`` (any picklable value) on every process; what the others pass is ignored."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_inside_on_main = False  # rank 0 is running an on_main section: nested sections run directly


def on_main(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run ``fn(*args, **kwargs)`` on rank 0 only (e.g. write a file); every process returns its result.

    The other processes wait until rank 0 is done, so a file rank 0 writes exists for all of
    them afterwards. If ``fn`` raises, rank 0 raises the error and the others raise a
    RuntimeError naming it. Sections nest: an ``on_main`` inside one runs directly on rank 0.
    """
    global _inside_on_main
    if not active() or _inside_on_main:
        return fn(*args, **kwargs)
    if is_main():
        _inside_on_main = True
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:
            broadcast_object((False, f"{type(error).__name__}: {error}"))
            raise
        finally:
            _inside_on_main = False
        return broadcast_object((True, result))[1]
    ok, payload = broadcast_object((True, None))
    if not ok:
        raise RuntimeError(f"rank 0 failed, so this process stops too: {payload}")
    return payload


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the ``with`` block first (e.g. decodes images into a cache), then the others run it."""
    if not active():
        yield
        return
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` under a group (``model`` itself alone).

    The wrapper shares ``model``'s parameters, averages their gradients over the processes in
    ``backward`` and leaves buffers alone (the toolkit's are constants: normalisation and
    sinusoidal tables), so forward passes that only some processes run (evaluation) need no
    collective.
    """
    if not active():
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, **_NO_BUFFER_SYNC
    )


# No buffer broadcast before each forward pass: torch >= 2.14 names it forward_sync_buffers, older ones broadcast_buffers.
_DDP_ARGUMENTS = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
_NO_BUFFER_SYNC = {"forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGUMENTS else "broadcast_buffers": False}


def epoch_seed(seed: int, epoch: int, for_rank: int | None = None) -> int:
    """A seed for torch's global RNG (dropout) of epoch ``epoch`` (0-based) on rank ``for_rank``.

    Derived from ``(seed, epoch, rank)`` alone, so a run resumed at any epoch, with any number of
    processes, draws the same dropout masks per rank as an uninterrupted run of that many.
    """
    r = rank() if for_rank is None else for_rank
    return int(np.random.SeedSequence([int(seed), int(epoch), int(r)]).generate_state(1, np.uint64)[0])
