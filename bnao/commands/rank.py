"""``bnao rank``: one-shot vs stand-alone ranking correlation, uniform vs size-proportional sampling."""

from __future__ import annotations

import argparse
import shlex
import sys

from .errors import report_error

HELP = "ranking correlation of one-shot and stand-alone accuracy (uniform vs proportional sampling)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  bnao rank --config demo --out runs/rank-demo\n"
        "  bnao rank --config fashion-mnist --out runs/rank-fm archs.count=30 supernet.seeds=[0,1,2]\n"
        "  bnao rank --config demo --out runs/rank-similar archs.mode=similar\n"
        "presets live in configs/rank/; every key can be overridden as key=value"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. archs.count=20")
    parser.add_argument("--config", "-c", default=None, help="preset name (demo, fashion-mnist) or YAML file")
    parser.add_argument("--out", "-o", required=True, help="output folder (results.json, results.md, plots/)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="ground-truth cache folder (default ~/.cache/bnao/rank or $BNAO_RANK_CACHE)")
    parser.add_argument("--data-dir", default=None, help="data directory (sets data.root)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets device)")
    parser.add_argument("--overwrite", action="store_true", help="replace results that --out already holds")


def _error(message: str, code: int = 2) -> int:
    return report_error("rank", message, code)


def run(args: argparse.Namespace) -> int:
    from ..data import DatasetNotFoundError
    from ..rank import load_rank_config, run_rank
    from ..search.config import ConfigError
    from ..signals import GracefulStop, Stopped

    overrides = list(args.overrides)
    for flag, key in (("data_dir", "data.root"), ("device", "device"), ("cache", "cache")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        config = load_rank_config(args.config, overrides)
        with GracefulStop() as stop:  # SIGTERM/Ctrl-C: in-process trainings stop at a step boundary
            try:
                run_rank(config, args.out, overwrite=args.overwrite, echo=lambda line: print(line, flush=True))
            except Stopped as stopped:
                again = " ".join(["bnao rank", *(["--config", args.config] if args.config else []), "--out", args.out,
                                  *(shlex.quote(o) for o in args.overrides)])
                print(f"bnao rank: stopped by {stop.signal_name} at {stopped.where}; finished trainings are cached. "
                      f"Resume with: {again}", file=sys.stderr)
                return stop.exit_code
    except (ConfigError, FileExistsError, DatasetNotFoundError, ValueError) as err:
        return _error(str(err))
    except KeyError as err:  # unknown registry names (dataset, loader, sampler) carry their own message
        return _error(str(err.args[0]) if err.args else repr(err))
    return 0
