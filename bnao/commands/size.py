"""``bnao size``: model size (parameters, multiply-adds) of architectures.

Archs come as arguments (each quoted: ``"0 1 0 1 ..."``) or one per line from
``--file`` (``-`` reads stdin; blank lines and ``#`` comments are skipped).
Prints one count per line, in input order (``--measure both``: two columns,
parameters then multiply-adds). An invalid arch is reported with its line
number (or argument number) and the exit code is 2. ``--range`` prints instead
the exact smallest and largest sizes of the whole space at that network, with
an arch of each (what a search budget can ask for); it sizes no arch, so it is
refused together with archs or ``--file``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Tuple

import numpy as np

from .errors import report_error

HELP = "model size (parameters, multiply-adds) of architectures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``bnao size``."""
    parser.add_argument("archs", nargs="*", metavar="ARCH", help='arch strings, each quoted: "0 1 0 1 ..."')
    parser.add_argument("--file", "-f", help="file with one arch per line ('-' = stdin)")
    parser.add_argument("--space", default="small", choices=["small", "middle"], help="op set (default small)")
    parser.add_argument("--nodes", type=int, default=5, help="nodes per cell B (default 5)")
    parser.add_argument("--skeleton", default="cifar", choices=["cifar", "imagenet"], help="network skeleton")
    parser.add_argument("--layers", type=int, default=3, help="N, normal cells between reductions (default 3)")
    parser.add_argument("--channels", type=int, default=20, help="C of the first cells (default 20)")
    parser.add_argument("--classes", type=int, default=10, help="classifier outputs (default 10)")
    parser.add_argument("--in-channels", type=int, default=3, help="image channels (default 3)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side for multiply-adds (default 32 cifar, 224 imagenet)")
    parser.add_argument("--range", action="store_true",
                        help="print the smallest and largest sizes of the whole space at this network (exact), "
                             "with an arch of each, instead of sizing archs (give no archs or --file with it)")
    parser.add_argument("--measure", default="params", choices=["params", "madds", "both"],
                        help="what to print (default params)")


def _read_inputs(args: argparse.Namespace) -> List[Tuple[str, str]]:
    """``(where, text)`` per arch: where = 'argument K' or 'line K' (1-based)."""
    items = [(f"argument {i + 1}", a) for i, a in enumerate(args.archs)]
    if args.file:
        fh = sys.stdin if args.file == "-" else open(args.file)
        try:
            for lineno, line in enumerate(fh, start=1):
                text = line.split("#", 1)[0].strip()
                if text:
                    items.append((f"line {lineno}", text))
        finally:
            if fh is not sys.stdin:
                fh.close()
    return items


def run(args: argparse.Namespace) -> int:
    """Runs ``bnao size``; returns the exit code (0 ok, 2 invalid input)."""
    from ..size import model_size
    from ..space import InvalidArchError, NAOSpace

    try:
        space = NAOSpace(num_nodes=args.nodes, op_set=args.space)
    except ValueError as err:
        return report_error("size", err)
    if args.range:
        if args.archs or args.file:
            # --range sizes the whole space, not archs: printing it for archs would look like their sizes.
            given = f"{len(args.archs)} arch(s)" if args.archs else f"--file {args.file}"
            return report_error("size", f"--range sizes the whole space and takes no archs, but {given} were given; "
                                        "drop --range to size the archs, or drop the archs to print the range")
        return _print_range(args, space)
    try:
        items = _read_inputs(args)
    except OSError as err:
        return report_error("size", f"cannot read {args.file}: {err}")
    if not items:
        return report_error("size", "no archs given (pass arch strings or --file)")
    rows = []
    for where, text in items:
        try:
            rows.append(space.parse(text).to_array())
        except InvalidArchError as err:
            return report_error("size", f"{where}: {err}")
    try:
        out = model_size(np.stack(rows), space, skeleton=args.skeleton, layers=args.layers, channels=args.channels,
                         classes=args.classes, in_channels=args.in_channels, image_size=args.image_size,
                         measure="both")
    except ValueError as err:
        return report_error("size", err)
    col = {"params": [0], "madds": [1], "both": [0, 1]}[args.measure]
    lines = [" ".join(str(int(v)) for v in row[col]) for row in out]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _print_range(args: argparse.Namespace, space) -> int:
    """``--range``: one line per measure, ``measure smallest largest``, then the two archs."""
    from ..size.extremes import size_extremes

    try:
        extremes = size_extremes(space, skeleton=args.skeleton, layers=args.layers, channels=args.channels,
                                 classes=args.classes, in_channels=args.in_channels, image_size=args.image_size)
    except ValueError as err:
        return report_error("size", err)
    measures = ("params", "madds") if args.measure == "both" else (args.measure,)
    for measure in measures:
        found = extremes[measure]
        print(f"{measure} {found.smallest} {found.largest}")
        print(f"  smallest: {' '.join(map(str, found.smallest_arch.tolist()))}")
        print(f"  largest:  {' '.join(map(str, found.largest_arch.tolist()))}")
    return 0
