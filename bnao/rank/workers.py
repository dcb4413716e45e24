"""Running independent training jobs side by side, one CPU thread each.

On a small CPU the nets of this experiment are too small for torch's
intra-op threads to pay off (a sep-conv on 8 channels of 28x28 gives a thread
little to do), while independent nets keep every core busy. So jobs run in a
pool of ``workers`` spawned processes, each with one torch thread and its own
copy of the data (rebuilt from the config, which is cheap and deterministic).
With one worker, or on a GPU, jobs run in the calling process.

Every job runs on exactly one CPU thread wherever it runs, so a result does
not depend on the worker count (floating-point sums are ordered the same way),
and the ground-truth cache stays valid across machines' core counts.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple

import torch

from .common import draw_archs, load_data, make_space, sampling_sizes

JobFn = Callable[[Dict[str, Any], Any], Any]

# The state of a worker process: config, data and space, built once by _init.
_STATE: Dict[str, Any] = {}


def make_state(config: Dict[str, Any]) -> Dict[str, Any]:
    """What a job gets besides its own arguments: config, data, space, the archs and their sampling sizes.

    All of it is a pure function of the config, so every worker process builds the same.
    """
    data, space = load_data(config), make_space(config)
    archs = draw_archs(config, space, data)
    return {"config": config, "data": data, "space": space, "archs": archs,
            "sizes": sampling_sizes(config, space, archs, data)}


def _init(config: Dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _STATE.update(make_state(config))


def _call(fn: JobFn, job: Any) -> Any:
    return fn(_STATE, job)


@contextlib.contextmanager
def one_thread(device: torch.device):
    """torch on one intra-op thread inside the block (CPU only), as in the workers."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_jobs(fn: JobFn, jobs: Sequence[Any], state: Dict[str, Any], workers: int,
             device: torch.device) -> Iterator[Tuple[Any, Any]]:
    """Runs ``fn(state, job)`` for every job; yields ``(job, result)`` as each one finishes.

    Args:
        fn: A module-level function (it is pickled by name for the worker processes).
        jobs: Picklable job descriptions.
        state: The calling process's :func:`make_state` (used when jobs run here).
        workers: Processes side by side (1: in this process).
        device: Where jobs train; jobs on a GPU always run in this process.

    Raises:
        Whatever a job raises, as soon as it does (the other jobs are cancelled).
    """
    jobs = list(jobs)
    if workers <= 1 or device.type != "cpu" or len(jobs) <= 1:
        for job in jobs:
            with one_thread(device):
                result = fn(state, job)
            yield job, result
        return
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_init,
                             initargs=(state["config"],)) as pool:
        pending = {pool.submit(_call, fn, job): job for job in jobs}
        try:
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    yield job, future.result()
        finally:
            for future in pending:
                future.cancel()


__all__ = ["make_state", "one_thread", "run_jobs"]
