"""``bnao search``: Balanced NAO end to end, in a resumable run directory."""

from __future__ import annotations

import argparse
import sys

HELP = "run Balanced NAO end to end (Algorithm 1)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  bnao search --config demo --out runs/demo\n"
        "  bnao search --config cifar10 --out runs/c10 supernet.epochs=10 sampler.name=uniform\n"
        "  bnao search --resume runs/c10\n"
        "every config key can be overridden as key=value (see configs/*.yaml for the keys)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. search.iterations=2")
    parser.add_argument("--config", "-c", default=None, help="preset name (demo, cifar10, cifar100, imagenet) or YAML file")
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
    print(f"bnao search: error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from ..data import DatasetNotFoundError
    from ..space import InvalidArchError
    from ..search.config import ConfigError, apply_overrides, diff, load_config, parse_overrides
    from ..search.pool import PoolFileError
    from ..search.rundir import RunDir, RunDirError

    overrides = list(args.overrides)
    for flag, key in (("pool", "search.pool_file"), ("data_dir", "data.root"), ("device", "device"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.skip_invalid:
        overrides.append("search.skip_invalid=true")

    try:
        if args.resume:
            if args.out and args.out != args.resume:
                return _error("give either --out (new run) or --resume (continue a run), not both")
            run_dir = RunDir(args.resume)
            config = run_dir.read_config()
            wanted = apply_overrides(load_config(args.config), parse_overrides(overrides)) if args.config else (
                apply_overrides(config, parse_overrides(overrides))
            )
            changed = diff(config, wanted)
            if changed:
                return _error(
                    f"the config differs from the one {args.resume} was started with; a resumed run must keep it:\n  "
                    + "\n  ".join(changed)
                )
        else:
            if not args.out:
                return _error("--out RUN_DIR is required (or --resume RUN_DIR)")
            config = load_config(args.config, overrides)
            run_dir = RunDir(args.out)
            run_dir.create(config, overwrite=args.overwrite)
    except (ConfigError, RunDirError) as err:
        return _error(str(err))

    from ..search.loop import BalancedNAO

    try:
        search = BalancedNAO(config, run_dir, progress=not args.no_progress)
        if args.resume:
            ckpt = run_dir.load_checkpoint()
            if ckpt is not None:
                search.restore(ckpt)
                search.echo(
                    f"resuming {args.resume}: iteration {ckpt['state']['iteration']}, phase {ckpt['state']['phase']}"
                )
        search.run()
    except (ConfigError, RunDirError, PoolFileError, InvalidArchError, FileNotFoundError, DatasetNotFoundError,
            ValueError) as err:  # ValueError: bad values the config types cannot catch (device, sizes)
        return _error(str(err))
    except KeyError as err:  # unknown registry names (dataset, loader, sampler) carry their own message
        return _error(str(err.args[0]) if err.args else repr(err))
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            return _error(
                f"CUDA out of memory ({str(err).splitlines()[0]}). Lower supernet.batch_size or "
                f"supernet.eval_batch_size, or set supernet.bf16=true; the run keeps its last checkpoint: "
                f"continue with `bnao search --resume {run_dir.path} ...` once the config fits "
                "(batch sizes are part of the config, so start a new run if you change them)",
                code=1,
            )
        if type(err).__name__ == "NonFiniteLossError":
            return _error(f"{err}\nthe last good checkpoint is in {run_dir.checkpoint_path}", code=1)
        raise
    print(f"run directory: {run_dir.path} (best.json, ranking.jsonl, pool.jsonl, plots/, tb/)")
    return 0
