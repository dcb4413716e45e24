"""Checks written once and shared: the "did you mean" hint of unknown names (:class:`bnao.registry.Registry`),
the image side of a data set (:func:`bnao.size.image_side`) and the minimum image size of a skeleton
(:func:`bnao.size.check_image_size`), used by ``bnao size``, stand-alone training, ``bnao eval`` and ``bnao export``."""

import types

import pytest

from bnao.cli import main
from bnao.commands.train_inputs import UsageError, load_datasets
from bnao.data import DATASETS, LOADERS, create_dataset
from bnao.export import ExportError, ExportSource, export_network
from bnao.nets.network import build_network
from bnao.registry import Registry, did_you_mean
from bnao.search import budget, components
from bnao.size import check_image_size, image_hw, image_side
from bnao.space import NAOSpace
from bnao.train import make_config, save_model, train_standalone
from bnao.train.config import check_loader

ARCH = "1 1 0 0 2 4 1 3 2 4 3 0 4 0 3 0 5 2 1 2 0 0 1 3 1 1 2 4 2 3 2 1 0 3 2 1 2 4 5 1"
SPACE = NAOSpace()


def _message(skeleton: str, side: int, flag=None) -> str:
    with pytest.raises(ValueError) as caught:
        check_image_size(skeleton, side, flag=flag)
    return str(caught.value)


def _one_error_line(capsys, command):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"bnao {command}: error: "), err
    return lines[0]


# --- unknown names --------------------------------------------------------------------------------------------


def test_did_you_mean_names_the_closest_choice_or_nothing():
    assert did_you_mean("epoch", ["epochs", "lr"]) == "; did you mean 'epochs'?"
    assert did_you_mean("zzz", ["epochs", "lr"]) == ""
    assert did_you_mean(3, ["3d"]) == "; did you mean '3d'?"  # names from config files need not be strings


def test_registry_refuses_an_unknown_name_with_its_one_message():
    reg = Registry("sampler")
    reg.register("uniform", object)
    reg.register("proportional", object)
    assert reg.suggest("uniforn") == "; did you mean 'uniform'?" and reg.suggest("xyz") == ""
    message = reg.unknown_name_message("uniforn")
    assert message == "unknown sampler 'uniforn'; did you mean 'uniform'? (available: proportional, uniform)"
    with pytest.raises(KeyError) as caught:
        reg.get("uniforn")
    assert caught.value.args[0] == message
    assert reg.unknown_name_message("xyz") == "unknown sampler 'xyz' (available: proportional, uniform)"


def test_loader_check_keeps_its_wording_and_takes_the_registry_hint():
    close = "tensr"
    assert LOADERS.suggest(close) == "; did you mean 'tensor'?"
    with pytest.raises(ValueError) as caught:
        check_loader(close)
    names = ", ".join(LOADERS.names())
    assert str(caught.value) == f"loader must be one of {names}, got 'tensr'; did you mean 'tensor'?"
    with pytest.raises(TypeError, match=r"unknown stand-alone training setting 'epoch'; did you mean 'epochs'\?"):
        make_config(epoch=3)


def test_train_refuses_an_unknown_dataset_with_the_registry_message():
    with pytest.raises(UsageError) as caught:
        load_datasets({"dataset": "cifar11"})
    assert str(caught.value) == DATASETS.unknown_name_message("cifar11")
    assert "did you mean 'cifar10'" in str(caught.value)


# --- image side and minimum image size ------------------------------------------------------------------------


def test_image_side_is_defined_once():
    assert components.image_side is image_side and not hasattr(budget, "image_side")  # the search's copy is gone
    data = create_dataset("synthetic", num_samples=2, image_shape=(28, 28, 1), num_classes=2)
    assert image_side(data) == 28 and image_side(data, "imagenet") == 28
    assert image_side(types.SimpleNamespace(image_shape=(24, 40, 3))) == 24  # not square: the height
    assert image_hw(types.SimpleNamespace(image_shape=(24, 40, 3))) == (24, 40) and image_hw(object()) is None
    assert image_side(object()) is None  # the data set does not say: the skeleton's usual side, if one is given
    assert image_side(object(), "cifar") == 32 and image_side(object(), "imagenet") == 224
    assert image_side(types.SimpleNamespace(image_shape=7), "cifar") == 32  # a shape that is not (H, W, C)


@pytest.mark.parametrize("skeleton,smallest", [("cifar", 3), ("imagenet", 17)])
def test_minimum_image_size_message(skeleton, smallest):
    check_image_size(skeleton, smallest)
    message = _message(skeleton, smallest - 1)
    side = smallest - 1
    assert message == (f"image size {side}x{side} is too small for the {skeleton} skeleton: its network cannot run "
                       f"on images smaller than {smallest}x{smallest}; use images of at least {smallest}x{smallest}")
    # A size set by an option names it; the smaller side of images that are not square decides.
    assert _message(skeleton, side, flag="--image-size").endswith(f"; use an --image-size of at least {smallest}")
    with pytest.raises(ValueError, match=rf"image size 40x{side} is too small"):
        check_image_size(skeleton, 40, side)
    check_image_size(skeleton, smallest, 40)


def test_training_and_export_refuse_small_images_with_the_one_message(tmp_path):
    tiny = create_dataset("synthetic", num_samples=8, image_shape=(2, 2, 3), num_classes=3)
    with pytest.raises(ValueError) as caught:
        train_standalone(ARCH, SPACE, tiny, epochs=1, layers=1, channels=4, batch_size=4, device="cpu", progress=False)
    assert str(caught.value) == _message("cifar", 2)
    wide = create_dataset("synthetic", num_samples=8, image_shape=(40, 2, 3), num_classes=3)  # 2 pixels wide
    with pytest.raises(ValueError, match="image size 40x2 is too small for the cifar skeleton"):
        train_standalone(ARCH, SPACE, wide, epochs=1, layers=1, channels=4, batch_size=4, device="cpu", progress=False)

    model = build_network(ARCH, SPACE, skeleton="imagenet", layers=1, channels=4, num_classes=3)
    config = {"arch": ARCH, "space": SPACE.config(), "skeleton": "imagenet", "layers": 1, "channels": 4,
              "num_classes": 3, "in_channels": 3}
    with pytest.raises(ExportError) as caught:
        export_network(ExportSource(model.eval(), config, "state dict"), "state_dict", tmp_path / "n.pt",
                       image_size=16)
    assert str(caught.value) == (_message("imagenet", 16, flag="--image-size")
                                 + ", or leave it out to use the training data's size")
    assert not (tmp_path / "n.pt").exists()


def test_size_refuses_small_images_with_the_one_message(capsys):
    assert main(["size", "--measure", "madds", "--image-size", "2", ARCH]) == 2
    assert _message("cifar", 2, flag="image_size (--image-size)") in _one_error_line(capsys, "size")


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    """A model file trained on a registered data set of 2x2 images: too small for its cifar network."""
    monkeypatch.setitem(DATASETS._factories, "tiny2x2", lambda root=None, split="test", **kw: create_dataset(
        "synthetic", num_samples=8, image_shape=(2, 2, 3), num_classes=3))
    net = build_network(ARCH, SPACE, skeleton="cifar", layers=1, channels=4, num_classes=3)
    config = {"arch": ARCH, "space": SPACE.config(), "skeleton": "cifar", "layers": 1, "channels": 4,
              "num_classes": 3, "in_channels": 3, "auxiliary": False}
    path = tmp_path / "model.pt"
    save_model(path, net, config, extra={"dataset": "tiny2x2"})
    return path


def test_eval_refuses_images_too_small_for_the_network_before_evaluating(tiny_model, capsys, monkeypatch):
    def evaluate(*args, **kwargs):
        raise AssertionError("evaluated a network that cannot run on the data")

    monkeypatch.setattr("bnao.train.evaluate_model", evaluate)
    assert main(["eval", str(tiny_model), "--device", "cpu"]) == 2
    assert _one_error_line(capsys, "eval") == \
        f"bnao eval: error: tiny2x2's images do not fit this model: {_message('cifar', 2)}"


def test_eval_runs_where_the_images_are_large_enough(tiny_model, capsys, monkeypatch):
    monkeypatch.setitem(DATASETS._factories, "tiny3x3", lambda root=None, split="test", **kw: create_dataset(
        "synthetic", num_samples=8, image_shape=(3, 3, 3), num_classes=3))
    assert main(["eval", str(tiny_model), "--dataset", "tiny3x3", "--device", "cpu", "--json"]) == 0
    assert '"images": 8' in capsys.readouterr().out


def test_eval_hints_the_closest_dataset(tiny_model, capsys):
    assert main(["eval", str(tiny_model), "--dataset", "cifar11", "--device", "cpu"]) == 2
    line = _one_error_line(capsys, "eval")
    assert DATASETS.unknown_name_message("cifar11") in line and "did you mean 'cifar10'?" in line
