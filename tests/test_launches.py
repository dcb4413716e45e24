"""The launch-sequence recorder of `bnao profile` (bnao.supernet.launches)."""

import torch

from bnao.space.nao import NAOSpace
from bnao.supernet import Supernet
from bnao.supernet.launches import compare_launch_sequences, launch_sequence

SPACE = NAOSpace(op_set="small")
# Every branch reads input 0: all sep_conv_3x3 (op 0) against all identity (op 4).
ALL_SEP = (0, 0, 0, 0) * 10
ALL_IDENTITY = (0, 4, 0, 4) * 10


def _model_and_batch():
    torch.manual_seed(0)
    model = Supernet(SPACE, layers=1, channels=4, num_classes=3, in_channels=1, drop_path_keep_prob=None)
    return model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])


def test_same_arch_gives_the_same_sequence():
    model, images, labels = _model_and_batch()
    result = compare_launch_sequences(model, images, labels, [ALL_SEP, ALL_SEP, ALL_SEP])
    assert result["identical"] and result["distinct"] == 1 and result["archs"] == 3


def test_eager_sequence_depends_on_the_arch():
    model, images, labels = _model_and_batch()
    result = compare_launch_sequences(model, images, labels, [ALL_SEP, ALL_IDENTITY])
    assert not result["identical"] and result["distinct"] == 2
    # Identity branches of a normal cell compute nothing, sep convs run 2 depthwise + 2 pointwise convs.
    assert result["ops_min"] < result["ops_max"]


def test_sequence_records_forward_and_backward_convolutions():
    model, images, labels = _model_and_batch()
    names = [name for name, _ in launch_sequence(model, images, labels, ALL_SEP)]
    assert "convolution" in names and "convolution_backward" in names
