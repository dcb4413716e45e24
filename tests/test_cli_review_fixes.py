"""Fixes from a review of the command line: image sizes too small for a network, ``size ARCH --range``,
``profile --json`` values, ``bnao --version`` and resuming a finished search."""

import json
from unittest import mock

import pytest
import torch

from bnao.cli import main
from bnao.nets import build_network
from bnao import size as size_api
from bnao.size import model_size
from bnao.space import NAOSpace
from bnao.version import __version__

ARCH = "0 2 0 4 2 1 0 4 3 2 1 4 1 0 4 4 4 4 5 3 1 1 0 3 2 0 1 4 2 2 0 2 2 0 4 2 0 3 5 2"


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"bnao {command}: error: "), err
    return lines[0]


def _runs(skeleton: str, side: int) -> bool:
    net = build_network(ARCH, NAOSpace(), skeleton, layers=1, channels=4, num_classes=10).eval()
    try:
        with torch.no_grad():
            net(torch.randn(1, 3, side, side))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("skeleton,smallest", [("cifar", 3), ("imagenet", 17)])
def test_smallest_image_size_is_where_the_network_starts_to_run(skeleton, smallest):
    assert size_api.min_image_size(skeleton) == smallest
    assert _runs(skeleton, smallest) and not _runs(skeleton, smallest - 1)
    assert model_size(ARCH, skeleton=skeleton, image_size=smallest, measure="madds")[0] > 0
    side = smallest - 1
    with pytest.raises(ValueError, match=f"image size {side}x{side} is too small .*at least {smallest}"):
        model_size(ARCH, skeleton=skeleton, image_size=smallest - 1, measure="madds")


@pytest.mark.parametrize("argv,smallest", [
    (["--skeleton", "imagenet", "--image-size", "4", ARCH], 17),
    (["--skeleton", "imagenet", "--image-size", "16", ARCH], 17),
    (["--image-size", "2", ARCH], 3),
    (["--range", "--image-size", "1"], 3),
])
def test_size_refuses_an_image_size_the_network_cannot_run_at(capsys, argv, smallest):
    assert main(["size", "--measure", "madds", *argv]) == 2
    out, err = capsys.readouterr()
    line = _one_error_line(err, "size")
    assert "--image-size" in line and f"at least {smallest}" in line and out == ""


@pytest.mark.parametrize("given", [[ARCH], ["--file", "archs.txt"]])
def test_size_range_refuses_archs(capsys, given):
    assert main(["size", *given, "--range"]) == 2
    out, err = capsys.readouterr()
    assert "--range" in _one_error_line(err, "size") and out == ""


def test_profile_json_has_plain_values(capsys):
    # A reason with parentheses of its own: the JSON takes the profile's key as it is, nothing parsed from text.
    reason = "torch.float16 activations (the fused cells take float32, float64 and bfloat16)"
    result = {"kernels": "eager", "kernels_note": reason, "ops_per_step": 829.5, "ops_backward": 436.5,
              "batch_size": 4}
    with mock.patch("bnao.supernet.profiling.profile_supernet", return_value=result):
        assert main(["profile", "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kernels"] == "eager" and printed["kernels_note"] == reason
    # Whole launches, as the text output's "{:.0f}" prints them.
    assert printed["ops_per_step"] == 830 and printed["ops_backward"] == 436 and printed["batch_size"] == 4
    with mock.patch("bnao.supernet.profiling.profile_supernet", return_value={"kernels": "fused"}):
        assert main(["profile", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == {"kernels": "fused"}


def test_profile_keeps_the_cells_reason_as_its_own_key(capsys):
    """The profile stores why the eager cells run as ``kernels_note``; the text output's ``cells eager (...)``
    sentence is built from it, and ``--json`` prints the key as it is."""
    from bnao.supernet import profiling
    from bnao.supernet.fused_forward import cells_choice
    from bnao.supernet.model import Supernet

    tiny = dict(layers=1, channels=4, batch_size=4, steps=1, warmup=0, pool_size=4, device="cpu", count_ops=False,
                sequence_archs=0)
    result = profiling.profile_supernet(kernels="eager", **tiny)
    assert result["kernels"] == "eager" and result["kernels_note"] == "kernels='eager'"
    assert "  cells eager (kernels='eager')" in profiling.format_result(result).splitlines()[0]
    # auto on a CPU: the reason cells_choice gives, word for word.
    expected = cells_choice(Supernet(NAOSpace(op_set="small"), layers=1, channels=4, num_classes=10),
                            torch.device("cpu"), True, torch.float32)
    auto = profiling.profile_supernet(kernels="auto", **tiny)
    if expected[0]:
        assert auto["kernels"] == "fused" and "kernels_note" not in auto
    else:
        assert auto["kernels"] == "eager" and auto["kernels_note"] == expected[1]
    with mock.patch("bnao.supernet.profiling.profile_supernet", return_value=auto):
        assert main(["profile", "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kernels"] == auto["kernels"] and printed.get("kernels_note") == auto.get("kernels_note")
    # The JSON's reason comes from the key alone: a reason left out of the sentence-shaped value stays out.
    with mock.patch("bnao.supernet.profiling.profile_supernet", return_value={"kernels": "eager (not parsed)"}):
        assert main(["profile", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == {"kernels": "eager (not parsed)"}


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"bnao {__version__}\n"


def test_resuming_a_finished_search_says_it_is_complete(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["data.dataset=synthetic", "data.synthetic_samples=200", "data.train_limit=200", "supernet.layers=1",
            "supernet.channels=4", "supernet.batch_size=32", "supernet.steps_per_epoch=2", "search.pool_size=6",
            "search.iterations=0", "final.rerank_top=1", "final.epochs=1", "final.batch_size=32",
            "final.full_epochs=0", "device=cpu", "threads=1"]
    assert main(["search", "--config", "demo", "--out", str(run), "--no-progress", *tiny]) == 0
    best = json.loads((run / "best.json").read_text())
    capsys.readouterr()
    # Said from the checkpoint: the search (data, supernet) is never built for a run with nothing left to do.
    with mock.patch("bnao.search.loop.BalancedNAO", side_effect=AssertionError("the search was built")):
        assert main(["search", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out
    assert f"best arch: {best['arch']}" in out and str(run / "best.json") in out


def test_profile_on_a_cpu_prints_no_profiler_error_lines():
    """Kineto logged "ERROR: ... gpuGetDeviceCount failed with code 35" and USDT lines on every profiled CPU run."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("the quieting applies where no GPU is visible")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-m", "bnao", "profile", "--layers", "1", "--channels", "4", "--batch-size",
                          "4", "--steps", "1", "--warmup", "1", "--pool-size", "4", "--device", "cpu", "--top-kernels",
                          "2"], capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "per training step" in run.stdout or "img/s" in run.stdout
    assert "gpuGetDeviceCount" not in run.stderr and "USDT" not in run.stderr, run.stderr[-2000:]


def test_best_record_reads_the_state_then_best_json(tmp_path):
    """A finished run's best arch: the state's copy when it has one, else the run directory's best.json."""
    import types

    from bnao.search.loop import best_record

    run_dir = types.SimpleNamespace(best_path=tmp_path / "best.json")
    (tmp_path / "best.json").write_text(json.dumps({"arch": "from the file", "size": 7}))
    assert best_record({"best": {"arch": "from the state", "size": 5}}, run_dir)["arch"] == "from the state"
    assert best_record({"phase": "done"}, run_dir) == {"arch": "from the file", "size": 7}
