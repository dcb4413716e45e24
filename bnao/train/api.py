"""One-call stand-alone training: :func:`train_standalone` for one arch, :func:`rerank` for several."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..space.nao import ArchLike, NAOSpace
from .config import make_config
from .standalone import StandaloneTrainer

__all__ = ["rerank", "train_standalone"]


def train_standalone(arch: ArchLike, space: NAOSpace, train_data: Any, eval_data: Any = None, *,
                     device: Union[str, torch.device, None] = "auto",
                     checkpoint_path: Optional[Union[str, os.PathLike]] = None, resume: bool = True,
                     progress: bool = False, on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None,
                     **settings: Any) -> Dict[str, Any]:
    """Trains one arch stand-alone and evaluates it.

    Args:
        arch: The arch (string, list, JSON object, :class:`~bnao.space.Arch`).
        space: Its search space.
        train_data: Training dataset.
        eval_data: Evaluation dataset (None: no evaluation).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        checkpoint_path: Checkpoint written atomically after every epoch (None: none).
        resume: Continue from ``checkpoint_path`` if it exists; a finished checkpoint returns its result.
        progress: Progress bar per epoch.
        on_epoch: Callback with each epoch's record.
        **settings: :class:`StandaloneConfig` fields (``layers``, ``channels``, ``epochs``,
            ``batch_size``, ``lr_max``, ``lr_min``, ``momentum``, ``weight_decay``, ``grad_clip``,
            ``auxiliary``, ``auxiliary_weight``, ``drop_path_keep_prob``, ``dropout``, ``cutout``,
            ``label_smoothing``, ``bf16``, ``channels_last``, ``seed``, ...).

    Returns:
        ``{"arch", "eval_acc", "eval_error", "eval_loss", "train_loss", "params", "epochs", "steps",
        "seconds", "history"}``; ``history`` has one dict per epoch (``epoch, lr, train_loss,
        train_acc, skipped_steps, eval_acc, eval_loss, seconds``).

    Raises:
        NonFiniteLossError: Training diverged.
        CheckpointError: The checkpoint cannot be resumed.
        bnao.space.InvalidArchError: Invalid arch.
    """
    trainer = StandaloneTrainer(arch, space, train_data, eval_data, make_config(**settings), device=device,
                                checkpoint_path=checkpoint_path, progress=progress, on_epoch=on_epoch)
    return trainer.fit(resume=resume)


def rerank(archs: Sequence[ArchLike], space: NAOSpace, train_data: Any, dev_data: Any, *,
           device: Union[str, torch.device, None] = "auto",
           checkpoint_dir: Optional[Union[str, os.PathLike]] = None, progress: bool = False,
           on_result: Optional[Callable[[Dict[str, Any]], None]] = None, **settings: Any) -> List[Dict[str, Any]]:
    """Trains each arch stand-alone and ranks them by held-out (dev) accuracy (the search's final step).

    Every arch gets the same seed and settings. With ``checkpoint_dir`` each
    arch checkpoints to ``rerank_<i>_<hash>.pt`` there, so an interrupted
    re-ranking resumes mid-arch and does not retrain finished archs.

    Args:
        archs: Candidates (e.g. the top 5 by one-shot score).
        space: Their search space.
        train_data: Training split (the search's train part).
        dev_data: Held-out split the score is measured on.
        device: Training device.
        checkpoint_dir: Folder for per-arch checkpoints (None: none).
        progress: Progress bars.
        on_result: Called with each arch's result as soon as it finishes.
        **settings: :class:`StandaloneConfig` fields; ``eval_every`` defaults to 0
            (evaluate only after the last epoch).

    Returns:
        One dict per arch, best first: the :func:`train_standalone` result plus ``index``
        (position in ``archs``), ``rank`` (1 = best) and ``dev_acc``. Ties keep input order.
    """
    settings.setdefault("eval_every", 0)
    results = []
    for i, arch in enumerate(archs):
        a = space.arch(arch)
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = Path(checkpoint_dir) / f"rerank_{i}_{space.hash(a)}.pt"
        res = train_standalone(a, space, train_data, dev_data, device=device, checkpoint_path=ckpt,
                               progress=progress, **settings)
        res["index"], res["dev_acc"] = i, res["eval_acc"]
        if on_result is not None:
            on_result(dict(res))
        results.append(res)
    results.sort(key=lambda r: (-(r["dev_acc"] or 0.0), r["index"]))
    for rank, r in enumerate(results, 1):
        r["rank"] = rank
    return results
