"""``bnao::gather_augment`` (csrc/data) against its pure-PyTorch reference (bnao/ops/augment.py), which the
tensor loader ran before; the loaders' agreement with the per-image ``torch`` loader (tests/test_data.py) checks
both against an independent implementation."""

from __future__ import annotations

import pytest
import torch

from bnao import extension
from bnao.data.augment import AugmentConfig, normalisation, pad_images, sample_params
from bnao.ops.augment import gather_augment_reference
from conftest import DEVICES

pytestmark = pytest.mark.skipif(not extension.has_ops(), reason=f"bnao._C not loaded: {extension.load_error()}")


def _require(device: str) -> None:
    # With the core loaded, a missing kernel is a build bug, not a reason to skip.
    assert extension.has_kernel("gather_augment", device), f"bnao._C has no gather_augment kernel for {device}"


def _case(device, images=40, batch=13, height=9, width=11, channels=3, pad=3, cutout=5, flip=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (images, height, width, channels), dtype=torch.uint8, generator=gen)
    cfg = AugmentConfig(crop_padding=pad, flip=flip, cutout=cutout)
    index = torch.randint(0, images, (batch,), generator=gen)
    params = sample_params(batch, height, width, cfg, gen) if cfg.random else None
    scale, shift = normalisation([0.49, 0.48, 0.45][:channels], [0.25, 0.24, 0.26][:channels], "cpu")
    args = (pad_images(raw, pad if params is not None else 0), index, params, height, width,
            pad if params is not None else 0, cutout if params is not None else 0, scale, shift)
    return raw, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


CASES = {
    "crop, flip, cutout": {},
    "odd cutout, one channel": dict(cutout=7, channels=1, seed=1),
    "crop only": dict(cutout=0, flip=False, seed=2),
    "flip and cutout, no padding": dict(pad=0, cutout=4, seed=3),
    "no augmentation": dict(pad=0, cutout=0, flip=False, seed=4),
    "square, wide batch": dict(height=8, width=8, batch=64, cutout=16, seed=5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(device, case):
    _require(device)
    _, args = _case(device, **CASES[case])
    got = torch.ops.bnao.gather_augment(*args)
    want = gather_augment_reference(*args)
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    # The kernel's normalisation is one fused multiply-add; the reference's addcmul may round twice.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_pixels_by_hand():
    """A few output pixels computed from the definition: crop offset, flip, normalisation, cutout square."""
    _require("cpu")
    raw, args = _case("cpu", images=5, batch=4, height=6, width=7, pad=2, cutout=2, seed=9)
    data, index, params, height, width, pad, cutout, scale, shift = args
    out = torch.ops.bnao.gather_augment(*args)
    cut = 0
    for b in range(4):
        dy, dx, flip, cy, cx = params[b].tolist()
        for i, j in ((0, 0), (3, 5), (5, 6), (cy, cx)):  # (cy, cx) is always in the cutout square
            column = width - 1 - j if flip else j
            y, x = i + dy, column + dx  # in unpadded coordinates: outside the image reads the zero border
            inside = 0 <= y < height and 0 <= x < width
            pixel = raw[index[b], y, x].float() if inside else torch.zeros(3)
            want = pixel * scale + shift
            if cy - cutout // 2 <= i < cy + cutout // 2 and cx - cutout // 2 <= j < cx + cutout // 2:
                want = torch.zeros(3)
                cut += 1
            torch.testing.assert_close(out[b, i, j], want, rtol=0, atol=1e-6)
    assert cut >= 4  # the cutout branch ran


def test_other_devices_take_the_reference():
    """bnao has CPU and CUDA kernels only: data on another device (here `meta`) runs the reference's ops."""
    from bnao.ops.augment import gather_augment

    assert not extension.has_kernel("gather_augment", "meta")
    _, args = _case("meta")
    out = gather_augment(*args)
    assert out.device.type == "meta" and tuple(out.shape) == (13, 9, 11, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _require(device)
    _, args = _case(device)
    torch.library.opcheck(torch.ops.bnao.gather_augment.default, args)
    _, plain = _case(device, pad=0, cutout=0, flip=False)
    torch.library.opcheck(torch.ops.bnao.gather_augment.default, plain)


@pytest.mark.cuda
def test_cuda_equals_cpu_bit_for_bit():
    _require("cuda")
    _, cpu_args = _case("cpu", batch=300, height=32, width=32, pad=4, cutout=16, seed=11)
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in cpu_args)
    assert torch.equal(torch.ops.bnao.gather_augment(*cuda_args).cpu(), torch.ops.bnao.gather_augment(*cpu_args))


def test_arguments_are_checked():
    _require("cpu")
    _, args = _case("cpu")
    data, index, params, height, width, pad, cutout, scale, shift = args
    op = torch.ops.bnao.gather_augment
    with pytest.raises(RuntimeError, match=r"index\[1\] = 40 is not an image of data \(40 images\)"):
        op(data, torch.tensor([0, 40]), params[:2], height, width, pad, cutout, scale, shift)
    bad = params.clone()
    bad[1, 2] = 2
    with pytest.raises(RuntimeError, match=r"params\[1\] has flip 2; it must be 0 or 1"):
        op(data, index, bad, height, width, pad, cutout, scale, shift)
    bad = params.clone()
    bad[2, :2] = torch.tensor([1, -4])
    with pytest.raises(RuntimeError, match=r"params\[2\] has crop offsets \(1, -4\) outside \[-pad, pad\] = \[-3, 3\]"):
        op(data, index, bad, height, width, pad, cutout, scale, shift)
    with pytest.raises(RuntimeError, match="data must be Byte"):
        op(data.float(), index, params, height, width, pad, cutout, scale, shift)
    with pytest.raises(RuntimeError, match="without params the images are read unpadded, but pad is 3"):
        op(data, index, None, height, width, pad, 0, scale, shift)
    with pytest.raises(RuntimeError, match="holds 255 pixels per image, but 9x11 images padded by 2 have 195"):
        op(data, index, params, height, width, 2, cutout, scale, shift)
    with pytest.raises(RuntimeError, match=r"params must be \[13, 5\]"):
        op(data, index, params[:, :4].contiguous(), height, width, pad, cutout, scale, shift)
    with pytest.raises(RuntimeError, match=r"scale must be \[3\]"):
        op(data, index, params, height, width, pad, cutout, scale[:2], shift)
