"""The NAO-WS weight-sharing supernet (SPEC section 4).

Every node of every cell holds, for each branch, one instance of every
operation, with weights kept per possible input id; BatchNorm running
statistics are shared across input ids. Those weights live in a few stacked
tensors, one per (stage, op, role) — e.g. ``s1_sep_conv_3x3_pw1`` of shape
``[slots, C, C]`` holds the first pointwise conv of every sep-conv-3x3 slot of
every cell of stage 1 — where a *stage* is the run of cells sharing a channel
count and a *slot* is ``(cell, node, branch, input id)``. A forward gathers
the rows the arch uses with one ``index_select`` per tensor and hands each
cell its rows through :func:`bnao.ops.cell.mixed_cell`, the op boundary.

Gradients: the rows an arch does not use receive zero gradient (the tensor's
``.grad`` is dense). NAO keeps every slot in its own parameter; what its SGD
does to the slots a step did not use depends on the PyTorch version (see
``unused_slot_update`` in :mod:`bnao.supernet.trainer`), and
:class:`~bnao.supernet.optim.MaskedSGD` with the row masks of
:meth:`Supernet.touched_masks` reproduces either rule on the stacked tensors.

Drop-path follows NAO: keep probability
``1 - (step+1)/total_steps * (layer+1)/num_cells * (1 - keep_prob)`` per cell,
where ``step`` counts from 0 in every search iteration and ``total_steps`` is
one iteration's length; one Bernoulli per sample and branch, on every branch
(identity included, as the reference's search model; ``drop_path_identity=False``
exempts identity branches).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nets.layers import AuxHeadCIFAR, AuxHeadImageNet
from ..nets.network import check_skeleton_args
from ..space.nao import Arch, NAOSpace
from ..space.ops import KIND_IDENTITY, op_table
from . import eager_forward, fused_forward, slots, touched
from .drop_path import DropPathMixin
from .fixed import CellFixed, CellInfo, ConvBN
from .fused_forward import cells_choice, check_kernels
from .plan import Plan, build_plan


def _checked_space(space: Union[NAOSpace, str], skeleton: str, layers: int, channels: int, num_classes: int,
                   in_channels: int, drop_path_keep_prob: Optional[float], dropout: float) -> NAOSpace:
    """The search space of :class:`Supernet`'s arguments (an op-set name made a space), after checking them all."""
    if isinstance(space, str):
        space = NAOSpace(op_set=space)
    check_skeleton_args(skeleton, layers, channels, num_classes, in_channels)
    if drop_path_keep_prob is not None and not 0.0 < drop_path_keep_prob <= 1.0:
        raise ValueError(f"drop_path_keep_prob must be in (0, 1], got {drop_path_keep_prob}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return space


class Supernet(DropPathMixin, nn.Module):
    """NAO-WS supernet over a :class:`~bnao.space.NAOSpace`.

    Args:
        space: The search space (``NAOSpace``) or an op-set name.
        skeleton: ``"cifar"`` (stem conv3x3 to 3C) or ``"imagenet"`` (two stride-2 stems).
        layers: ``N``: normal cells per stage (``3N + 2`` cells, reductions at ``N`` and ``2N + 1``).
        channels: ``C`` of the first stage (doubled at each reduction).
        num_classes: Classifier outputs.
        in_channels: Image channels.
        drop_path_keep_prob: Base keep probability of drop-path (1.0 or None: off).
        dropout: Dropout rate before the classifier.
        auxiliary: Auxiliary head after the second reduction cell (training mode only).
        total_steps: Steps of one search iteration's supernet training, for the drop-path progress factor
            (None: factor 1).
        bn_momentum: BatchNorm momentum.
        seed: Seed of the generator that draws drop-path and dropout masks (its state is checkpointed).
        plan_cache_size: Archs whose gather indices are kept on the device.
        drop_path_identity: Drop-path on identity branches too (the reference's); False exempts them.
        kernels: ``"eager"`` (the level-scheduled PyTorch cells of :func:`~bnao.ops.cell.mixed_cell`),
            ``"fused"`` (the compiled fused-cell ops, arch as device data: csrc/cell/DESIGN.md; an error where
            they are not built) or ``"auto"`` (fused on a GPU where built, else eager: on a CPU the eager
            cells are faster). Evaluation with running statistics always runs eager. Under bfloat16 autocast the
            fused cells keep activations in bfloat16 and weights, BN statistics and arithmetic in float32.
    """

    def __init__(self, space: Union[NAOSpace, str] = "small", *, skeleton: str = "cifar", layers: int = 3,
                 channels: int = 20, num_classes: int = 10, in_channels: int = 3,
                 drop_path_keep_prob: Optional[float] = 0.9, dropout: float = 0.0, auxiliary: bool = False,
                 total_steps: Optional[int] = None, bn_momentum: float = 0.1, seed: int = 0,
                 plan_cache_size: int = 4096, drop_path_identity: bool = True, kernels: str = "auto"):
        super().__init__()
        self.kernels = check_kernels(kernels)
        self.space = _checked_space(space, skeleton, layers, channels, num_classes, in_channels,
                                    drop_path_keep_prob, dropout)
        self._init_settings(skeleton, layers, channels, num_classes, drop_path_keep_prob, drop_path_identity,
                            dropout, total_steps, bn_momentum, seed, plan_cache_size)
        # The modules are built in this order because it is the order of the initialisation draws and of the
        # parameters: changing it changes the weights a seed gives and the checkpoint layout.
        prev = self._build_stem(in_channels)
        last_channels = self._build_cells(prev)
        self._build_slot_params()
        self._build_heads(last_channels, auxiliary)
        # Drop-path depth factor (layer+1)/num_cells * (1 - keep) per cell; times progress gives the drop rate.
        keep = 1.0 if drop_path_keep_prob is None else drop_path_keep_prob
        depth = torch.tensor([(i + 1) / self.num_cells * (1.0 - keep) for i in range(self.num_cells)])
        self.register_buffer("_drop_depth", depth, persistent=False)

    # ------------------------------------------------------------ construction
    def _init_settings(self, skeleton: str, layers: int, channels: int, num_classes: int,
                       drop_path_keep_prob: Optional[float], drop_path_identity: bool, dropout: float,
                       total_steps: Optional[int], bn_momentum: float, seed: int, plan_cache_size: int) -> None:
        """Stores the constructor's settings, the derived cell layout and the (empty) caches."""
        self.skeleton = skeleton
        self.layers, self.channels, self.num_classes = layers, channels, num_classes
        self.num_nodes = self.space.num_nodes
        self.table = op_table(self.space.op_set)
        self.drop_path_keep_prob = drop_path_keep_prob
        self.drop_path_identity = bool(drop_path_identity)
        self.dropout = dropout
        self.total_steps = total_steps
        self.step: Optional[int] = None
        self.bn_momentum, self.bn_eps = bn_momentum, 1e-5
        self.seed = int(seed)
        # (rank, world size) of a data-parallel run (bnao.distributed): masks are drawn for the global batch
        # and this rank keeps its slice of them, as it does of the images, so a run on several processes
        # draws what one process would.
        self.batch_shard: Tuple[int, int] = (0, 1)
        self.plan_cache_size = plan_cache_size
        self._plans: "OrderedDict[Tuple[int, ...], Plan]" = OrderedDict()
        self._touched_layout: Optional[List[touched.TouchedEntry]] = None
        self._generators: Dict[str, torch.Generator] = {}
        # Generator states of devices this machine lacks (from a checkpoint written elsewhere), kept to be saved again.
        self._absent_rng: Dict[str, torch.Tensor] = {}
        self.num_cells = 3 * layers + 2
        self.reduction_indices = (layers, 2 * layers + 1)
        self.aux_index = 2 * layers + 1

    def _build_stem(self, in_channels: int) -> List[Tuple[int, int]]:
        """Builds the stem convs; returns the ``(resolution level, channels)`` of the first cell's two inputs."""
        channels = self.channels
        if self.skeleton == "cifar":
            self.stem = ConvBN(in_channels, 3 * channels, 3, 1)
            return [(0, 3 * channels), (0, 3 * channels)]
        self.stem0a = ConvBN(in_channels, max(channels // 2, 1), 3, 2)
        self.stem0b = ConvBN(max(channels // 2, 1), channels, 3, 2)
        self.stem1 = ConvBN(channels, channels, 3, 2)
        return [(2, channels), (3, channels)]

    def _build_cells(self, prev: List[Tuple[int, int]]) -> int:
        """Builds every cell's fixed (non-slot) modules and the stage layout; returns the last cell's channels.

        Args:
            prev: ``(resolution level, channels)`` of the first cell's two inputs (from the stem).
        """
        self.cell_info: List[CellInfo] = []
        self.fixed = nn.ModuleList()
        stage, cell_channels = 0, self.channels
        local, reduction_local = 0, 0
        for index in range(self.num_cells):
            reduction = index in self.reduction_indices
            if reduction:
                stage, cell_channels, local, reduction_local = stage + 1, cell_channels * 2, 0, 0
            self.cell_info.append(CellInfo(index, stage, local, reduction_local if reduction else -1, reduction,
                                           cell_channels))
            # Inputs at different resolutions: the older one is reduced to the newer one's (factorized reduce).
            self.fixed.append(CellFixed(prev[0][1], prev[1][1], prev[0][0] != prev[1][0], cell_channels,
                                        self.num_nodes + 2, reduction))
            local += 1
            reduction_local += int(reduction)
            prev = [prev[1], (prev[1][0] + int(reduction), cell_channels)]
        self.num_stages = stage + 1
        self.stage_cells = [[ci for ci in self.cell_info if ci.stage == g] for g in range(self.num_stages)]
        self.stage_channels = [self.channels * 2 ** g for g in range(self.num_stages)]
        return prev[1][1]

    def _build_slot_params(self) -> None:
        """Creates the stacked per-slot weights, one tensor per (stage, op, role), and each stage's shared
        slot-BN running statistics (:mod:`bnao.supernet.slots`)."""
        self.slots_per_cell = slots.slots_per_cell(self.num_nodes)
        self._branch_base = slots.branch_bases(self.num_nodes)
        self.slot_ops: List[List[int]] = []  # per stage, the op indices with stacked weights
        self.slot_params = nn.ParameterDict()
        self._bn_offset, self._bn_per_branch = slots.bn_layout(self.table)
        for g in range(self.num_stages):
            cells = self.stage_cells[g]
            ops, tensors = slots.create_stage_slots(self.table, len(cells), sum(ci.reduction for ci in cells),
                                                    self.stage_channels[g], self.num_nodes)
            for op, role, tensor in tensors:
                self.slot_params[self._pname(g, op, role)] = nn.Parameter(tensor)
            self.slot_ops.append(ops)
            rows = len(cells) * 2 * self.num_nodes * self._bn_per_branch
            self.register_buffer(f"s{g}_running_mean", torch.zeros(rows, self.stage_channels[g]))
            self.register_buffer(f"s{g}_running_var", torch.ones(rows, self.stage_channels[g]))

    def _build_heads(self, last_channels: int, auxiliary: bool) -> None:
        """Builds the auxiliary head (if asked for) and the classifier, with NAO's Kaiming-normal weights."""
        self.auxiliary_head: Optional[nn.Module] = None
        if auxiliary:
            head = AuxHeadCIFAR if self.skeleton == "cifar" else AuxHeadImageNet
            self.auxiliary_head = head(self.stage_channels[-1], self.num_classes)
            for p in self.auxiliary_head.parameters():
                if p.dim() >= 2:
                    nn.init.kaiming_normal_(p)
        self.classifier = nn.Linear(last_channels, self.num_classes)
        nn.init.kaiming_normal_(self.classifier.weight)

    # ------------------------------------------------------------------ naming
    def _pname(self, stage: int, op: int, role: str) -> str:
        return f"s{stage}_{self.space.op_names[op]}_{role}"

    def slot_tensor(self, stage: int, op: int, role: str) -> nn.Parameter:
        """The stacked weight of ``role`` (e.g. ``"pw1"``) of op index ``op`` in stage ``stage``."""
        return self.slot_params[self._pname(stage, op, role)]

    def slot_index(self, cell: int, node: int, branch: int, input_id: int, op: int) -> int:
        """Row of a slot in its stage's stacked tensors of ``op``.

        Args:
            cell: Cell index in the stack.
            node: Node index (0-based; node id ``node + 2``).
            branch: 0 (x) or 1 (y).
            input_id: Input state id.
            op: Op index.
        """
        ci = self.cell_info[cell]
        pos = 2 * node + branch
        if self.table[op][0] == KIND_IDENTITY:
            if not ci.reduction or input_id > 1:
                raise ValueError("identity has weights only on reduction-cell branches reading input 0 or 1")
            return ci.red_local * 4 * self.num_nodes + 2 * pos + input_id
        return ci.local * self.slots_per_cell + self._branch_base[pos] + input_id

    # ---------------------------------------------------------------- devices
    def _apply(self, fn, recurse=True):
        self._plans.clear()  # cached index tensors live on the old device
        self._touched_layout = None
        return super()._apply(fn, recurse)

    def set_step(self, step: int) -> None:
        """Sets the training step for the drop-path schedule (counted from 0 in each search iteration)."""
        self.step = int(step)

    # ------------------------------------------------------------------ plans
    def arch_key(self, arch) -> Tuple[int, ...]:
        """An arch (tuple, list, array, :class:`~bnao.space.Arch`, string) as a validated tuple of ints."""
        if type(arch) is tuple and len(arch) == self.space.length and arch in self._plans:
            return arch
        if isinstance(arch, Arch):
            flat = arch.to_list()
        elif isinstance(arch, (str, dict)):
            flat = self.space.arch(arch).to_list()
        else:
            flat = [int(v) for v in (np.asarray(arch).reshape(-1).tolist() if isinstance(arch, np.ndarray)
                                      else (arch.tolist() if torch.is_tensor(arch) else arch))]
        self.space.validate(flat)
        return tuple(flat)

    def _plan(self, arch: Tuple[int, ...], device: torch.device) -> Plan:
        plan = self._plans.get(arch)
        if plan is not None:
            self._plans.move_to_end(arch)
            return plan
        plan = build_plan(self, arch, device)
        self._plans[arch] = plan
        if len(self._plans) > self.plan_cache_size:
            self._plans.popitem(last=False)
        return plan

    def touched_masks(self, arch) -> Dict[nn.Parameter, Union[bool, torch.Tensor]]:
        """Which parameters (and which rows of the stacked ones) a forward of ``arch`` uses
        (:func:`bnao.supernet.touched.touched_masks`; cached in the arch's plan)."""
        plan = self._plan(self.arch_key(arch), next(self.parameters()).device)
        if plan.masks is None:
            plan.masks = touched.touched_masks(self, plan)
        return plan.masks

    def touched_layout(self) -> List[touched.TouchedEntry]:
        """The fixed layout of :meth:`touched_values` (:func:`bnao.supernet.touched.touched_layout`)."""
        if self._touched_layout is None:
            self._touched_layout = touched.touched_layout(self)
        return self._touched_layout

    def touched_values(self, arch) -> List[float]:
        """0/1 per row of :meth:`touched_layout` for ``arch`` (:func:`bnao.supernet.touched.touched_values`)."""
        return touched.touched_values(self, self._plan(self.arch_key(arch), next(self.parameters()).device))

    # ---------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, arch, *, bn_train: bool = False):
        """Logits of ``images`` under ``arch`` (only the arch's ops run).

        Args:
            images: ``[N, in_channels, H, W]``.
            arch: Flat arch (tuple of ints is fastest; lists, arrays, :class:`~bnao.space.Arch` work).
            bn_train: In eval mode, normalise with batch statistics without updating running statistics
                (NAO-WS candidate evaluation). Training mode always uses and updates batch statistics.

        Returns:
            Logits ``[N, num_classes]``; in training mode with an auxiliary head, ``(logits, aux_logits)``.
        """
        key = self.arch_key(arch)
        device = images.device
        training = self.training
        batch_stats = training or bn_train
        update = training
        fused = self._fused_path(device, batch_stats, images.dtype)
        if device.type == "cpu" and not fused:
            # PyTorch's CPU depthwise-conv weight gradient is ~100x slower on NCHW than on NHWC tensors
            # (measured: 14 s vs 0.16 s for [64, 80, 32, 32], 5x5); NHWC propagates through the whole net.
            # (The fused kernels take NCHW.)
            images = images.contiguous(memory_format=torch.channels_last)
        plan = self._plan(key, device)
        if fused:
            data = self._fused_data(plan, device)
            return self._forward_cells(images, lambda s0, s1, masks: fused_forward.run_cells(
                self, data, s0, s1, masks, update), batch_stats, update, fused=True)
        return self._forward_cells(images, lambda s0, s1, masks: eager_forward.run_cells(
            self, plan, s0, s1, masks, batch_stats, update), batch_stats, update)

    def forward_data(self, images: torch.Tensor, data: "fused_forward.FusedArchData",
                     progress: Optional[torch.Tensor] = None, *, bn_train: bool = False):
        """:meth:`forward` on the fused path, the arch given as device data only (what a CUDA graph replays).

        Args:
            images: ``[N, in_channels, H, W]`` (NCHW-contiguous).
            data: The arch's :class:`~bnao.supernet.fused_forward.FusedArchData` (e.g. a row of
                :class:`~bnao.supernet.graph_step.PoolTables`).
            progress: 0-dim device tensor: the drop-path progress factor of :meth:`keep_probs` (training;
                None: from :attr:`step` on the host, as :meth:`forward`).
            bn_train: As :meth:`forward`.
        """
        batch_stats = self.training or bn_train
        if not batch_stats:
            raise ValueError("forward_data runs the fused cells, which take batch statistics: use forward() to "
                             "evaluate with running statistics")
        update = self.training
        return self._forward_cells(images, lambda s0, s1, masks: fused_forward.run_cells(
            self, data, s0, s1, masks, update), batch_stats, update, progress, fused=True)

    def _forward_cells(self, images: torch.Tensor, run_cells, batch_stats: bool, update: bool,
                       progress: Optional[torch.Tensor] = None, fused: bool = False):
        """Stem, ``run_cells(s0, s1, drop masks) -> (last state, aux logits)``, pooling and the classifier.

        The drop-path masks are in the states' dtype on the eager path, in the fused ops' parameter dtype
        (float32 under bfloat16 autocast) on the fused path.
        """
        training = self.training
        device = images.device
        if self.skeleton == "cifar":
            s0 = s1 = self.stem(images, batch_stats, update)
        else:
            s0 = self.stem0b(F.relu(self.stem0a(images, batch_stats, update)), batch_stats, update)
            s1 = self.stem1(F.relu(s0), batch_stats, update)

        # The fused ops take the multipliers in their parameter dtype: the weights' (float32 under bf16 autocast).
        mask_dtype = next(self.parameters()).dtype if fused else s1.dtype
        masks = self.drop_path_masks(images.shape[0], device, mask_dtype, progress) if training else None
        s1, aux_logits = run_cells(s0, s1, masks)
        out = F.adaptive_avg_pool2d(s1, 1).flatten(1)
        if training and self.dropout > 0:
            u = self._shard_rows(torch.rand((out.shape[0] * self.batch_shard[1], *out.shape[1:]),
                                            generator=self.generator(device), device=device), 0)
            out = out * (u >= self.dropout).to(out.dtype) / (1.0 - self.dropout)
        logits = self.classifier(out)
        if self.auxiliary_head is not None and training:
            return logits, aux_logits
        return logits

    def _fused_path(self, device: torch.device, batch_stats: bool, dtype: torch.dtype) -> bool:
        """Whether this forward runs the fused cells (see the ``kernels`` argument)."""
        return cells_choice(self, device, batch_stats, dtype)[0]

    def cells_path(self, device: Union[str, torch.device], dtype: torch.dtype = torch.float32) -> str:
        """Which path a training forward on ``device`` takes, and why: ``"fused"`` or ``"eager (...)"``."""
        fused, reason = cells_choice(self, torch.device(device), True, dtype)
        return "fused" if fused else f"eager ({reason})"

    def _fused_data(self, plan: Plan, device: torch.device) -> "fused_forward.FusedArchData":
        if plan.fused is None:
            plan.fused = fused_forward.FusedArchData.build(self, plan.arch, device)
        return plan.fused

    def _update_slot_stats(self, plan: Plan, stats, stage_hw: List[int], batch: int) -> None:
        """Folds a forward's slot-BN batch statistics into the running statistics
        (:func:`bnao.supernet.slots.update_slot_stats`)."""
        slots.update_slot_stats(self, plan, stats, stage_hw, batch)

    # --------------------------------------------------------------- helpers
    def num_parameters(self) -> int:
        """Total number of weights (every slot of every op)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"space={self.space!r}, skeleton={self.skeleton!r}, layers={self.layers}, channels={self.channels}, "
                f"num_classes={self.num_classes}, cells={self.num_cells}")
