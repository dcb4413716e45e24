"""The end of a search and its outputs: the re-rank, the winner's final training, summaries, files.

:class:`ResultPhases` is a part of :class:`~bnao.search.loop.BalancedNAO` (its state, pool, run
directory and config), kept apart so that the loop module holds the search phases of Algorithm 1.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np

from ..metrics import kendall_tau, pairwise_accuracy
from .distributed_phases import rerank_split
from .final import standalone_settings, train_best
from .pareto import write_run_fronts
from .report import fmt_seconds, write_plots


class ResultPhases:
    """Re-rank, final training, per-iteration summary and output files of a search."""

    def _phase_rerank(self, started: float) -> None:
        from ..train import rerank

        c = self.config
        fc = c["final"]
        it = int(self.state["iteration"])
        scores = self.pool.scores[it]
        # Every pool arch is inside the budget by construction; the mask makes the re-rank's own guarantee.
        top = self.pool.top(int(fc["rerank_top"]), np.where(self.budget.mask(self.pool.archs[: scores.size]), scores, np.nan))
        t0 = time.perf_counter()
        results = (rerank_split if self.parallel.enabled else rerank)(
            self.pool.archs[top].astype(np.int64), self.space, self.train_set, self.dev_set,
            device=self.device, checkpoint_dir=self.run_dir.path / "rerank", progress=self.progress,
            **standalone_settings(c, self.num_classes, self.in_channels),
        )
        ranking = []
        for res in results:
            i = int(top[res["index"]])
            ranking.append(
                {
                    "arch": " ".join(map(str, self.pool.archs[i].tolist())),
                    "hash": f"{int(self.pool.hashes[i]):016x}",
                    "size": int(self.pool.sizes[i]),
                    "one_shot": float(scores[i]),
                    "one_shot_rank": int(res["index"]) + 1,
                    "standalone_accuracy": float(res["dev_acc"]),
                    "standalone_params": int(res["params"]),
                    "standalone_seconds": float(res["seconds"]),
                    "standalone_train_images": int(len(self.train_set)),
                }
            )
        ranking.sort(key=lambda r: -r["standalone_accuracy"])
        self.run_dir.write_jsonl(self.run_dir.ranking_path, ranking)
        if self.parallel.is_main:
            write_run_fronts(self.run_dir.path, self.pool, self.budget, ranking)
        best = dict(ranking[0])
        best["search_seconds"] = time.perf_counter() - started
        self.run_dir.write_json(self.run_dir.best_path, best)
        self.state["best"] = best
        self.state["phase_seconds"]["rerank"] = time.perf_counter() - t0
        self.echo(
            f"best arch: {best['arch']}\n  model size {best['size']:,} params, one-shot {best['one_shot']:.4f}, "
            f"stand-alone dev accuracy {best['standalone_accuracy']:.4f} ({fc['epochs']} epochs)  "
            f"[search {fmt_seconds(best['search_seconds'])}, re-rank {fmt_seconds(self.state['phase_seconds']['rerank'])}]"
        )
        self._advance("final" if int(fc["full_epochs"]) > 0 else "done", started)

    def _phase_final(self, started: float) -> None:
        """Trains the re-rank's winner on the whole training split and tests it (``final.full_epochs``)."""
        best = self.run_dir_best()
        t0 = time.perf_counter()
        result = train_best(self.config, best["arch"], self.space, self.run_dir.path, device=self.device,
                            num_classes=self.num_classes, in_channels=self.in_channels, progress=self.progress,
                            echo=self.echo)
        if result is not None:
            best["final"] = result
            best["test_accuracy"] = result["test_accuracy"]
            self.run_dir.write_json(self.run_dir.best_path, best)
            self.state["best"] = best
            self.echo(
                f"final training: test accuracy {result['test_accuracy']:.4f} after {result['epochs']} epochs on "
                f"{result['train_images']:,} images ({result['test_images']:,} test images) "
                f"[{fmt_seconds(time.perf_counter() - t0)}]; model saved to {result['model_file']}"
            )
        self.state["phase_seconds"]["final"] = time.perf_counter() - t0
        self._advance("done", started)

    # --------------------------------------------------------------- output
    def _summary(self, it: int, started: float) -> None:
        ps = self.state.get("phase_seconds", {})
        scores = self.pool.scores[it]
        ts = self.state.get("train_stats", {})
        record = {
            "iteration": it,
            "pool": len(self.pool),
            "trained_archs": int(np.asarray(self.state["eval_indices"]).size),
            "best_one_shot": float(np.max(scores)),
            "mean_one_shot": float(np.mean(scores)),
            "train_loss": ts.get("loss"),
            "img_per_s": ts.get("img_per_s"),
            "phase_seconds": dict(ps),
            "elapsed": time.perf_counter() - started,
            "step_path": self.state.get("step_path"),
            "eval_path": self.state.get("eval_path"),
        }
        cm = self.state.get("controller_metrics") if it < int(self.config["search"]["iterations"]) else None
        line = (
            f"iter {it}: pool {len(self.pool)} | supernet {self.steps_per_iteration} steps"
            f" {ts.get('img_per_s', float('nan')):.0f} img/s loss {ts.get('loss', float('nan')):.3f}"
            f" ({fmt_seconds(ps.get('train', 0))}{_path_text(record['step_path'])}) | eval best"
            f" {record['best_one_shot']:.4f} mean {record['mean_one_shot']:.4f}"
            f" ({fmt_seconds(ps.get('eval', 0))}{_path_text(record['eval_path'])})"
        )
        if cm:
            record["controller"] = cm
            record["controller_path"] = self.state.get("controller_path")
            record["generated"] = self.state.get("generated")
            line += (
                f" | controller pairwise {cm.get('pairwise_accuracy', float('nan')):.3f}"
                f" recon {cm.get('reconstruction_token', float('nan')):.3f} ({fmt_seconds(ps.get('controller', 0))}"
                f"{_path_text(record['controller_path'])})"
                f" | +{self.state.get('generated', 0)} new"
                f" ({self.state.get('generate_info', {}).get('from_controller', 0)} decoded)"
            )
        if it > 0 and len(self.pool.scores) > 1:
            prev = self.pool.scores[it - 1]
            n = prev.size
            record["pairwise_vs_previous"] = float(pairwise_accuracy(prev, scores[:n]))
            record["kendall_vs_previous"] = float(kendall_tau(prev, scores[:n]))
        line += f" | {fmt_seconds(record['elapsed'])}"
        self.history.append(record)
        # Rewritten whole from the checkpointed history, so a resumed run never repeats a line.
        self.run_dir.write_jsonl(self.run_dir.history_path, self.history)
        self.echo(line)

    def _write_outputs(self) -> None:
        if not self.parallel.is_main:
            return
        self.pool.write_jsonl(str(self.run_dir.pool_path), columns=self.budget.columns(self.pool.archs))
        why = write_plots(self.run_dir.plots, self.pool, self.draws)
        write_run_fronts(self.run_dir.path, self.pool, self.budget)
        if why and not getattr(self, "_plot_warned", False):
            self._plot_warned = True
            self.echo(why)
        self.scalars.flush()


def _path_text(path: Optional[Dict[str, str]]) -> str:
    """How a phase ran: ``", graph"`` (replayed CUDA graphs), ``", eager"``, or ``", uncaptured: why"`` (graphs
    were meant to run but did not, e.g. a failed capture); empty when unknown (a checkpoint from before these
    were recorded). The history records keep the reason in every case."""
    if not path:
        return ""
    return f", uncaptured: {path['reason']}" if path["mode"] == "uncaptured" else f", {path['mode']}"
