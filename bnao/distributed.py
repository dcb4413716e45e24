"""Data-parallel runs on ``torch.distributed``, launched by ``torchrun`` (NCCL on GPUs, gloo on CPUs).

One process per GPU (or CPU worker), on one machine or several through
torchrun's rendezvous. bnao never starts processes itself: ``torchrun`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
and :func:`init_from_env` joins the group they describe. Without those
variables (a plain ``bnao search``) nothing here talks to other processes and
every helper is the identity, so a single-process run is unchanged.

How work is split (see the README section "Multi-GPU and multi-machine search"):

* Data-parallel steps (supernet, stand-alone training; :mod:`bnao.data_parallel`):
  every rank takes the *same* global batch from an identically seeded loader
  and keeps its own contiguous slice (``ShardedLoader``); the gradients are
  averaged in one flat ``all_reduce`` (``GradientSync``), so each rank applies
  the same update and the weights stay identical without ever being sent.
  Parameters whose gradient is None get zeros in the bucket, so a slot that
  the step's arch did not use can neither hang nor shift the reduction;
  afterwards they get None back, which keeps
  :class:`~bnao.supernet.optim.MaskedSGD`'s masked update exact.
* BatchNorm normalises with the statistics of each rank's own slice (as DDP
  without SyncBatchNorm); running statistics are averaged over the ranks
  (:func:`average_buffers`) before they are checkpointed or used.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import socket
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .device import resolve_device

#: Environment variables torchrun sets for every worker.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """Ranks disagree, a rank died or hung, or the launch is unusable."""


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands in the run.

    Attributes:
        rank: This process's rank (0 writes the run files).
        world_size: Processes in the run (1: no ``torch.distributed``).
        local_rank: Rank on this machine (picks the GPU).
        backend: ``"nccl"``, ``"gloo"`` or ``"none"`` (single process).
        hosts: Host names of the machines, in rank order, each once.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    hosts: Tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        """Whether several processes share the work."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints summaries."""
        return self.rank == 0

    def describe(self) -> str:
        """One line, e.g. ``2 processes (gloo) on host-a``."""
        if not self.enabled:
            return "1 process"
        return f"{self.world_size} processes ({self.backend}) on {', '.join(self.hosts)}"


_CURRENT = Context()


def current() -> Context:
    """The context set by :func:`init_from_env` (a single-process one before or without it)."""
    return _CURRENT


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank_device(device: Union[str, torch.device, None], context: Optional[Context] = None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when several processes run.

    Raises:
        DistributedError: Several processes were asked to share one explicit GPU (``cuda:N``), or this
            machine has fewer GPUs than processes.
    """
    context = context or current()
    resolved = resolve_device(device)
    if not context.enabled or resolved.type != "cuda":
        return resolved
    if resolved.index is not None:
        raise DistributedError(
            f"device {str(device)!r} names one GPU but {context.world_size} processes run; use device=cuda "
            "(or auto): each process takes the GPU of its LOCAL_RANK")
    count = torch.cuda.device_count()
    if context.local_rank >= count:
        raise DistributedError(
            f"local rank {context.local_rank} has no GPU: this machine has {count}; start at most {count} "
            "processes per machine (torchrun --nproc_per_node)")
    return torch.device("cuda", context.local_rank)


def init_from_env(device: Union[str, torch.device, None] = "auto", timeout_s: float = 1800.0) -> Context:
    """Joins the process group torchrun describes; a single-process context without torchrun.

    Args:
        device: The run's device setting (``auto``, ``cpu``, ``cuda``): CUDA runs use NCCL, CPU runs gloo.
        timeout_s: Seconds a collective may wait for the other ranks before it fails (a hung or lost rank).

    Returns:
        The context (also returned by :func:`current` from now on).

    Raises:
        DistributedError: The variables are inconsistent or the group cannot be joined.
    """
    global _CURRENT
    if not launched_by_torchrun():
        _CURRENT = Context()
        return _CURRENT
    rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    if world_size <= 1:
        _CURRENT = Context()
        return _CURRENT
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world_size}; start the run with torchrun")
    probe = Context(rank=rank, world_size=world_size, local_rank=local_rank, backend="?")
    target = rank_device(device, probe)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)  # NCCL's objects live on the current device
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        except (RuntimeError, ValueError) as err:
            raise DistributedError(
                f"rank {rank} could not join the process group ({backend}, MASTER_ADDR="
                f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {err}") from None
    names: List[Any] = [None] * world_size
    dist.all_gather_object(names, socket.gethostname())
    hosts = tuple(dict.fromkeys(str(n) for n in names))
    _CURRENT = Context(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, hosts=hosts)
    return _CURRENT


def shutdown() -> None:
    """Leaves the process group (no-op without one), once every rank has finished its collectives.

    The closing all-reduce makes sure no rank tears its gloo pairs down while another still waits on the
    last collective: a rank that left early made its peer abort at exit ("terminate called without an
    active exception", seen on a resumed run with nothing left to do). A rank that fails instead of
    reaching it ends the wait: torchrun stops the other ranks when one exits with an error (checked with a
    rank that raised 3 s in: its peer was stopped at once); only a rank alive but stuck holds them, for at
    most the group's timeout, as any collective would.
    """
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        context = current()
        if context.enabled:
            try:
                dist.all_reduce(torch.zeros(1, device=comm_device(context)))
            except RuntimeError:
                pass  # another rank is gone: nothing left to agree on, leave anyway
        dist.destroy_process_group()
        gc.collect()  # frees the last works (and their tensors) while the interpreter is still whole
    _CURRENT = Context()


def comm_device(context: Context) -> torch.device:
    """Where collective buffers live: the rank's GPU for NCCL, the host for gloo."""
    if context.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lost_rank_error(err: BaseException, what: str, context: Optional[Context] = None) -> DistributedError:
    """The error a rank raises when a collective fails: another rank died, hung or raised."""
    context = context or current()
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DistributedError(
        f"rank {context.rank} of {context.world_size} stopped during {what}: another rank died, hung or failed "
        f"({first}). The last checkpoint stays valid; once the cause is fixed, restart with torchrun and --resume")


def run_collective(what: str, call, *args, **kwargs):
    """Runs one collective, turning a backend failure into a :class:`DistributedError` that says what to do."""
    try:
        return call(*args, **kwargs)
    except DistributedError:
        raise
    except RuntimeError as err:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError, timeouts)
        raise lost_rank_error(err, what) from err


def barrier(what: str = "a barrier") -> None:
    """Waits for every rank (no-op in a single process)."""
    context = current()
    if context.enabled:
        # A tensor all_reduce rather than dist.barrier(): NCCL's barrier guesses the device.
        flag = torch.zeros(1, device=comm_device(context))
        run_collective(what, dist.all_reduce, flag)


def broadcast_object(obj: Any, what: str, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; identity in a single process)."""
    context = current()
    if not context.enabled:
        return obj
    box = [obj if context.rank == src else None]
    run_collective(what, dist.broadcast_object_list, box, src=src, device=comm_device(context))
    return box[0]


def gather_objects(obj: Any, what: str) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    context = current()
    if not context.enabled:
        return [obj]
    out: List[Any] = [None] * context.world_size
    run_collective(what, dist.all_gather_object, out, obj)
    return out


def any_rank(flag: bool, what: str) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    context = current()
    if not context.enabled:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=comm_device(context))
    run_collective(what, dist.all_reduce, value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def sum_across_ranks(values: Sequence[float], what: str) -> List[float]:
    """Element-wise sums over the ranks of a few host numbers (float64)."""
    context = current()
    if not context.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(context))
    run_collective(what, dist.all_reduce, tensor)
    return tensor.cpu().tolist()


@torch.no_grad()
def average_buffers(module: torch.nn.Module, what: str = "averaging BatchNorm running statistics") -> None:
    """Averages the floating-point buffers (BatchNorm running statistics) of ``module`` over the ranks.

    Each rank's running statistics follow its own slices of the batches; averaging them makes every rank hold
    the same model (so one checkpoint fits all) and uses the statistics of the whole global batch.
    """
    context = current()
    if not context.enabled:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(comm_device(context), torch.float64) for b in buffers])
    run_collective(what, dist.all_reduce, flat)
    flat /= context.world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset: offset + b.numel()].view_as(b).to(b.device, b.dtype))
        offset += b.numel()


def split_evenly(count: int, context: Optional[Context] = None) -> Tuple[int, int]:
    """``[start, stop)`` of this rank's share of ``count`` items (contiguous, sizes differ by at most one)."""
    context = context or current()
    base, extra = divmod(count, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return start, start + base + (1 if context.rank < extra else 0)


def launch_record(context: Optional[Context] = None) -> Dict[str, Any]:
    """How the run was launched, for the config and log: world size, backend and hosts."""
    context = context or current()
    return {"world_size": context.world_size, "backend": context.backend, "hosts": ",".join(context.hosts)}


__all__ = [
    "Context", "DistributedError", "any_rank", "comm_device", "run_collective", "average_buffers", "barrier",
    "broadcast_object", "current", "gather_objects", "init_from_env", "launch_record", "launched_by_torchrun",
    "lost_rank_error", "rank_device", "shutdown", "split_evenly", "sum_across_ranks",
]
