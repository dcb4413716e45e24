"""``bnao search``: Balanced NAO end to end, in a resumable run directory."""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import report_error

HELP = "run Balanced NAO end to end (Algorithm 1)"


def _preset_names() -> str:
    """The presets as the help lists them, read from ``configs/`` so that a new preset is never left out."""
    from ..search.config import list_presets

    return ", ".join(list_presets()) or "none found"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  bnao search --config demo --out runs/demo\n"
        "  bnao search --config cifar10 --out runs/c10 supernet.epochs=10 sampler.name=uniform\n"
        "  bnao search --resume runs/c10\n"
        "  torchrun --nproc_per_node=4 -m bnao search --config cifar10 --out runs/c10  (several GPUs)\n"
        "every config key can be overridden as key=value (see configs/*.yaml for the keys)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. search.iterations=2")
    parser.add_argument("--config", "-c", default=None, help=f"preset name ({_preset_names()}) or YAML file")
    parser.add_argument("--out", "-o", default=None, help="run directory to create")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run that --out already holds")
    parser.add_argument("--pool", default=None, metavar="FILE", help="initial pool: one arch per line (sets search.pool_file)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip invalid archs of the pool file instead of failing")
    parser.add_argument("--data-dir", default=None, help="data directory (sets data.root)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets device)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (sets seed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")


def _error(message: str, code: int = 2) -> int:
    return report_error("search", message, code)


def _resume_config(args: argparse.Namespace, run_dir, overrides):
    """The run's config and the config asked for on resume (:func:`_launch` checks the changes)."""
    from ..search.config import DEFAULTS, apply_overrides, load_config, parse_overrides
    from ..search.config_checks import check_config

    config = run_dir.read_config()
    # Runs from before the distributed section ran as one process: its defaults describe them.
    config.setdefault("distributed", copy.deepcopy(DEFAULTS["distributed"]))
    wanted = apply_overrides(load_config(args.config), parse_overrides(overrides)) if args.config else (
        apply_overrides(config, parse_overrides(overrides))
    )
    return config, check_config(wanted)


def _launch(config, old_config):
    """Joins torchrun's process group (when launched by it) and records how the run is launched.

    Returns:
        ``(context, config, changes)``: ``config`` with ``distributed.world_size``, ``backend`` and ``hosts``
        set; ``changes`` are its resumable changes from ``old_config`` (None for a new run).
    """
    from ..distributed import init_from_env, launch_record
    from ..search.resume import split_changes

    context = init_from_env(config["device"], float(config["distributed"]["timeout_s"]))
    config = copy.deepcopy(config)
    config["distributed"].update(launch_record(context))
    if context.world_size == 1:
        config["distributed"]["hosts"] = ""  # a single-process run stays movable between machines unremarked
    return context, config, (split_changes(old_config, config) if old_config is not None else None)


def _prepare_run_dir(args, context, run_dir, config, changes):
    """Rank 0 creates the run directory (a new run); every rank learns whether that worked.

    Returns:
        None, or ``(message, exit code)`` (the same on every rank).
    """
    from ..distributed import broadcast_object
    from ..safe_io import FileWriteError
    from ..search.rundir import RunDirError

    problem = None
    if context.is_main and not args.resume:
        try:
            run_dir.create(config, overwrite=args.overwrite)
        except RunDirError as err:
            problem = (str(err), 2)
        except FileWriteError as err:  # the disk, not the request: exit code 1 as for any failed write
            problem = (str(err), 1)
    return broadcast_object(problem, "creating the run directory")


def _record_changes(run_dir, config, changes) -> None:
    """Writes the resumable changes into the run directory and says that exact replay is gone.

    A change of where the data lives alone (``data.root``) only updates config.yaml: the data is the same.
    """
    from ..search.resume import describe_changes, replay_changes

    changes = replay_changes(changes)
    if not changes:
        run_dir.write_config(config)
        return
    run_dir.record_changes({k: list(v) for k, v in changes.items()}, config)
    print(f"bnao search: warning: resuming with {describe_changes(changes)} (recorded in {run_dir.changes_path}); "
          "the run no longer replays an uninterrupted run exactly", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Runs ``bnao search``; returns the exit code.

    Returns:
        0 when the search finished; 2 for bad input (flags, config, run directory, pool, data); 1 when the
        work itself failed (a write, out of memory, a non-finite loss); the signal's code when one stopped it.
    """
    from ..distributed import shutdown

    opened = _open_run(args, _collect_overrides(args))
    if isinstance(opened, int):
        return opened
    run_dir, config, context, changes = opened
    exit_code = _search(args, run_dir, config, context, changes)
    if exit_code is not None:
        return exit_code
    if context.is_main:
        print(f"run directory: {run_dir.path} (best.json, ranking.jsonl, pool.jsonl, plots/, tb/)")
    shutdown()
    return 0


def _collect_overrides(args: argparse.Namespace) -> List[str]:
    """The KEY=VALUE overrides, followed by those the dedicated flags (--pool, --data-dir, ...) stand for."""
    overrides = list(args.overrides)
    for flag, key in (("pool", "search.pool_file"), ("data_dir", "data.root"), ("device", "device"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.skip_invalid:
        overrides.append("search.skip_invalid=true")
    return overrides


def _open_run(args: argparse.Namespace, overrides: List[str]) -> Union[int, Tuple[Any, Dict[str, Any], Any, Dict]]:
    """Loads the config, joins the process group and creates (new run) or opens (--resume) the run directory.

    Returns:
        ``(run_dir, config, context, changes)``, with ``changes`` the resumable config changes of a resumed
        run (empty otherwise); or the exit code, the error already reported.
    """
    from ..distributed import DistributedError
    from ..safe_io import FileWriteError
    from ..search.config import ConfigError, load_config
    from ..search.config_checks import check_config
    from ..search.rundir import RunDir, RunDirError

    old_config = None
    try:
        if args.resume:
            if args.out and args.out != args.resume:
                return _error("give either --out (new run) or --resume (continue a run), not both")
            run_dir = RunDir(args.resume)
            old_config, config = _resume_config(args, run_dir, overrides)
        else:
            if not args.out:
                return _error("--out RUN_DIR is required (or --resume RUN_DIR)")
            # Every value is checked before the run directory is written and any work is done.
            config = check_config(load_config(args.config, overrides))
            run_dir = RunDir(args.out)
        context, config, changes = _launch(config, old_config)
        problem = _prepare_run_dir(args, context, run_dir, config, changes)
        if problem:
            return _error(*problem)
    except (ConfigError, RunDirError, DistributedError) as err:
        return _error(str(err))
    except FileWriteError as err:
        return _error(str(err), code=1)
    run_dir.writes = context.is_main
    return run_dir, config, context, changes or {}


def _search(args: argparse.Namespace, run_dir, config: Dict[str, Any], context, changes: Dict) -> Optional[int]:
    """Builds the search (restored from the checkpoint on --resume) and runs it to the end.

    Returns:
        None when the search finished; otherwise the exit code, the error or the stop already reported.
    """
    from ..data import DatasetNotFoundError
    from ..distributed import DistributedError
    from ..safe_io import CheckpointError, FileWriteError
    from ..signals import GracefulStop, Stopped
    from ..space import InvalidArchError
    from ..search.config import ConfigError
    from ..search.pool import PoolFileError
    from ..search.rundir import RunDirError
    from ..search.loop import BalancedNAO, best_record

    search = None
    try:
        with GracefulStop() as stop:
            config, checkpoint = _read_checkpoint(args, run_dir, config, context, changes)
            if checkpoint is not None and checkpoint["state"].get("phase") == "done":
                # Said from the checkpoint alone: building the search would load the data and the supernet
                # only to find nothing left to do.
                if context.is_main:
                    print(_complete_text(best_record(checkpoint["state"], run_dir), run_dir))
                return None
            search = BalancedNAO(config, run_dir, progress=not args.no_progress and context.is_main)
            _start_search(args, search, checkpoint, run_dir, config, context, changes)
            try:
                search.run()
            except Stopped as stopped:
                if context.is_main:
                    print(f"bnao search: stopped by {stop.signal_name} at {stopped.where}; the checkpoint is "
                          f"written. Resume with: bnao search --resume {run_dir.path}", file=sys.stderr)
                return stop.exit_code
    except (ConfigError, RunDirError, PoolFileError, InvalidArchError, FileNotFoundError, DatasetNotFoundError,
            CheckpointError, DistributedError, ValueError) as err:  # ValueError: bad values the config types cannot catch (device, sizes)
        return _start_failed(args, run_dir, str(err))
    except KeyError as err:  # unknown registry names (dataset, loader, sampler) carry their own message
        return _start_failed(args, run_dir, str(err.args[0]) if err.args else repr(err))
    except FileWriteError as err:
        return _error(str(err), code=1)
    except (RuntimeError, MemoryError) as err:
        exit_code = _report_run_failure(err, search, run_dir, config)
        if exit_code is None:
            raise
        return exit_code
    return None


def _complete_text(best: Dict[str, Any], run_dir) -> str:
    """What a resume of a finished run says: that nothing is left to do, the best arch and where it is recorded."""
    lines = [f"the run in {run_dir.path} is already complete; nothing to resume",
             f"best arch: {best['arch']}"]
    figures = [f"model size {int(best['size']):,} params"]
    if "standalone_accuracy" in best:
        figures.append(f"stand-alone dev accuracy {float(best['standalone_accuracy']):.4f}")
    if "test_accuracy" in best:
        figures.append(f"test accuracy {float(best['test_accuracy']):.4f}")
    lines += ["  " + ", ".join(figures), f"results: {run_dir.best_path} (the best arch), "
              f"{run_dir.ranking_path} (the re-ranked archs)"]
    return "\n".join(lines)


def _start_failed(args: argparse.Namespace, run_dir, message: str) -> int:
    """Reports bad input (exit code 2); a new run refused before its first checkpoint leaves no run directory.

    Otherwise the folder would hold a run that never started, and the corrected command would be refused
    with "already holds a search run".
    """
    if not args.resume:
        run_dir.discard_unstarted()
    return _error(message)


def _read_checkpoint(args: argparse.Namespace, run_dir, config: Dict[str, Any], context,
                     changes: Dict) -> Tuple[Dict[str, Any], Any]:
    """On --resume, the run's last checkpoint (every rank reads the same one), else None.

    Returns:
        ``(config, checkpoint)``: ``config`` keeps the checkpoint's schedule when the resume changes it.
    """
    from ..search.resume import keep_schedule

    if not args.resume:
        return config, None
    warn = (lambda line: print(f"bnao search: warning: {line}", file=sys.stderr)) if context.is_main \
        else (lambda line: None)
    checkpoint = run_dir.load_checkpoint(warn=warn)
    if checkpoint is not None and changes:
        config = keep_schedule(config, checkpoint, changes)
    return config, checkpoint


def _start_search(args: argparse.Namespace, search, checkpoint, run_dir, config: Dict[str, Any], context,
                  changes: Dict) -> None:
    """Restores ``search`` from ``checkpoint`` (when there is one), waits for every rank, says how it runs,
    and records a resume's config changes."""
    from ..distributed import barrier

    if checkpoint is not None:
        search.restore(checkpoint)
        search.echo(f"resuming {args.resume}: {search.position()}")
    barrier("loading the checkpoint")  # rank 0 writes nothing before every rank has read it
    if context.enabled:
        search.echo(f"running on {context.describe()}")
    if args.resume and changes and context.is_main:
        _record_changes(run_dir, config, changes)


def _report_run_failure(err: BaseException, search, run_dir, config: Dict[str, Any]) -> Optional[int]:
    """Reports a RuntimeError or MemoryError that is out of memory or a non-finite loss.

    Returns:
        The exit code (1) once reported; None for any other error, which the caller re-raises.
    """
    from ..search.resume import oom_advice, out_of_memory

    if out_of_memory(err):
        phase = str(search.state.get("phase")) if search is not None else "set-up"
        return _error(oom_advice(err, str(run_dir.path), config, phase), code=1)
    if type(err).__name__ == "NonFiniteLossError":
        return _error(f"{err}\nthe last good checkpoint is in {run_dir.checkpoint_path}", code=1)
    return None
