"""The command line: dispatch, help, `bnao info` and `python -m bnao.info`."""

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import torch

from bnao.cli import COMMANDS, build_parser, main


def test_every_command_has_a_module_with_its_hooks():
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), name
        required = {"train": ["x", "--out", "d"], "eval": ["x"], "export": ["x", "--out", "f"],
                    "rank": ["--out", "d"]}.get(name, [])
        assert build_parser(name).parse_args([name] + required)._run is module.run


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "search" in capsys.readouterr().out


def _info_json(**env_changes) -> dict:
    """`bnao info --json` in a fresh process (the extension's load state is decided once per process)."""
    env = dict(os.environ)
    env.pop("BNAO_DISABLE_EXTENSION", None)
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-m", "bnao", "info", "--json"], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


# The ops declared by csrc/bnao.cpp, each with a CPU kernel.
CORE_OPS = {"alias_table", "alias_draw", "model_size"}


def test_info_reports_versions_kernels_and_loaders(capsys):
    # Expectations from outside bnao.extension: the installed distribution's metadata, torch itself, and
    # whether a compiled bnao._C file sits in the package.
    compiled_file = importlib.util.find_spec("bnao._C") is not None
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bnao"] == importlib.metadata.version("bnao")
    assert report["torch"] == torch.__version__
    assert "tensor" in report["loaders"]
    if os.environ.get("BNAO_DISABLE_EXTENSION") != "1":
        assert report["extension_loaded"] is compiled_file, report["extension_error"]
        if compiled_file:
            assert report["extension_error"] is None
            assert CORE_OPS <= set(report["kernels"])
            assert all(report["kernels"][op]["cpu"] for op in CORE_OPS)
        else:
            assert report["kernels"] == {}

    disabled = _info_json(BNAO_DISABLE_EXTENSION="1")
    assert disabled["extension_loaded"] is False and disabled["kernels"] == {}
    assert "BNAO_DISABLE_EXTENSION" in disabled["extension_error"]


def test_python_dash_m_entry_points():
    out = subprocess.run([sys.executable, "-m", "bnao.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "kernels" in out
    out = subprocess.run([sys.executable, "-m", "bnao", "--help"], capture_output=True, text=True, check=True).stdout
    assert "profile" in out


def test_an_error_is_one_line_whatever_the_user_typed(capsys):
    """A carriage return in a path (found by tests/test_fuzz.py) once split the error into two lines, the second
    without the program's name; control characters of user input are now shown escaped."""
    from bnao.commands.errors import error_text

    assert main(["eval", "\r"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.rstrip("\n")] and err.startswith("bnao eval: error: \\r: no such file")
    assert error_text("x", "a\x1b[31mb\u200bc") == "bnao x: error: a\\x1b[31mb\\u200bc"
    # A message's own further lines stay under it, indented.
    assert error_text("train", "diverged\nthe last good checkpoint is in c.pt") == (
        "bnao train: error: diverged\n  the last good checkpoint is in c.pt")


def test_an_argparse_refusal_is_one_line_too(capsys):
    """argparse's own errors go through the same escaping: ``\\x1e`` (a record separator, which
    ``str.splitlines`` treats as a line break) and ``\\n`` (both found by tests/test_fuzz.py) print as escapes."""
    for argv, shown in ((["profile", "\x1e0"], "\\x1e0"), (["size", "demo", "--config", "\n0"], "--config \\n0")):
        try:
            main(argv)
        except SystemExit as exit_:
            assert exit_.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
        err = capsys.readouterr().err
        # The command's usage (its own parser refuses), then the error as its one last line.
        assert err.splitlines()[-1] == f"bnao {argv[0]}: error: unrecognized arguments: {shown}", err
        assert err.startswith(f"usage: bnao {argv[0]} ")


def test_options_may_come_between_overrides():
    """``bnao search --out r a=1 --seed 1 b=2``: plain argparse stops taking positionals at the first option
    after them and refused ``b=2`` with the top-level usage."""
    from bnao.cli import parse_arguments

    _, args = parse_arguments(["search", "--config", "demo", "--out", "r", "supernet.epochs=1", "--seed", "1",
                               "supernet.layers=1"])
    assert args.command == "search" and args.seed == 1 and args.out == "r"
    assert args.overrides == ["supernet.epochs=1", "supernet.layers=1"]
    _, args = parse_arguments(["rank", "--config", "demo", "--out", "o", "archs.count=3", "--cache", "c",
                               "archs.seed=1"])
    assert args.overrides == ["archs.count=3", "archs.seed=1"] and args.cache == "c"


def test_an_unknown_device_names_the_choices(capsys):
    """``--device gpu`` was torch's RuntimeError listing every backend, as a traceback."""
    from bnao.device import resolve_device

    try:
        resolve_device("gpu")
    except ValueError as error:
        assert str(error) == "unknown device 'gpu'; use auto, cpu, cuda or cuda:N"
    else:
        raise AssertionError("resolve_device('gpu') was accepted")
    assert resolve_device("cpu") == torch.device("cpu")
    assert main(["profile", "--device", "gpu", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "bnao profile: error: unknown device 'gpu'; use auto, cpu, cuda or cuda:N\n", err
