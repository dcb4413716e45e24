"""Bad input to `bnao train`, `bnao eval` and `bnao export` is refused with one clean line and exit code 2."""

import argparse
import json

import pytest
import torch

from bnao.cli import main
from bnao.commands import train as train_cmd
from bnao.commands.train_inputs import UsageError, load_datasets, resolve_settings, training_config
from bnao.data import create_dataset
from bnao.export import ExportError, ExportSource, default_image_size, export_network, load_for_export
from bnao.nets.network import build_network
from bnao.safe_io import save_atomic
from bnao.space import NAOSpace
from bnao.train import CheckpointError, StandaloneConfig, StandaloneTrainer, make_config

ARCH = "1 1 0 0 2 4 1 3 2 4 3 0 4 0 3 0 5 2 1 2 0 0 1 3 1 1 2 4 2 3 2 1 0 3 2 1 2 4 5 1"
TINY = ["--dataset", "synthetic", "--train-limit", "32", "--test-limit", "16", "--layers", "1", "--channels", "4",
        "--epochs", "1", "--batch-size", "16", "--threads", "1", "--no-progress"]


def _train_args(*flags):
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    return parser.parse_args([ARCH, "--out", "unused", *flags])


def _config_of(*flags):
    args = _train_args(*flags)
    return training_config(resolve_settings(args), args.eval_every)


def _one_error_line(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"bnao {command}: error: ")
    return err


def test_config_refuses_negative_grad_clip():
    with pytest.raises(ValueError, match=r"grad_clip must be >= 0 \(0 turns clipping off\)"):
        StandaloneConfig(grad_clip=-1.0).validate()
    StandaloneConfig(grad_clip=None).validate()


@pytest.mark.parametrize("flags, message", [
    (("--grad-clip", "-1"), "--grad-clip must be >= 0 (0 turns clipping off), got -1.0"),
    (("--loader", "foo"), "--loader must be one of"),
    (("--label-smoothing", "2"), "--label-smoothing must be in [0, 1)"),
    (("--label-smoothing", "1"), "--label-smoothing must be in [0, 1)"),
    (("--drop-path-keep-prob", "1.5"), "--drop-path-keep-prob must be in (0, 1], got 1.5"),
    (("--eval-every", "-1"), "--eval-every must be >= 0"),
    (("--auxiliary-weight", "-1"), "--auxiliary-weight must be >= 0"),
])
def test_train_refuses_out_of_range_settings(flags, message):
    with pytest.raises(UsageError) as caught:
        _config_of(*flags)
    assert message in str(caught.value)


def test_train_accepts_the_edges_of_the_ranges():
    config = _config_of("--grad-clip", "0", "--drop-path-keep-prob", "1", "--eval-every", "0",
                        "--auxiliary-weight", "0", "--label-smoothing", "0.99")
    assert config.grad_clip is None and config.drop_path_keep_prob is None


@pytest.mark.parametrize("key, value, option", [("train_limit", 0, "--train-limit"), ("train_limit", -5, "--train-limit"),
                                                ("test_limit", 0, "--test-limit")])
def test_train_refuses_limits_below_one(key, value, option):
    settings = {"dataset": "synthetic", key: value}
    with pytest.raises(UsageError, match=f"{option} must be >= 1, got {value}"):
        load_datasets(settings)


@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--limit", "-3"], "--limit must be >= 1, got -3"),
    (["--loader", "foo"], "--loader must be one of"),
])
def test_eval_refuses_bad_options(tmp_path, capsys, flags, message):
    assert main(["eval", str(tmp_path / "model.pt"), *flags]) == 2
    assert message in _one_error_line(capsys, "eval")


def test_eval_of_a_directory_names_its_model_file(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"")
    assert main(["eval", str(tmp_path)]) == 2
    assert f"pass the model file in it: bnao eval {tmp_path / 'model.pt'}" in _one_error_line(capsys, "eval")


def test_eval_of_random_bytes_gives_no_unsafe_advice(tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 20)
    assert main(["eval", str(tmp_path / "garbage.pt")]) == 2
    err = _one_error_line(capsys, "eval")
    assert "not a readable checkpoint" in err and "weights_only" not in err


def test_eval_of_a_checkpoint_says_to_pass_model_pt(tmp_path, capsys):
    save_atomic({"format": "bnao-standalone-checkpoint", "version": 1}, tmp_path / "checkpoint.pt")
    assert main(["eval", str(tmp_path / "checkpoint.pt")]) == 2
    err = _one_error_line(capsys, "eval")
    assert "pass the model.pt beside it" in err and "retrain" not in err


def _tiny_source():
    space = NAOSpace(op_set="small")
    model = build_network(ARCH, space, skeleton="cifar", layers=1, channels=4, num_classes=10, in_channels=1)
    config = {"arch": str(space.arch(ARCH)), "space": space.config(), "skeleton": "cifar", "layers": 1,
              "channels": 4, "num_classes": 10, "in_channels": 1}
    return ExportSource(model.eval(), config, "state dict")


def test_export_refuses_image_size_zero_and_sizes_the_network_cannot_run_at(tmp_path):
    for side in (0, 2):  # 3 is the smallest image a cifar network runs on
        with pytest.raises(ExportError, match=rf"image size {side}x{side} is too small for the cifar skeleton: .*"
                                              rf"use an --image-size of at least 3, or leave it out"):
            export_network(_tiny_source(), "state_dict", tmp_path / "net.pt", image_size=side)


def test_export_tells_random_bytes_from_pickled_objects(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ExportError) as caught:
        load_for_export(tmp_path / "garbage.pt")
    assert "damaged" in str(caught.value) and "pickled Python objects" not in str(caught.value)
    torch.save(argparse.Namespace(a=1), tmp_path / "pickle.pt")  # a real pickle naming a Python class
    with pytest.raises(ExportError, match="pickled Python objects"):
        load_for_export(tmp_path / "pickle.pt")


def _tiny_trainer(tmp_path):
    data = create_dataset("synthetic", split="train", num_samples=32, image_shape=(28, 28, 1))
    config = make_config(layers=1, channels=4, epochs=1, batch_size=16)
    return StandaloneTrainer(ARCH, NAOSpace(op_set="small"), data, None, config, device="cpu",
                             checkpoint_path=tmp_path / "checkpoint.pt", data_info={"dataset": "synthetic"})


def test_checkpoint_records_the_image_size_for_export(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    trainer.save_checkpoint()
    assert default_image_size(load_for_export(tmp_path / "checkpoint.pt")) == 28
    # A checkpoint of an older bnao (no "extra") still exports, at the skeleton's side.
    state = trainer.state_dict()
    del state["extra"]
    save_atomic(state, tmp_path / "old.pt")
    assert default_image_size(load_for_export(tmp_path / "old.pt")) == 32


def test_damaged_checkpoint_message_gives_a_doable_fix(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(CheckpointError) as caught:
        trainer.load_checkpoint()
    text = str(caught.value)
    assert "weights_only" not in text and "point to an intact" not in text and "Delete" in text


def test_resume_with_a_corrupt_config_json_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{bad")
    assert main(["train", "--resume", "--out", str(tmp_path)]) == 2
    assert "config.json is unreadable or damaged" in _one_error_line(capsys, "train")


def test_resume_without_a_checkpoint_says_it_starts_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    settings = dict(resolve_settings(_train_args(*TINY)), arch=ARCH)
    (run / "config.json").write_text(json.dumps(settings))
    assert main(["train", "--resume", "--out", str(run), "--threads", "1", "--no-progress"]) == 0
    assert "has no checkpoint.pt" in capsys.readouterr().err


def test_help_describes_the_real_defaults():
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    for text in (parser.epilog, train_cmd.__doc__):
        assert "search's re-ranking training (" not in text and "final re-ranking\n(N=3" not in text
        assert "dropout 0.4" in text and "batch 64" in text
