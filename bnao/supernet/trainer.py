"""Supernet training: one arch drawn per step, SGD with a restartable cosine schedule (SPEC section 4).

Each step draws an arch index from the sampler (size-proportional in
Balanced NAO), takes the next batch, and trains the shared weights of that
arch on it. What happens to the weight-sharing slots the step's arch does not
use is ``unused_slot_update`` (both through
:class:`~bnao.supernet.optim.MaskedSGD`):

* ``"decay"`` (default, the reference's behaviour): the reference keeps one
  parameter per slot, and under the PyTorch of its time ``zero_grad()`` kept a
  zero gradient on every parameter that had ever received one, so SGD gave
  every slot used at least once momentum and weight decay at every later
  step. Slots never used so far do not move.
* ``"freeze"``: only the slots of the step's arch move (what PyTorch >= 2
  does with the reference code, whose unused parameters keep ``grad=None``).

Non-finite losses: the step is skipped (no weight update), counted and logged;
``max_bad_steps`` of them in a row raise :class:`NonFiniteLossError` so that
the caller can fall back to its last good checkpoint. On CUDA the check waits
only for the forward pass: the finiteness flag is copied to pinned memory
before the backward pass is launched, so the host never waits for the backward.
(BatchNorm running averages are updated during that forward; they are not
used by the search, which normalises with batch statistics.)

Resume: :meth:`SupernetTrainer.state_dict` holds the model, the optimizer,
the schedule, the step counters, the draw counts, the sampler, the loader
position and every random generator in play, so a resumed run continues with
bit-identical weights (on the same device and software). A checkpoint also
moves between a GPU and a CPU machine (it is loaded onto the CPU first): the
weights, optimizer state, schedule, counters, pool and sampler draws (one
stream on every device) continue exactly, whereas the loader's order and
augmentation and the drop-path masks come from the new device's generators
(CPU and CUDA streams differ for one seed), so the continued run is a faithful
continuation but not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch.profiler import record_function

from ..autocast import bf16_autocast
from ..data_parallel import GradientSync
from ..distributed import average_buffers, sum_across_ranks
from ..signals import stop_requested
from .graph_step import GraphStep, graph_unsupported
from .loss import supernet_loss
from .model import Supernet
from .nonfinite import NonFiniteGuardMixin, NonFiniteLossError
from .optim import MaskedSGD
from .slot_updates import UNUSED_SLOT_UPDATES, SlotUpdateMixin
from .trainer_state import CHECKPOINT_FORMAT, CheckpointError, TrainerStateMixin

#: Values of ``graph`` (see :class:`SupernetTrainer`).
GRAPH_MODES = ("auto", "on", "off")


def cosine_lr(step: int, total: int, lr_max: float, lr_min: float) -> float:
    """Cosine annealing from ``lr_max`` (step 0) to ``lr_min`` (step ``total``)."""
    if total <= 0:
        return lr_max
    t = min(max(step, 0), total) / total
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * t))


class SupernetTrainer(NonFiniteGuardMixin, SlotUpdateMixin, TrainerStateMixin):
    """Trains a :class:`~bnao.supernet.Supernet` one sampled arch per step.

    The non-finite-loss guard (:mod:`~bnao.supernet.nonfinite`), the masked optimizer step
    (:mod:`~bnao.supernet.slot_updates`) and the resumable state (:mod:`~bnao.supernet.trainer_state`) come
    from mixins; this class draws the archs and batches and runs the step loop.

    Args:
        model: The supernet (already on ``device``).
        sampler: A ``bnao.sampling`` sampler over the pool (``draw()`` returns an index).
        pool: ``int64 [n, 8B]`` archs; row ``i`` is the arch of sampler index ``i``.
        train_loader: Iterable of ``(images, labels)`` on the device; iteration restarts at each epoch end.
            Its ``state_dict()``/``load_state_dict()`` (when present) are checkpointed.
        lr_max: Learning rate at the start of each schedule.
        lr_min: Learning rate at its end.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        grad_clip: Max global gradient norm (0 or None: no clipping).
        label_smoothing: Cross-entropy label smoothing.
        bf16: bfloat16 autocast for forward and loss.
        channels_last: Feed images in ``torch.channels_last`` memory format.
        steps_total: Length of the cosine schedule (one search iteration); also the drop-path horizon when the
            model has none.
        max_bad_steps: Consecutive non-finite losses that abort training.
        aux_weight: Weight of the auxiliary head's loss (when the model has one).
        device: Training device (default: the model's).
        seed: Seeds the model's drop-path generator when the model was built with the default.
        sync_timing: Synchronise CUDA around each phase so the draw/forward/backward/optimizer split is exact
            (slower; for profiling).
        lr_steps_per_epoch: When set, the learning rate is constant within each epoch of this many steps, as
            the reference's per-epoch cosine scheduler (stepped at every epoch's start, so the first epoch is
            already one epoch into the cosine and the last one runs at ``lr_min``); None: per-step cosine.
        unused_slot_update: ``"decay"`` (the reference's: slots used at least once get momentum and weight
            decay every step) or ``"freeze"`` (slots the step's arch does not use do not move).
        data_parallel: Several processes (:mod:`bnao.distributed`): the loader yields this rank's slice of
            each batch, and this averages the gradients over the ranks after every backward (None: one
            process). Every rank draws the same arch from its identically seeded sampler.
        graph: ``"auto"``: on the fused path (CUDA), run each step on device data as two replayed CUDA graphs
            (:mod:`bnao.supernet.graph_step`; uncaptured where capture fails), else the eager step; ``"on"``:
            the same, an error where the step does not allow it; ``"off"``: always the eager step.
            :attr:`graph_status` says which ran and why.
    """

    def __init__(self, model: Supernet, sampler: Any, pool: np.ndarray, train_loader: Any, *,
                 lr_max: float = 0.025, lr_min: float = 0.001, momentum: float = 0.9, weight_decay: float = 3e-4,
                 grad_clip: Optional[float] = 5.0, label_smoothing: float = 0.0, bf16: bool = False,
                 channels_last: bool = False, steps_total: int = 1000, max_bad_steps: int = 5,
                 aux_weight: float = 0.4, device: Union[str, torch.device, None] = None, seed: Optional[int] = None,
                 sync_timing: bool = False, lr_steps_per_epoch: Optional[int] = None,
                 unused_slot_update: str = "decay", data_parallel: Optional[GradientSync] = None,
                 graph: str = "auto"):
        if unused_slot_update not in UNUSED_SLOT_UPDATES:
            raise ValueError(f"unused_slot_update must be one of {UNUSED_SLOT_UPDATES}, got {unused_slot_update!r}")
        if steps_total <= 0:
            raise ValueError(f"steps_total must be positive, got {steps_total}")
        if lr_steps_per_epoch is not None and lr_steps_per_epoch <= 0:
            raise ValueError(f"lr_steps_per_epoch must be positive, got {lr_steps_per_epoch}")
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {GRAPH_MODES}, got {graph!r}")
        self.graph = graph
        self._graph_step: Optional[GraphStep] = None
        self.graph_status: Dict[str, str] = {"mode": "eager", "reason": "no step yet"}
        self.lr_steps_per_epoch = lr_steps_per_epoch
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.model = model
        self.sampler = sampler
        self.loader = train_loader
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.lr_max, self.lr_min = float(lr_max), float(lr_min)
        self.grad_clip = float(grad_clip) if grad_clip else 0.0
        self.label_smoothing = float(label_smoothing)
        self.bf16 = bool(bf16)
        self.channels_last = bool(channels_last)
        self.max_bad_steps = int(max_bad_steps)
        self.aux_weight = float(aux_weight)
        self.sync_timing = bool(sync_timing) and self.device.type == "cuda"
        self.data_parallel = data_parallel
        if seed is not None and model.seed == 0:
            model.seed = int(seed)
        if model.total_steps is None:
            model.total_steps = int(steps_total)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = MaskedSGD(self.params, lr=lr_max, momentum=momentum, weight_decay=weight_decay)
        self.unused_slot_update = unused_slot_update
        # "decay": per parameter (in self.params order), the rows used at least once so far:
        # None (never), True (all rows) or a 0/1 row mask tensor on the device.
        self.ever_used: list = [None] * len(self.params)
        self.schedule_steps = int(steps_total)
        self.schedule_step = 0
        self.global_step = 0
        self.bad_steps_total = 0
        self.bad_in_row = 0
        self._iter = None
        self._flag_host = torch.zeros(1, dtype=torch.bool, pin_memory=self.device.type == "cuda")
        self.set_pool(pool)

    # ------------------------------------------------------------------ pool
    def set_pool(self, pool: np.ndarray) -> None:
        """Replaces the pool (rows = sampler indices) and resets the draw counts."""
        pool = np.asarray(pool, dtype=np.int64)
        if pool.ndim != 2 or pool.shape[1] != self.model.space.length or len(pool) == 0:
            raise ValueError(f"pool must have shape [n, {self.model.space.length}] with n >= 1, got {pool.shape}")
        self.model.space.validate_array(pool)
        # Kept as a compact host array (a tuple per row would cost ~400 bytes an arch,
        # 400 MB for a pool of a million); one row becomes a tuple per step (~2 us).
        self.pool = pool
        self.counts = np.zeros(len(pool), dtype=np.int64)
        self._graph_step = None  # its tables hold the old pool

    def draw_counts(self) -> np.ndarray:
        """How many steps trained each arch of the current pool (``int64 [n]``)."""
        return self.counts.copy()

    def restart_schedule(self, steps: int) -> None:
        """Restarts the cosine schedule at ``lr_max`` for ``steps`` steps (one search iteration)."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        self.schedule_steps = int(steps)
        self.schedule_step = 0

    def current_lr(self) -> float:
        """Learning rate of the next step."""
        per_epoch = self.lr_steps_per_epoch
        if per_epoch:
            epochs = -(-self.schedule_steps // per_epoch)
            return cosine_lr(self.schedule_step // per_epoch + 1, epochs, self.lr_max, self.lr_min)
        return cosine_lr(self.schedule_step, self.schedule_steps, self.lr_max, self.lr_min)

    # ------------------------------------------------------------------ data
    def _next_batch(self):
        """The loader's next ``(images, labels)``, starting its next epoch when one ends.

        Raises:
            RuntimeError: The loader yields no batch at all.
        """
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.loader)  # the loader moves on to the next epoch
            try:
                return next(self._iter)
            except StopIteration:
                raise RuntimeError("the training loader yields no batches (dataset smaller than a batch?)") from None

    # ------------------------------------------------------------------ steps
    def _sync(self) -> None:
        """Waits for the device when ``sync_timing`` asks for exact per-phase times (else does nothing)."""
        if self.sync_timing:
            torch.cuda.synchronize(self.device)

    def train_steps(self, n: int, progress: Optional[Callable[[int], Any]] = None) -> Dict[str, float]:
        """Runs ``n`` training steps.

        Args:
            n: Steps.
            progress: Called with 1 after every step (e.g. ``tqdm.update``).

        Returns:
            ``loss`` and ``acc`` (means over the good steps), ``lr`` (last), ``steps``, ``bad_steps``,
            ``img_per_s``, ``ms_per_step``, and ``draw_ms``/``forward_ms``/``backward_ms``/``optimizer_ms``
            (host time per step unless ``sync_timing``).

        Raises:
            NonFiniteLossError: ``max_bad_steps`` consecutive non-finite losses.
        """
        # Once per call: the pool and the sampler do not change within one.
        items = getattr(self.sampler, "num_items", len(self.pool))
        if items != len(self.pool):  # a draw past the pool fails; a smaller sampler would never train the rest
            raise ValueError(f"the sampler draws from {items} items but the pool holds {len(self.pool)} archs; give "
                             "the sampler one weight per pool arch (sampler.set_weights) when the pool changes")
        model = self.model
        model.train()
        dev = self.device
        tally = {"loss": torch.zeros((), device=dev, dtype=torch.float32),
                 "correct": torch.zeros((), device=dev, dtype=torch.float32), "seen": 0, "good": 0, "bad": 0}
        t_draw = t_fwd = t_bwd = t_opt = 0.0
        images_total = 0
        lr = self.current_lr()
        self._sync()
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            idx, arch, images, labels = self._draw_step_inputs()
            t1 = time.perf_counter()
            lr = self.current_lr()
            # The drop-path ramp restarts with every search iteration, like the cosine schedule (the
            # reference passes its per-iteration step counter to the model).
            model.set_step(self.schedule_step)
            loss, logits, finite, update, t2, t3 = self._forward_backward_or_replay(idx, arch, images, labels, lr)
            self.global_step += 1
            self.schedule_step += 1
            with record_function("bnao::optimizer"):
                self._account(tally, finite, lr, loss, logits, labels, update=update)
            self._sync()
            t4 = time.perf_counter()
            t_draw += t1 - t0
            t_fwd += t2 - t1
            t_bwd += t3 - t2
            t_opt += t4 - t3
            images_total += labels.shape[0]
            if progress is not None:
                progress(1)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - start
        return self._summary(tally, n, lr, elapsed, images_total, (t_draw, t_fwd, t_bwd, t_opt))

    def _draw_step_inputs(self):
        """The step's arch (drawn, counted, checked across ranks) and batch: ``(index, arch, images, labels)``."""
        idx = int(self.sampler.draw())
        if self.data_parallel is not None:
            self.data_parallel.verify_arch(idx, self.global_step)
        arch = tuple(self.pool[idx].tolist())
        self.counts[idx] += 1
        images, labels = self._next_batch()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self._sync()
        return idx, arch, images, labels

    def _forward_backward_or_replay(self, idx: int, arch, images: torch.Tensor, labels: torch.Tensor, lr: float):
        """The step's forward and backward, by the graph step (which also updates when finite) or eagerly:
        ``(loss, logits, finite, the eager update or None, time after the forward, time after the backward)``."""
        graph_step = self._graph_step_for_run()
        if graph_step is not None:  # forward, backward and (when finite) the update, replayed
            finite = graph_step.run(images, labels, idx, self.model.progress(), lr)
            t2 = time.perf_counter()
            return graph_step.loss, graph_step.logits, finite, None, t2, t2
        loss, logits, finite, t2 = self._forward_backward(images, labels, arch)
        return loss, logits, finite, functools.partial(self._optimizer_step, arch, lr), t2, time.perf_counter()

    def _summary(self, tally: Dict[str, Any], n: int, lr: float, elapsed: float, images_total: int,
                 times: Tuple[float, float, float, float]) -> Dict[str, float]:
        """:meth:`train_steps`'s result from its tallies (summed over the ranks when data-parallel)."""
        t_draw, t_fwd, t_bwd, t_opt = times
        loss_sum, correct_sum, seen, good, bad = (tally[k] for k in ("loss", "correct", "seen", "good", "bad"))
        steps = max(n, 1)
        if self.data_parallel is not None:
            loss_sum, correct_sum, seen, images_total = self._reduce_stats(loss_sum, correct_sum, seen, images_total)
            good *= self.data_parallel.context.world_size
        return {
            "loss": float(loss_sum) / good if good else float("nan"),
            "acc": float(correct_sum) / seen if seen else float("nan"),
            "lr": lr,
            "steps": n,
            "bad_steps": bad,
            "img_per_s": images_total / elapsed if elapsed > 0 else float("nan"),
            "ms_per_step": 1000.0 * elapsed / steps,
            "draw_ms": 1000.0 * t_draw / steps,
            "forward_ms": 1000.0 * t_fwd / steps,
            "backward_ms": 1000.0 * t_bwd / steps,
            "optimizer_ms": 1000.0 * t_opt / steps,
        }

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, arch):
        """The eager step's forward and backward: ``(loss, logits, finite, time after the forward)``."""
        dev = self.device
        with bf16_autocast(dev, self.bf16), record_function("bnao::forward"):
            loss, logits = supernet_loss(self.model(images, arch), labels, self.aux_weight, self.label_smoothing)
        # Data-parallel: every rank's flag travels with the gradients, so all skip the same steps.
        finite = self._loss_is_finite(loss) if self.data_parallel is None else True
        self._sync()
        forward_done = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("bnao::backward"):
            loss.backward()
        if self.data_parallel is not None:
            finite = self.data_parallel.reduce(self.params, loss, stop_requested(),
                                               masks=self.model.touched_masks(arch))
        elif finite is None:
            self._pending_event.synchronize()
            finite = bool(self._flag_host[0])
        self._sync()
        return loss, logits, finite, forward_done

    def _graph_step_for_run(self):
        """The :class:`~bnao.supernet.graph_step.GraphStep` when ``graph`` is on and the step allows it, else None."""
        if self.graph == "off":
            self.graph_status = {"mode": "eager", "reason": "graph='off'"}
            return None
        if self._graph_step is None:
            why = graph_unsupported(self)
            if why is not None:
                if self.graph == "on":
                    raise ValueError(f"graph='on': {why}")
                self.graph_status = {"mode": "eager", "reason": why}
                return None
            self._graph_step = GraphStep(self, capture=True)
        self.graph_status = self._graph_step.describe()
        return self._graph_step

    def _reduce_stats(self, loss_sum: torch.Tensor, correct_sum: torch.Tensor, seen: int, images: int):
        """Sums of a chunk's statistics over the ranks (every rank then reports the global figures)."""
        average_buffers(self.model)  # one model on every rank: checkpoints and later phases see the same one
        totals = sum_across_ranks([float(loss_sum), float(correct_sum), seen, images], "the supernet statistics")
        return totals[0], totals[1], int(totals[2]), int(totals[3])


# The guard, the slot updates and the state now live in their own modules; their public names stay importable
# from here, where callers have always found them.
__all__ = ["SupernetTrainer", "NonFiniteLossError", "CheckpointError", "cosine_lr", "GRAPH_MODES",
           "UNUSED_SLOT_UPDATES", "CHECKPOINT_FORMAT"]
