"""The command line: dispatch, help, `bnao info` and `python -m bnao.info`."""

import importlib
import json
import subprocess
import sys

from bnao import extension
from bnao.cli import COMMANDS, build_parser, main


def test_every_command_has_a_module_with_its_hooks():
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), name
        required = {"train": ["x", "--out", "d"], "eval": ["x"]}.get(name, [])
        assert build_parser(name).parse_args([name] + required)._run is module.run


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "search" in capsys.readouterr().out


def test_info_reports_versions_kernels_and_loaders(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] and report["bnao"]
    assert report["extension_loaded"] == extension.has_ops()
    if extension.has_ops():
        assert {"alias_table", "alias_draw", "model_size"} <= set(report["kernels"])
        assert all(report["kernels"][op]["cpu"] for op in ("alias_table", "alias_draw", "model_size"))
    assert "tensor" in report["loaders"]


def test_python_dash_m_entry_points():
    out = subprocess.run([sys.executable, "-m", "bnao.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "kernels" in out
    out = subprocess.run([sys.executable, "-m", "bnao", "--help"], capture_output=True, text=True, check=True).stdout
    assert "profile" in out
