"""Supernet training steps on device data only, captured once as CUDA graphs and replayed.

On the fused path the launches of a step do not depend on the arch (``csrc/cell/DESIGN.md``), so a step
can be captured once and replayed for every arch when everything it reads of the arch is device data:

* :class:`PoolTables` holds, per arch of the pool, what :class:`~bnao.supernet.fused_forward.FusedArchData`
  holds for one (branch codes, gather indices, slot-BN rows, loose-end masks) and the 0/1 values of the
  slots it trains (:meth:`~bnao.supernet.Supernet.touched_values`); a step selects its arch's rows by index.
* :class:`GraphStep` runs a step as two parts. Part A: select the arch's rows, forward, loss and backward.
  Part B: gradient clipping, the used-slot (and ever-used) masks, and the masked SGD update with the learning
  rate as a device tensor. Per step the host writes the arch index (drawn from the alias table, whose draws
  run on the device in blocks), the drop-path progress and the learning rate into one pinned buffer and
  copies it and the batch into the static inputs, replays A, reads the loss's finiteness (the only
  synchronisation), and replays B unless the loss was not finite: the trainer's skip of such steps, exact.

On CUDA both parts are captured with :class:`torch.cuda.CUDAGraph`; where capture fails the same parts run
uncaptured (``mode`` says which and why). On a CPU they always run uncaptured, so CI checks the
arithmetic: :func:`tests.test_graph_step` compares these steps with the trainer's own, bit for bit.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..autocast import bf16_autocast
from ..cuda_graphs import capture_blocker, capture_graphs
from .fused_forward import FusedArchData, arch_lists, cells_choice
from ..device import to_device
from .loss import supernet_loss
from .optim import masked_sgd_update

log = logging.getLogger(__name__)

#: Slots of the pinned per-step scalars: arch index, drop-path progress, learning rate.
_INDEX, _PROGRESS, _LR = range(3)


class PoolTables:
    """Per-arch device data of a pool, one row per arch (``[P, ...]`` tensors).

    Args:
        net: The :class:`~bnao.supernet.Supernet`.
        pool: ``[P, L]`` archs.
        device: Where the tables live.
        dtype: Float dtype of the loose-end and slot masks (the parameters').
    """

    def __init__(self, net, pool: np.ndarray, device: torch.device, dtype: torch.dtype, touched: bool = True):
        archs = [tuple(row) for row in np.asarray(pool).tolist()]
        lists = [arch_lists(net, arch) for arch in archs]
        self.layout = lists[0]  # spans are the same for every arch
        self.packed = to_device([item.ints for item in lists], torch.int64, device)
        self.codes = to_device([item.codes for item in lists], torch.int32, device)
        self.loose = to_device([item.loose for item in lists], dtype, device)
        # The slots each arch trains: for training steps only (evaluation updates nothing).
        self.touched = to_device([net.touched_values(arch) for arch in archs], dtype, device) if touched else None
        self.dtype = dtype

    def __len__(self) -> int:
        return self.packed.shape[0]

    def select(self, index: torch.Tensor) -> Tuple[FusedArchData, torch.Tensor]:
        """The arch at ``index`` (int64 ``[1]`` on the device): its data and its touched values (4 gathers)."""
        packed = self.packed.index_select(0, index)[0]
        codes = self.codes.index_select(0, index)[0]
        loose = self.loose.index_select(0, index)[0]
        touched = self.touched.index_select(0, index)[0] if self.touched is not None else None
        return FusedArchData(packed, codes, self.layout, {self.dtype: loose}), touched


def pool_tables(net, pool: np.ndarray, device: torch.device, dtype: torch.dtype, touched: bool) -> PoolTables:
    """:class:`PoolTables` of ``pool``, cached on ``net`` for the last two pools (training and evaluation of one
    search iteration share them; building them costs about a millisecond of host time per arch)."""
    pool = np.ascontiguousarray(np.asarray(pool, dtype=np.int64))
    key = (pool.shape, hash(pool.tobytes()), str(device), dtype, touched)
    cache = net.__dict__.setdefault("_pool_tables", {})
    # Tables with the slot values serve an evaluation too (the training pool is the one scored next).
    tables = cache.get(key) or (cache.get(key[:-1] + (True,)) if not touched else None)
    if tables is None:
        tables = PoolTables(net, pool, device, dtype, touched)
        while len(cache) >= 2:
            cache.pop(next(iter(cache)))
        cache[key] = tables
    return tables


def graph_unsupported(trainer) -> Optional[str]:
    """Why ``trainer``'s steps cannot run as :class:`GraphStep` (None when they can)."""
    if trainer.data_parallel is not None:
        return "data-parallel training (the gradient all-reduce runs between backward and update)"
    if trainer.channels_last:
        return "channels-last (the fused cells take NCHW)"
    return _fused_unavailable(trainer.model, trainer.bf16)


def _fused_unavailable(model, bf16: bool) -> Optional[str]:
    """Why ``model``'s training forward would not take the fused cells on its parameters' device (None: it would)."""
    parameter = next(model.parameters())
    use, why = cells_choice(model, parameter.device, True, torch.bfloat16 if bf16 else parameter.dtype)
    return None if use else f"the fused cells are not used: {why}"


class GraphStep:
    """A trainer's step as two replayable parts (module docstring).

    Args:
        trainer: The :class:`~bnao.supernet.trainer.SupernetTrainer` whose model, optimizer, masks and
            schedule this runs; its ``ever_used`` masks are taken over (and kept current).
        capture: Capture CUDA graphs (CUDA only; False, or a CPU: run the same parts uncaptured).
    """

    def __init__(self, trainer, capture: bool = True):
        why = graph_unsupported(trainer)
        if why is not None:
            raise ValueError(f"the step cannot run on device data only: {why}")
        self.trainer = trainer
        model = trainer.model
        # The parameters' device has an index ("cuda:0" where the trainer may say "cuda"): the model keys its
        # drop-path generators by the activations' device, and the graph must register that generator.
        self.device = trainer.params[0].device
        self.dtype = next(model.parameters()).dtype
        self.tables = pool_tables(model, trainer.pool, self.device, self.dtype, touched=True)
        cuda = self.device.type == "cuda"
        self.scalars_host = torch.zeros(3, dtype=torch.float64, pin_memory=cuda)
        self.scalars = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.flag_host = torch.zeros(1, dtype=torch.bool, pin_memory=cuda)
        self.images: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.loss: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self._finite: Optional[torch.Tensor] = None
        self._touched: Optional[torch.Tensor] = None
        # Per parameter (trainer.params order) its group of the slot masks, None for fully trained parameters.
        layout = {id(p): entry for entry in model.touched_layout() for p in entry.params}
        self._entries = [layout.get(id(param)) for param in trainer.params]
        self._ever = self._ever_tensors()
        self._graphs: Optional[Tuple[Any, Any]] = None
        self.mode = "uncaptured"
        self.reason = capture_blocker(capture, self.device) or "not captured yet"
        self._capture = capture_blocker(capture, self.device) is None

    # ------------------------------------------------------------------ state
    def _ever_tensors(self) -> List[Optional[torch.Tensor]]:
        """The trainer's ever-used masks as tensors (0/1), for the partial parameters; None for the others."""
        trainer = self.trainer
        out: List[Optional[torch.Tensor]] = []
        for i, (param, entry) in enumerate(zip(trainer.params, self._entries)):
            if entry is None:
                out.append(None)
                continue
            shape = entry.mask_shape(param)
            ever = trainer.ever_used[i]
            if ever is None or ever is False:
                value = torch.zeros(shape, dtype=self.dtype, device=self.device)
            elif ever is True:
                value = torch.ones(shape, dtype=self.dtype, device=self.device)
            else:
                value = ever.to(self.dtype).reshape(shape).clone()
            trainer.ever_used[i] = value  # the trainer's checkpoints see the masks this step keeps current
            out.append(value)
        return out

    # ------------------------------------------------------------------ parts
    def _part_a(self) -> None:
        """Select the arch's rows, forward, loss, backward (gradients into the parameters' ``.grad``)."""
        trainer, model = self.trainer, self.trainer.model
        with record_function("bnao::forward"):
            index = self.scalars[_INDEX : _INDEX + 1].long()
            progress = self.scalars[_PROGRESS].to(model._drop_depth.dtype)
            data, touched = self.tables.select(index)
            with bf16_autocast(self.device, trainer.bf16, capturable=True):
                out = model.forward_data(self.images, data, progress)
            loss, logits = supernet_loss(out, self.labels, trainer.aux_weight, trainer.label_smoothing)
        with record_function("bnao::backward"):
            loss.backward()
        self.loss, self.logits, self._touched = loss.detach(), logits.detach(), touched
        self._finite = torch.isfinite(self.loss).view(1)

    @torch.no_grad()
    def _part_b(self) -> None:
        """Clipping, masks, ever-used masks and the masked SGD update (lr from the device scalars)."""
        with record_function("bnao::optimizer"):
            self._update()

    def _update(self) -> None:
        trainer = self.trainer
        if trainer.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainer.params, trainer.grad_clip, foreach=True)
        full: Tuple[list, list, list] = ([], [], [])
        part: Tuple[list, list, list, list] = ([], [], [], [])
        grow: Tuple[list, list] = ([], [])
        optimizer = trainer.optimizer
        for i, (param, entry) in enumerate(zip(trainer.params, self._entries)):
            buffer = optimizer.state[param]["momentum_buffer"]
            if entry is None:
                full[0].append(param)
                full[1].append(param.grad)
                full[2].append(buffer)
                continue
            used = entry.view(self._touched, param)
            mask = used
            if trainer.unused_slot_update == "decay":
                grow[0].append(self._ever[i])
                grow[1].append(used)
                mask = self._ever[i]
            for group, value in zip(part, (param, param.grad, buffer, mask)):
                group.append(value)
        if grow[0]:
            torch._foreach_maximum_(grow[0], grow[1])
        group = optimizer.param_groups[0]
        lr = self.scalars[_LR].to(self.dtype)
        masked_sgd_update(*full, None, lr, group["momentum"], group["weight_decay"])
        masked_sgd_update(*part, lr, group["momentum"], group["weight_decay"])

    # ------------------------------------------------------------------ running
    def _prepare(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Static inputs and momentum buffers; a first uncaptured step's backward allocates every ``.grad``."""
        self.images = torch.empty_like(images, memory_format=torch.contiguous_format)
        self.labels = torch.empty_like(labels)
        optimizer = self.trainer.optimizer
        for param in self.trainer.params:
            state = optimizer.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _try_capture(self) -> None:
        """Captures parts A and B (after a first, uncaptured step: the warm-up); on failure, stays uncaptured."""
        self._capture = False
        for param in self.trainer.params:
            param.grad = None  # the captured backward allocates the gradients in the graph's pool
        model = self.trainer.model
        generator = model.generator(self.device)
        state = generator.get_state()
        graphs, error = capture_graphs((self._part_a, self._part_b), self.device, generator)
        if error is None:
            self._graphs = (graphs[0], graphs[1])
            self.mode, self.reason = "graph", "captured"
            return
        # The offsets a failed capture may have reserved are given back, on a generator out of capture mode.
        model.renew_generator(self.device, state)
        self._graphs = None
        self.mode, self.reason = "uncaptured", f"capture failed: {error}"
        log.warning("CUDA graph capture of the supernet step failed (%s); running it uncaptured", self.reason)

    def run(self, images: torch.Tensor, labels: torch.Tensor, index: int, progress: float, lr: float) -> bool:
        """One step of arch ``index`` of the pool on a batch; returns whether the loss was finite (and applied).

        The first step runs uncaptured (the warm-up); the second captures both parts, then every step replays
        them. The loss and logits of the step are left in :attr:`loss` and :attr:`logits` (static tensors,
        overwritten by the next step).

        Raises:
            ValueError: A batch of another shape than the first (graph steps need one shape: ``drop_last``).
        """
        if self.images is None:
            self._prepare(images, labels)
        elif images.shape != self.images.shape or labels.shape != self.labels.shape:
            raise ValueError(f"graph steps take batches of one shape: got {tuple(images.shape)} after "
                             f"{tuple(self.images.shape)}; use a loader with drop_last=True, or graph='off'")
        elif self._capture:
            self._try_capture()  # before this step's inputs: capture records kernels without running them
        self.scalars_host[_INDEX], self.scalars_host[_PROGRESS], self.scalars_host[_LR] = index, progress, lr
        non_blocking = self.device.type == "cuda"
        # The host rewrites scalars_host only after the next blocking flag copy, so this copy has run by then.
        self.scalars.copy_(self.scalars_host, non_blocking=non_blocking)
        self.images.copy_(images, non_blocking=non_blocking)
        self.labels.copy_(labels, non_blocking=non_blocking)
        if self._graphs is not None:
            self._graphs[0].replay()
        else:
            # Gradients are overwritten, not accumulated: a captured backward writes into the same .grad tensors.
            for param in self.trainer.params:
                param.grad = None
            self._part_a()
        self.flag_host.copy_(self._finite)  # the one synchronisation of a step
        finite = bool(self.flag_host[0])
        if finite:
            if self._graphs is not None:
                self._graphs[1].replay()
            else:
                self._part_b()
        return finite

    def describe(self) -> Dict[str, str]:
        """``{"mode": "graph" | "uncaptured", "reason": ...}`` for ``bnao profile``."""
        return {"mode": self.mode, "reason": self.reason}


# ---------------------------------------------------------------------------------------------- evaluation
def evaluation_unsupported(model, batches_per_arch: Optional[int], bf16: bool) -> Optional[str]:
    """Why :func:`evaluate_pool_on_device` cannot score ``batches_per_arch`` batches an arch (None when it can)."""
    if batches_per_arch != 1:
        return "several batches per arch" if batches_per_arch else "a batch source of unknown size"
    return _fused_unavailable(model, bf16)


@torch.no_grad()
def evaluate_pool_on_device(model, archs: np.ndarray, next_batch, capture: bool = True, bf16: bool = False
                            ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, str]]:
    """Summed loss and correct count of every arch on its batch, one replay per arch (module docstring).

    Args:
        model: The supernet (in eval mode; batch statistics, nothing updated).
        archs: ``int64 [n, L]``.
        next_batch: ``i -> (images, labels)``: arch ``i``'s batch (the same shape for every arch).
        capture: Capture a CUDA graph (CUDA only).
        bf16: bfloat16 autocast (the fused cells keep bfloat16 activations, float32 weights and arithmetic).

    Returns:
        ``(loss sums [n], correct counts [n], images [n], {"mode", "reason"})``, the sums on the device.
    """
    device = next(model.parameters()).device
    images, labels = next_batch(0)
    # The tables' masks in the weights' dtype, as run_cells asks for them (bf16 images may feed float32 weights).
    tables = pool_tables(model, archs, device, next(model.parameters()).dtype, touched=False)
    n = len(archs)
    cuda = device.type == "cuda"
    # Each arch's index comes from a device range by a device-to-device copy: no host buffer is rewritten
    # while earlier asynchronous copies from it may still be pending.
    indices = torch.arange(max(n, 1), device=device)
    index = torch.zeros(1, dtype=torch.int64, device=device)
    static_images = torch.empty_like(images, device=device, memory_format=torch.contiguous_format)
    static_labels = torch.empty_like(labels, device=device)
    loss_sums = torch.zeros(n, dtype=torch.float32, device=device)
    correct = torch.zeros(n, dtype=torch.float32, device=device)

    def score() -> None:
        data, _ = tables.select(index)
        with bf16_autocast(device, bf16, capturable=True):
            logits = model.forward_data(static_images, data, bn_train=True).float()
        loss_sums.index_add_(0, index, F.cross_entropy(logits, static_labels, reduction="sum").view(1))
        correct.index_add_(0, index, (logits.argmax(1) == static_labels).sum().float().view(1))

    blocker = capture_blocker(capture, device)
    graph, status = None, {"mode": "uncaptured", "reason": blocker or "not captured yet"}
    seen = [int(labels.shape[0])] * n
    for i in range(n):
        if i:
            images, labels = next_batch(i)
        if images.shape != static_images.shape or labels.shape != static_labels.shape:
            # A short batch (the end of a dev epoch): this arch alone through the uncaptured forward.
            with bf16_autocast(device, bf16, capturable=True):
                logits = model(images, tuple(int(v) for v in archs[i]), bn_train=True).float()
            loss_sums[i] += F.cross_entropy(logits, labels, reduction="sum")
            correct[i] += (logits.argmax(1) == labels).sum()
            seen[i] = int(labels.shape[0])
            continue
        index.copy_(indices[i : i + 1])
        static_images.copy_(images, non_blocking=cuda)
        static_labels.copy_(labels, non_blocking=cuda)
        if graph is not None:
            graph.replay()
            continue
        score()
        if i == 0 and blocker is None:
            graphs, error = capture_graphs((score,), device, None)
            if error is None:
                graph, status = graphs[0], {"mode": "graph", "reason": "captured"}
            else:
                status = {"mode": "uncaptured", "reason": f"capture failed: {error}"}
                log.warning("CUDA graph capture of pool evaluation failed (%s); running it uncaptured", error)
    return loss_sums, correct, to_device(seen, torch.float32, device), status
