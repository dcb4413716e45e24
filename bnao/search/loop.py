"""Balanced NAO, Algorithm 1 of the paper (SPEC section 6), resumable.

The search is a sequence of phases; the position in it (iteration, phase,
step within the supernet phase) is part of every checkpoint, so a run killed
at any moment continues from its last checkpoint and ends with the same pool
and best arch as a run that was never interrupted::

    for it in 0..L:                        (L = search.iterations; it = L is the final round)
        train    the supernet on X_eval, one size-proportional draw per step
        eval     every arch of X with the shared weights  -> S[it]
        (it < L) controller  fit on (X, S[it])
        (it < L) generate    move the top-K seeds uphill, decode new archs -> X_eval; X += X_eval
    rerank   the top archs by S[L] with a short stand-alone training -> best.json
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch

from ..distributed import any_rank, average_buffers, current, rank_device
from ..signals import Stopped, stop_requested
from ..supernet import RandomBatches, evaluate_pool
from ..supernet.evaluator import last_evaluation
from .components import SearchComponents
from .config import diff
from .config_checks import check_config
from .distributed_phases import controller_and_generate, evaluate_split
from .finish import ResultPhases
from .report import Scalars, size_buckets
from .resume import RESTORE_MAY_DIFFER, rescale_loader_state
from .rundir import RunDir, RunDirError

PHASES = ("train", "eval", "controller", "generate")


class _StopAtStep(Exception):
    """Raised by the trainer's per-step callback when a stop was requested; carries the steps done."""

    def __init__(self, steps: int):
        super().__init__(steps)
        self.steps = steps


class BalancedNAO(SearchComponents, ResultPhases):
    """One search run in a run directory.

    Args:
        config: Resolved configuration (see :mod:`bnao.search.config`).
        run_dir: Where everything is written.
        progress: Show progress bars (tqdm) for long phases.
        echo: Called with each summary line (default ``print``).
    """

    def __init__(
        self,
        config: Dict[str, Any],
        run_dir: RunDir,
        *,
        progress: bool = True,
        echo: Callable[[str], None] = print,
    ):
        # The same up-front check as the command's: a caller of the API gets a bad value refused before any work.
        self.config = check_config(copy.deepcopy(config))
        self.run_dir = run_dir
        # Bars only on a terminal: redirected to a file they are noise.
        self.progress = progress and sys.stderr.isatty()
        self._echo = echo
        # One process, or one of several started by torchrun (bnao.distributed): rank 0 writes and prints.
        self.parallel = current()
        run_dir.writes = run_dir.writes and self.parallel.is_main
        self.device = rank_device(config["device"], self.parallel)
        if int(config["threads"]) > 0:
            torch.set_num_threads(int(config["threads"]))
        self.state: Dict[str, Any] = {"iteration": 0, "phase": "init", "elapsed": 0.0, "eval_indices": None}
        self.draws: List[Dict[str, np.ndarray]] = []  # per iteration: pool indices trained and draw counts
        self.history: List[Dict[str, Any]] = []
        self._build()

    # ----------------------------------------------------------- state i/o
    def echo(self, line: str) -> None:
        if self.parallel.is_main:
            self._echo(line)
            self.run_dir.log(line)

    def checkpoint(self) -> None:
        """Saves everything needed to continue exactly (atomically), then says where the run is.

        Rank 0 writes; every rank holds the same state (no collective here, so rank 0 may call it alone).
        """
        if not self.parallel.is_main:
            return
        self.run_dir.save_checkpoint(
            {
                "format": 1,
                "config": self.config,
                "state": self.state,
                "pool": self.pool.state_dict(),
                "trainer": self.trainer.state_dict(),
                "controller": self.controller.state_dict(),
                "draws": self.draws,
                "history": self.history,
                "eval_data": self.dev_batches.state_dict() if isinstance(self.dev_batches, RandomBatches) else None,
            }
        )
        self.run_dir.write_json(
            self.run_dir.progress_path,
            {k: self.state.get(k) for k in ("iteration", "phase", "train_step", "elapsed")},
        )

    def restore(self, ckpt: Dict[str, Any]) -> None:
        """Loads a checkpoint written by :meth:`checkpoint`."""
        # Keys a resume may change (batch sizes, device, ...) were checked and recorded by the caller.
        changed = [line for line in diff(ckpt["config"], self.config) if line.split(":")[0] not in RESTORE_MAY_DIFFER]
        if changed:
            raise RunDirError("the checkpoint was written with another config:\n  " + "\n  ".join(changed))
        self.state = ckpt["state"]
        self.pool.load_state_dict(ckpt["pool"])
        idx = self.state["eval_indices"]
        self.sampler.set_weights(self.pool.sizes[idx].astype(np.float64))
        self.trainer.set_pool(self.pool.archs[idx].astype(np.int64))
        trainer_state = dict(ckpt["trainer"])
        if "loader" in trainer_state:  # a resume may change the batch size: same image, new batch index
            trainer_state["loader"] = rescale_loader_state(trainer_state["loader"], self.train_loader.batch_size)
        self.trainer.load_state_dict(trainer_state)
        self.controller.load_state_dict(ckpt["controller"])
        self.draws = ckpt["draws"]
        self.history = ckpt["history"]
        if isinstance(self.dev_batches, RandomBatches) and ckpt.get("eval_data") is not None:
            self.dev_batches.load_state_dict(rescale_loader_state(ckpt["eval_data"], self.dev_batches.loader.batch_size))

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        """Runs (or continues) the search to the end; returns the best arch record."""
        self.scalars = Scalars(self.run_dir.tb if self.parallel.is_main else None,
                               purge_step=self._global_step() or None)
        started = time.perf_counter() - float(self.state["elapsed"])
        try:
            while self.state["phase"] != "done":
                # Every phase ends with a checkpoint: this is a step boundary (agreed by all ranks).
                if any_rank(stop_requested(), "a stop check"):
                    raise Stopped(self.position())
                it, phase = int(self.state["iteration"]), self.state["phase"]
                if phase == "init":
                    self._start_iteration(0)
                elif phase == "train":
                    self._phase_train(it, started)
                elif phase == "eval":
                    self._phase_eval(it, started)
                elif phase in ("controller", "generate") and self.parallel.enabled:
                    controller_and_generate(self, it, started)
                elif phase == "controller":
                    self._phase_controller(it, started)
                elif phase == "generate":
                    self._phase_generate(it, started)
                elif phase == "rerank":
                    self._phase_rerank(started)
                elif phase == "final":
                    self._phase_final(started)
        finally:
            self.scalars.close()
        return self.run_dir_best()

    def run_dir_best(self) -> Dict[str, Any]:
        """The best arch record (kept in the state too, so that every rank has it without reading a file)."""
        return best_record(self.state, self.run_dir)

    def _global_step(self) -> int:
        return int(self.trainer.global_step) if hasattr(self.trainer, "global_step") else 0

    def position(self) -> str:
        """Where the run stands, e.g. ``iteration 1, phase train, step 40``."""
        where = f"iteration {self.state['iteration']}, phase {self.state['phase']}"
        if self.state["phase"] == "train":
            where += f", step {self.state['train_step']}"
        return where

    def _step_boundary(self, bar) -> Callable[[int], None]:
        """The trainer's per-step callback: advances the bar and stops at the step boundary when asked."""
        done = [0]
        sync = self.trainer.data_parallel

        def on_step(steps: int) -> None:
            done[0] += steps
            if bar:
                bar.update(steps)
            # Several processes stop at the step where any of them was asked to (the flag rode the all-reduce).
            if sync.stop_agreed if sync is not None else stop_requested():
                raise _StopAtStep(done[0])

        return on_step

    def _advance(self, phase: str, started: float) -> None:
        self.state["phase"] = phase
        self.state["elapsed"] = time.perf_counter() - started
        self.checkpoint()

    def _start_iteration(self, it: int) -> None:
        self._prepare_iteration()
        self.state.update(iteration=it, phase="train", train_step=0, phase_seconds={})
        self.checkpoint()

    def _prepare_iteration(self) -> None:
        """Points the sampler and the trainer at this iteration's archs and restarts the schedule."""
        idx = np.asarray(self.state["eval_indices"])
        self.sampler.set_weights(self.pool.sizes[idx].astype(np.float64))
        self.trainer.set_pool(self.pool.archs[idx].astype(np.int64))
        self.trainer.restart_schedule(self.steps_per_iteration)

    def _phase_train(self, it: int, started: float) -> None:
        every = int(self.config["supernet"]["checkpoint_every"])
        total = self.steps_per_iteration
        t0 = time.perf_counter()
        bar = self._bar(total, f"iter {it} supernet", initial=int(self.state["train_step"]))
        stats: Dict[str, float] = {}
        while self.state["train_step"] < total:
            # Chunks end on multiples of `every` even after a graceful stop mid-chunk, so a resumed
            # run checkpoints (and summarises its last chunk) where an uninterrupted one does.
            n = min(every - int(self.state["train_step"]) % every, total - int(self.state["train_step"]))
            try:
                stats = self.trainer.train_steps(n, progress=self._step_boundary(bar))
            except _StopAtStep as stop:
                average_buffers(self.model)  # the chunk ended early: one model on every rank before the checkpoint
                self.state["train_step"] = int(self.state["train_step"]) + stop.steps
                self._advance("train", started)
                raise Stopped(self.position()) from None
            self.state["train_step"] = int(self.state["train_step"]) + n
            self.scalars.add_many("supernet", stats, self._global_step())
            self._advance("train", started)
        if bar:
            bar.close()
        idx = np.asarray(self.state["eval_indices"])
        counts = np.asarray(self.trainer.draw_counts(), dtype=np.int64)
        self.draws.append({"index": idx, "draws": counts})
        for b in size_buckets(self.pool.sizes[idx], counts):
            self.scalars.add(f"draws/size_bucket_{b['bucket']}_share", b["draw_share"], it)
            self.scalars.add(f"draws/size_bucket_{b['bucket']}_target", b["size_share"], it)
        self.state["phase_seconds"]["train"] = time.perf_counter() - t0
        self.state["train_stats"] = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        # How the steps ran (replayed CUDA graphs, uncaptured, eager) and why: the first thing to check in a slow run.
        self.state["step_path"] = dict(self.trainer.graph_status)
        self._advance("eval", started)

    def _phase_eval(self, it: int, started: float) -> None:
        t0 = time.perf_counter()
        if self.parallel.enabled:
            acc, loss = evaluate_split(self, bf16=self.config["supernet"]["bf16"],
                                       graph=self.config["supernet"]["graph"])
        else:
            acc, loss = evaluate_pool(self.model, self.pool.archs.astype(np.int64), self.dev_batches,
                                      bf16=self.config["supernet"]["bf16"], graph=self.config["supernet"]["graph"])
        self.pool.set_scores(it, acc)
        self.state["phase_seconds"]["eval"] = time.perf_counter() - t0
        self.state["eval_path"] = dict(last_evaluation)
        self.scalars.add("eval/best_one_shot", float(np.max(acc)), it)
        self.scalars.add("eval/mean_one_shot", float(np.mean(acc)), it)
        self.scalars.add("eval/mean_loss", float(np.mean(loss)), it)
        final = it >= int(self.config["search"]["iterations"])
        self._write_outputs()
        if final:
            self._summary(it, started)
            self._advance("rerank", started)
        else:
            self._advance("controller", started)

    def _phase_controller(self, it: int, started: float) -> None:
        cc = self.config["controller"]
        t0 = time.perf_counter()
        scores = self.pool.scores[it]
        bar = self._bar(int(cc["epochs"]), f"iter {it} controller")
        metrics = self.controller.fit(
            self.pool.archs.astype(np.int64), scores, epochs=cc["epochs"], batch_size=cc["batch_size"], lr=cc["lr"],
            trade_off=cc["trade_off"], expand=cc["expand"], expand_redraw=cc["expand_redraw"], graph=cc["graph"],
            progress=(lambda e, n, m: bar.update(1)) if bar else None,
        )
        if bar:
            bar.close()
        self.pool.predicted = self.controller.predict(self.pool.archs.astype(np.int64)).astype(np.float32)
        self.state["phase_seconds"]["controller"] = time.perf_counter() - t0
        self.state["controller_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.state["controller_path"] = dict(metrics["graph"])
        self.scalars.add_many("controller", self.state["controller_metrics"], it)
        self._advance("generate", started)

    def _phase_generate(self, it: int, started: float) -> None:
        sc = self.config["search"]
        t0 = time.perf_counter()
        seeds = self.pool.archs[self.pool.top(int(sc["top_k"]), self.pool.scores[it])].astype(np.int64)
        new, info = self.controller.generate(
            seeds, int(sc["new_per_iteration"]), exclude_hashes=self.pool.hashes, return_info=True,
            accept=self.budget.mask if self.budget.active else None,
        )
        if self.budget.active:
            self.echo(f"iteration {it}: {len(new)} of {sc['new_per_iteration']} new archs decoded inside the budget "
                      f"in {info['rounds']} rounds; {info['rejected']} decoded archs outside it turned down")
        added = self.pool.add(new, self._sizes(new), iteration=it + 1) if len(new) else np.zeros(0, np.int64)
        from_controller = int(added.size)
        missing = int(sc["new_per_iteration"]) - from_controller
        if missing > 0 and sc["fill_with_mutations"]:
            # A young controller can decode the same few archs over and over; the
            # iteration still gets the requested number of new archs, as
            # one-position mutations of the seeds (seeded, so resumable).
            rng = np.random.default_rng([int(self.config["seed"]), it, 7])
            extra = self._mutations(seeds, missing, rng)
            more = self.pool.add(extra, self._sizes(extra), iteration=it + 1) if len(extra) else extra[:0, 0]
            added = np.concatenate([added, more])
        info["from_controller"] = from_controller
        self.state["phase_seconds"]["generate"] = time.perf_counter() - t0
        self.state["generated"] = int(added.size)
        self.state["generate_info"] = {k: v for k, v in info.items() if isinstance(v, (int, float))}
        self._summary(it, started)
        if added.size == 0:
            self.echo(f"iteration {it}: the controller found no new arch; the next round retrains the last X_eval")
        else:
            self.state["eval_indices"] = added
        self._write_outputs()
        self._start_iteration(it + 1)

    def _mutations(self, seeds: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``count`` new archs (unseen in the pool) by mutating random seeds."""
        found, hashes = [], set(self.pool.hashes.tolist())
        for _ in range(50 * count):
            if len(found) == count:
                break
            child = self.space.mutate(seeds[rng.integers(len(seeds))], rng).to_array()
            h = int(self.space.hash_array(child))
            if h not in hashes and self.budget.mask(child)[0]:
                hashes.add(h)
                found.append(child)
        return np.stack(found) if found else np.zeros((0, self.space.length), np.int64)

    def _bar(self, total: int, desc: str, initial: int = 0):
        if not self.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def best_record(state: Dict[str, Any], run_dir) -> Dict[str, Any]:
    """The best arch record of a search state: the state's copy, else the run directory's ``best.json``.

    Args:
        state: a search state (``BalancedNAO.state`` or a checkpoint's ``"state"``).
        run_dir: the run's :class:`~bnao.search.rundir.RunDir`.
    """
    import json

    if "best" in state:
        return dict(state["best"])
    return json.loads(run_dir.best_path.read_text())
