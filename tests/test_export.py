"""`bnao export`: round trips to TorchScript, ONNX and a state dict, and bad input.

Every exported file is loaded back the way user code loads it and compared
with the original network on the same batch: TorchScript in a separate
process where importing bnao is impossible, ONNX with onnxruntime (skipped
when onnx / onnxruntime are not installed), the state dict through
``build_network`` + ``load_state_dict``. Tolerance: 1e-5 relative to the
largest logit for float32 graphs (TorchScript and the state dict are exact
here; ONNX Runtime reorders float sums).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bnao.cli import main as cli_main
from bnao.export import ExportError, export_network, infer_config, load_for_export
from bnao.nets import build_network
from bnao.space import NAOSpace
from bnao.train import save_model

SPACE = NAOSpace(num_nodes=5, op_set="small")
ARCH = "0 1 1 2 0 2 1 0 2 0 1 2 2 2 3 4 1 3 4 1 0 4 0 1 2 2 1 3 0 3 1 0 3 4 1 3 1 3 4 1"
RELATIVE_TOLERANCE = 1e-5


def _trained_like(skeleton="cifar", in_channels=3, auxiliary=True):
    """A small network whose BN statistics are not the initial ones (as after training)."""
    torch.manual_seed(0)
    net = build_network(ARCH, SPACE, skeleton=skeleton, layers=1, channels=4, num_classes=7,
                        in_channels=in_channels, auxiliary=auxiliary, drop_path_keep_prob=0.7, dropout=0.3)
    side = 32 if skeleton == "cifar" else 64
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, in_channels, side, side))
    config = {"arch": ARCH, "space": SPACE.config(), "skeleton": skeleton, "layers": 1, "channels": 4,
              "num_classes": 7, "in_channels": in_channels, "auxiliary": auxiliary, "drop_path_keep_prob": 0.7,
              "dropout": 0.3}
    return net.eval(), config


@pytest.fixture
def model_file(tmp_path):
    net, config = _trained_like()
    path = tmp_path / "model.pt"
    save_model(path, net, config, extra={"dataset": "cifar10"})
    return net, path


def _batch(n=5, side=32, channels=3):
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(42))


def _jit_load(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in this torch, still supported
        return torch.jit.load(str(path))


def _close(exported, original):
    scale = max(1.0, float(original.abs().max()))
    return float((exported - original).abs().max()) <= RELATIVE_TOLERANCE * scale


def test_torchscript_loads_without_bnao(model_file, tmp_path):
    net, path = model_file
    out = tmp_path / "net.ts"
    result = export_network(load_for_export(path), "torchscript", out)
    assert result["ok"] and result["max_abs_diff"] is not None and result["input_shape"] == [3, 3, 32, 32]
    images = _batch()
    torch.save(images, tmp_path / "images.pt")
    # A fresh interpreter in which `import bnao` fails: the file must not need bnao.
    script = (
        "import sys, torch; sys.modules['bnao'] = None\n"
        f"m = torch.jit.load({str(out)!r})\n"
        f"x = torch.load({str(tmp_path / 'images.pt')!r})\n"
        "names = [n for n, _ in m.named_modules()]\n"
        "assert not any('auxiliary_head' in n for n in names), names\n"
        "m.train()  # training-only parts must be gone: still plain logits, no drop-path randomness\n"
        "with torch.no_grad():\n"
        f"    torch.save((m(x), m(x)), {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    first, second = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        original = net(images)
    assert torch.equal(first, second)
    assert first.shape == original.shape and _close(first, original)


def test_state_dict_round_trip_through_build_network(model_file, tmp_path):
    net, path = model_file
    out = tmp_path / "weights.pt"
    result = export_network(load_for_export(path), "state_dict", out)
    assert result["ok"] and result["max_abs_diff"] == 0.0
    weights = torch.load(out, weights_only=True)
    assert not any(k.startswith("auxiliary_head.") for k in weights)
    rebuilt = build_network(ARCH, SPACE, layers=1, channels=4, num_classes=7)
    rebuilt.load_state_dict(weights)  # strict: exactly the inference network's tensors
    images = _batch()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), net(images))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_onnx_round_trip(model_file, tmp_path, exporter):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    net, path = model_file
    out = tmp_path / "net.onnx"
    result = export_network(load_for_export(path), "onnx", out, onnx_exporter=exporter)
    assert result["ok"], result
    graph = onnx.load(str(out))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["bnao"])["network"]["arch"] == ARCH
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = _batch(n=6)  # neither the trace batch (2) nor the check batch (3): the batch axis is dynamic
    exported = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    with torch.no_grad():
        original = net(images)
    assert exported.shape == original.shape and _close(exported, original)


@pytest.mark.parametrize("skeleton,in_channels", [("cifar", 1), ("imagenet", 3)])
def test_arch_plus_plain_state_dict(tmp_path, skeleton, in_channels):
    net, _ = _trained_like(skeleton, in_channels, auxiliary=False)
    path = tmp_path / "mine.pt"
    torch.save(net.state_dict(), path)
    config = infer_config(torch.load(path, weights_only=True), ARCH)
    assert config == {"arch": ARCH, "space": SPACE.config(), "skeleton": skeleton, "layers": 1, "channels": 4,
                      "num_classes": 7, "in_channels": in_channels}
    source = load_for_export(path, arch=ARCH)
    result = export_network(source, "torchscript", tmp_path / "net.ts", image_size=64)
    assert result["ok"] and result["input_shape"] == [3, in_channels, 64, 64]


def test_train_checkpoint_and_cli(model_file, tmp_path, capsys):
    _, path = model_file
    out = tmp_path / "cli.ts"
    assert cli_main(["export", str(path), "--format", "torchscript", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] and printed["arch"] == ARCH and printed["source"] == "bnao model file"
    assert printed["max_abs_diff"] <= RELATIVE_TOLERANCE * max(1.0, printed["max_abs_output"])
    assert out.is_file()


def test_not_a_bnao_model(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ExportError, match="not a bnao model: torch.load cannot read it"):
        load_for_export(text)
    other = tmp_path / "search.pt"
    torch.save({"format": "bnao-supernet-checkpoint", "step": 3}, other)
    with pytest.raises(ExportError, match="found a dict with format 'bnao-supernet-checkpoint'"):
        load_for_export(other)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ExportError, match="found a list"):
        load_for_export(listing)
    assert cli_main(["export", str(other), "--out", str(tmp_path / "x.ts")]) == 2
    assert "not a bnao model" in capsys.readouterr().err
    with pytest.raises(ExportError, match="no such file"):
        load_for_export(tmp_path / "missing.pt")
    pickled = tmp_path / "whole_module.pt"
    torch.save(build_network(ARCH, SPACE, layers=1, channels=4), pickled)
    with pytest.raises(ExportError, match="holds pickled Python objects"):
        load_for_export(pickled)


def test_weights_that_do_not_fit(tmp_path):
    net, _ = _trained_like(auxiliary=False)
    path = tmp_path / "mine.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ExportError, match="is a plain state dict: give its arch"):
        load_for_export(path)
    other = SPACE.arch(np.array(SPACE.sample_array(1, rng=5)[0]))
    with pytest.raises(ExportError, match="the weights do not fit arch"):
        load_for_export(path, arch=str(other))
    with pytest.raises(ExportError, match="unknown export format"):
        export_network(load_for_export(path, arch=ARCH), "pickle", tmp_path / "x")


def test_from_bnao_train_outputs(tmp_path, capsys):
    """A real `bnao train` run: its model.pt, its checkpoint.pt, and its arch with the checkpoint as --weights."""
    import bnao

    run = tmp_path / "train"
    assert cli_main(["train", ARCH, "--dataset", "synthetic", "--train-limit", "64", "--test-limit", "32",
                     "--epochs", "1", "--layers", "1", "--channels", "4", "--batch-size", "32", "--out", str(run),
                     "--no-progress", "--threads", "1"]) == 0
    model, info = bnao.load_model(run / "model.pt")  # the top-level API the README documents
    assert info["config"]["auxiliary"] and model.auxiliary_head is not None
    images = _batch(n=4)
    with torch.no_grad():
        original = model(images)
    for args in ([str(run / "model.pt")], [str(run / "checkpoint.pt")], [ARCH, "--weights", str(run / "checkpoint.pt")]):
        out = tmp_path / "net.ts"
        assert cli_main(["export", *args, "--format", "torchscript", "--out", str(out), "--threads", "1"]) == 0
        assert "largest |exported - original|" in capsys.readouterr().out
        with torch.no_grad():
            assert _close(_jit_load(out)(images), original)
    rebuilt = bnao.build_network(ARCH, "small", layers=1, channels=4, num_classes=10, auxiliary=True)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), original)
    other = str(SPACE.arch(SPACE.sample_array(1, rng=9)[0]))
    assert cli_main(["export", other, "--weights", str(run / "checkpoint.pt"), "--out", str(tmp_path / "x.ts")]) == 2
    assert f"holds arch {ARCH!r}" in capsys.readouterr().err
