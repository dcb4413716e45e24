"""The NAO-WS weight-sharing supernet, its trainer and its pool evaluator (SPEC section 4).

* :class:`Supernet` — ``forward(images, arch)``; weights per (op, input id) slot in a few stacked tensors.
* :class:`SupernetTrainer` — one sampled arch per step, masked SGD, cosine schedule, exact resume.
* :func:`evaluate_pool` — every arch of a pool scored on the dev batch with BN in training mode.
"""

from .evaluator import EVAL_DATA_MODES, RandomBatches, evaluate_pool
from .model import Supernet
from .optim import MaskedSGD
from .trainer import UNUSED_SLOT_UPDATES, CheckpointError, NonFiniteLossError, SupernetTrainer, cosine_lr

__all__ = ["Supernet", "SupernetTrainer", "MaskedSGD", "NonFiniteLossError", "CheckpointError", "evaluate_pool",
           "cosine_lr", "RandomBatches", "EVAL_DATA_MODES", "UNUSED_SLOT_UPDATES"]
