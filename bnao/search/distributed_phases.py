"""The search's phases on several processes (``torchrun ... -m bnao search``; see :mod:`bnao.distributed`).

* Supernet training is data-parallel inside :class:`~bnao.supernet.SupernetTrainer`.
* Pool evaluation (:func:`evaluate_split`): each rank scores a contiguous share of the pool and the scores
  are gathered. Each arch is scored on the dev batches a single process would give it: the random-batch
  stream is moved to the rank's first arch and, afterwards, past the last arch of the pool.
* Controller and generation (:func:`controller_and_generate`): rank 0 trains the controller and decodes
  the new archs (the controller has its own seeded generator), then broadcasts the pool and the run's
  state; the other ranks take them and prepare the next iteration.
* Stand-alone re-ranking (:func:`rerank_split`): arch ``i`` of the top list is trained by rank
  ``i % world_size``, each with the single-process settings, checkpoint name and seed, so the ranking is the
  single-process one whatever the number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..distributed import (DistributedError, broadcast_object, current, gather_objects, split_evenly)
from ..supernet import RandomBatches, evaluate_pool


def advance_loader_state(state: Dict[str, Any], batches: int, per_epoch: int) -> Dict[str, Any]:
    """A loader state moved ``batches`` batches on (across epochs of ``per_epoch`` batches)."""
    absolute = int(state["epoch"]) * per_epoch + int(state["position"]) + int(batches)
    moved = dict(state)
    moved["epoch"], moved["position"] = divmod(absolute, per_epoch)
    return moved


def evaluate_split(search: Any, bf16: bool, graph: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """One-shot accuracy and loss of every pool arch, each rank scoring its share; the same on every rank
    (``graph`` as for :func:`~bnao.supernet.evaluate_pool`)."""
    archs = search.pool.archs.astype(np.int64)
    start, stop = split_evenly(len(archs))
    batches = search.dev_batches
    random = isinstance(batches, RandomBatches)
    if random:
        begin = batches.state_dict()
        per_epoch = len(batches.loader)
        batches.load_state_dict(advance_loader_state(begin, start * batches.count, per_epoch))
    if stop > start:
        acc, loss = evaluate_pool(search.model, archs[start:stop], batches, bf16=bf16, graph=graph)
    else:  # more ranks than archs
        acc, loss = np.zeros(0), np.zeros(0)
    parts = gather_objects((acc, loss), "the pool evaluation")
    if random:  # where one process would stand after scoring the whole pool
        batches.load_state_dict(advance_loader_state(begin, len(archs) * batches.count, per_epoch))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def controller_and_generate(search: Any, it: int, started: float) -> None:
    """The controller and generation phases: computed on rank 0, their outcome broadcast to every rank.

    Rank 0 runs them as one unit (no stop check in between), so every rank waits in exactly one broadcast.
    When rank 0 fails, the others are told so in that broadcast and raise :class:`DistributedError`.
    """
    context = current()
    if context.is_main:
        try:
            if search.state["phase"] == "controller":
                search._phase_controller(it, started)
            search._phase_generate(it, started)
        except BaseException as err:
            broadcast_object({"failure": f"{type(err).__name__}: {err}"}, "the controller phase")
            raise
        payload = {"pool": search.pool.state_dict(), "state": search.state, "history": search.history}
        broadcast_object(payload, "the controller phase")
        return
    payload = broadcast_object(None, "the controller phase")
    if "failure" in payload:
        raise DistributedError(f"rank 0 failed in the controller phase of iteration {it} ({payload['failure']}); "
                               "see its output")
    search.pool.load_state_dict(payload["pool"])
    search.state = payload["state"]
    search.history = payload["history"]
    search._prepare_iteration()


def rerank_split(archs: Sequence[Any], space: Any, train_data: Any, dev_data: Any, *, device: Any,
                 checkpoint_dir: Path, progress: bool = False, **settings: Any) -> List[Dict[str, Any]]:
    """:func:`bnao.train.rerank` with the archs spread over the ranks; the full ranking on every rank.

    Args:
        archs: Candidates, best one-shot score first.
        space: Their search space.
        train_data: Training split.
        dev_data: Split the score is measured on.
        device: This rank's device.
        checkpoint_dir: Folder of the per-arch checkpoints (``rerank_<i>_<hash>.pt``, as one process names them).
        progress: Progress bars.
        **settings: :class:`~bnao.train.StandaloneConfig` fields.

    Returns:
        One dict per arch, best first, as :func:`bnao.train.rerank` returns them.
    """
    from ..train import train_standalone

    context = current()
    settings.setdefault("eval_every", 0)
    mine = []
    for i in range(context.rank, len(archs), context.world_size):
        arch = space.arch(archs[i])
        result = train_standalone(arch, space, train_data, dev_data, device=device,
                                  checkpoint_path=Path(checkpoint_dir) / f"rerank_{i}_{space.hash(arch)}.pt",
                                  progress=progress, **settings)
        result["index"], result["dev_acc"] = i, result["eval_acc"]
        mine.append(result)
    results = [r for part in gather_objects(mine, "the re-rank") for r in part]
    results.sort(key=lambda r: (-(r["dev_acc"] or 0.0), r["index"]))
    for rank, result in enumerate(results, 1):
        result["rank"] = rank
    return results


__all__ = ["advance_loader_state", "controller_and_generate", "evaluate_split", "rerank_split"]
