"""The ``bnao`` command line: one sub-command per module of ``bnao.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so
``bnao size`` does not pay for importing the supernet or DALI.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Tuple

# name -> (module, one-line help). The order is the order of `bnao --help`.
COMMANDS = {
    "search": ("bnao.commands.search", "run Balanced NAO end to end (Algorithm 1)"),
    "train": ("bnao.commands.train", "train one architecture stand-alone"),
    "eval": ("bnao.commands.eval", "evaluate a trained checkpoint on a test set"),
    "export": ("bnao.commands.export", "export a trained model as TorchScript, ONNX or a state dict"),
    "size": ("bnao.commands.size", "model size (parameters, multiply-adds) of architectures"),
    "rank": ("bnao.commands.rank", "ranking correlation of one-shot and stand-alone accuracy (uniform vs proportional)"),
    "profile": ("bnao.commands.profile", "profile supernet training throughput"),
    "info": ("bnao.commands.info", "versions, build flags, kernels and loaders available"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with its error line made visible: a control character in a refused argument (``\\n``,
    ``\\x1e``, ``\\r``) is printed as an escape, so the error stays one line, as ``bnao``'s own errors do.
    (argparse's messages are one line of their own; any line break in one came from the user.)"""

    def error(self, message: str):
        from .commands.errors import visible

        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {visible(message, keep=chr(9))}\n")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """Parser with every sub-command; only ``command``'s module is imported (none when None). The
    sub-commands' parsers are in the returned parser's ``commands`` (name -> parser)."""
    from .version import __version__

    parser = _Parser(prog="bnao", description="Balanced Neural Architecture Optimization")
    parser.add_argument("--version", action="version", version=f"bnao {__version__}",
                        help="print the version (bnao X.Y.Z) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    parser.commands = sub.choices
    return parser


def parse_arguments(argv: List[str]) -> Tuple[argparse.ArgumentParser, argparse.Namespace]:
    """``(top-level parser, parsed arguments)`` of a command line (without the program name)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    if command in COMMANDS and argv[0] == command:
        # The command's own parser, intermixed: options may come between KEY=VALUE overrides or positional
        # archs (`bnao search --out r a.b=1 --seed 1 c.d=2`), which plain argparse refuses after the first
        # positional run. (The top-level parser cannot parse intermixed: it has sub-commands.)
        args = parser.commands[command].parse_intermixed_args(argv[1:], argparse.Namespace(command=command))
    else:
        args = parser.parse_args(argv)
    return parser, args


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``bnao`` console script."""
    parser, args = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
