"""Datasets, the train/dev split and the loaders (tensor, torch, DALI in CPU mode)."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from bnao.data import (
    NO_AUGMENT,
    ArrayDataset,
    AugmentConfig,
    DatasetNotFoundError,
    FolderDataset,
    LoaderUnavailableError,
    available_loaders,
    choose_loader,
    create_dataset,
    create_loader,
    list_datasets,
    list_loaders,
    split_train_dev,
)
from bnao.data import datasets as datasets_mod
from bnao.data.loaders.dali import dali_available

HAVE_DALI = dali_available()
ARRAY_LOADERS = ["tensor", "torch", pytest.param("dali", marks=pytest.mark.dali)]


def _need(name):
    if name == "dali":
        pytest.importorskip("nvidia.dali")


@pytest.fixture(autouse=True)
def _no_ambient_data(monkeypatch, tmp_path):
    """Keeps $BNAO_DATA and ./data of the machine out of the lookups."""
    monkeypatch.delenv("BNAO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


def coded_dataset(n=512, size=32, mean=0.0, std=1.0 / 255.0):
    """Pixels encode their position: channel 0 = row + 1, channel 1 = col + 1, channel 2 = 200.

    With mean 0 and std 1/255 the normalised value equals the raw uint8 value,
    so an output pixel tells which source pixel it came from (0 = padding).
    """
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    img = np.stack([r + 1, c + 1, np.full_like(r, 200)], axis=-1).astype(np.uint8)
    images = np.broadcast_to(img, (n, size, size, 3)).copy()
    return ArrayDataset(images, np.arange(n) % 10, 10, (mean,) * 3, (std,) * 3, name="coded")


def take(loader, k=None):
    out = []
    for i, (x, y) in enumerate(loader):
        if k is not None and i >= k:
            break
        out.append((x.clone(), y.clone()))
    return out


# ----------------------------------------------------------------------------- registries


def test_registries_list_everything():
    assert list_datasets() == ["cifar10", "cifar100", "fashion_mnist", "imagenet", "synthetic"]
    assert list_loaders() == ["auto", "dali", "tensor", "torch"]
    avail = available_loaders("cpu")
    assert {"tensor", "torch"} <= set(avail) and ("dali" in avail) == HAVE_DALI


def test_synthetic_is_seeded():
    a = create_dataset("synthetic", num_samples=64, image_shape=(8, 6, 2), num_classes=7, seed=1)
    b = create_dataset("synthetic", num_samples=64, image_shape=(8, 6, 2), num_classes=7, seed=1)
    t = create_dataset("synthetic", split="test", num_samples=64, image_shape=(8, 6, 2), num_classes=7, seed=1)
    assert a.images.shape == (64, 8, 6, 2) and a.images.dtype == np.uint8
    assert a.labels.dtype == np.int64 and a.labels.max() < 7 and len(a.mean) == 2
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, t.images)
    with pytest.raises(ValueError, match="split"):
        create_dataset("synthetic", split="val")


# ----------------------------------------------------------------------------- readers


def _write_cifar(folder, batches, label_key, n_per=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written = {}
    for name in batches:
        data = rng.integers(0, 256, (n_per, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, label_key: labels, "batch_label": name}, fh)
        written[name] = (data, labels)
    return written


def test_cifar10_reader_torchvision_layout(tmp_path, monkeypatch):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    w = _write_cifar(tmp_path / "d" / "cifar-10-batches-py", names, "labels")
    train = create_dataset("cifar10", root=str(tmp_path / "d"))
    test = create_dataset("cifar10", root=str(tmp_path / "d"), split="test")
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert train.num_classes == 10 and len(train.mean) == 3
    data, labels = w["data_batch_2"]  # images 4..7 of the train split
    n, y, x, c = 1, 5, 17, 2  # stored planar: data[n, c*1024 + y*32 + x]
    assert train.images[4 + n, y, x, c] == data[n, c * 1024 + y * 32 + x]
    assert train.labels[4:8].tolist() == labels
    # The batch folder itself works as root, and $BNAO_DATA is searched.
    assert len(create_dataset("cifar10", root=str(tmp_path / "d" / "cifar-10-batches-py"))) == 20
    monkeypatch.setenv("BNAO_DATA", str(tmp_path / "d"))
    assert len(create_dataset("cifar10", split="test")) == 4


def test_cifar100_reader(tmp_path):
    w = _write_cifar(tmp_path / "cifar-100-python", ["train", "test"], "fine_labels", n_per=6)
    ds = create_dataset("cifar100", root=str(tmp_path))
    assert ds.num_classes == 100 and ds.labels.tolist() == w["train"][1]


def _write_idx(path, arr, compress):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    (gzip.open if compress else open)(path, "wb").write(header + arr.tobytes())


def test_fashion_mnist_idx_in_data_dir(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", imgs, True)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(5, dtype=np.uint8), False)  # raw works too
    ds = create_dataset("fashion_mnist", root=str(tmp_path), split="test")
    assert ds.images.shape == (5, 28, 28, 1) and np.array_equal(ds.images[..., 0], imgs)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 2, 3, 4]


def test_missing_dataset_lists_places_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_mod, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    monkeypatch.setenv("BNAO_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        create_dataset("cifar10", root=str(tmp_path / "r"))
    msg = str(e.value)
    for place in (tmp_path / "r" / "cifar-10-batches-py", tmp_path / "env", tmp_path / "data"):
        assert str(place) in msg
    assert "download=True" in msg and isinstance(e.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError) as e:
        create_dataset("fashion_mnist", root=str(tmp_path / "r"))
    msg = str(e.value)
    assert str(tmp_path / "no-debian") in msg and "dataset-fashion-mnist" in msg and str(tmp_path / "env") in msg
    with pytest.raises(DatasetNotFoundError, match="train/<class>"):
        create_dataset("imagenet", root=str(tmp_path / "r"))


def _write_folder(root, per_class=3, size=(40, 48)):
    """Solid-colour JPEGs: red = 60 + 40 * image number, green = 200 * class."""
    from PIL import Image

    colours = {}
    k = 0
    for split in ("train", "val"):
        for cls_i, cls in enumerate(["ant", "bee"]):
            d = root / split / cls
            d.mkdir(parents=True)
            for j in range(per_class if split == "train" else 1):
                colour = (60 + 40 * (k % 5), 200 * cls_i, 90)
                p = d / f"img{j}.JPEG"
                Image.new("RGB", size, colour).save(p, quality=95)
                colours[str(p)] = colour
                k += 1
    return colours


@pytest.fixture
def folder_ds(tmp_path):
    colours = _write_folder(tmp_path / "imnet")
    ds = create_dataset("imagenet", root=str(tmp_path / "imnet"), image_size=32)
    return ds, colours


def test_folder_dataset(folder_ds, tmp_path):
    ds, _ = folder_ds
    assert isinstance(ds, FolderDataset) and ds.classes == ["ant", "bee"] and ds.num_classes == 2
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    val = create_dataset("imagenet", root=str(tmp_path / "imnet"), split="test", image_size=32)
    assert len(val) == 2 and val.labels.tolist() == [0, 1]


def _check_solid(x, y, ds, colours, order):
    """Each image is its file's solid colour, normalised, and its label is its file's class."""
    mean, std = torch.tensor(ds.mean)[:, None, None], torch.tensor(ds.std)[:, None, None]
    for img, label, i in zip(x, y, order):
        want = (torch.tensor(colours[ds.paths[i]], dtype=torch.float32)[:, None, None] / 255 - mean) / std
        assert int(label) == ds.labels[i]
        assert (img - want).abs().max() < 0.08  # JPEG and resampling error on a flat colour


@pytest.mark.parametrize("augment", [True, False])
def test_torch_loader_on_folders(folder_ds, augment):
    ds, colours = folder_ds
    loader = create_loader("torch", ds, 3, augment=augment, shuffle=False)
    batches = take(loader)
    assert len(batches) == len(loader) == 2
    x, y = batches[0]
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    _check_solid(x, y, ds, colours, range(3))


@pytest.mark.dali
@pytest.mark.parametrize("augment", [AugmentConfig(cutout=0), False])
def test_dali_folder_pipeline_cpu(folder_ds, augment):
    pytest.importorskip("nvidia.dali")
    ds, colours = folder_ds
    loader = create_loader("dali", ds, 2, augment=augment, shuffle=True, seed=5, drop_last=False)
    got = take(loader)
    assert len(got) == len(loader) == 3
    x = torch.cat([b[0] for b in got])
    y = torch.cat([b[1] for b in got])
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The order is the loader's seeded permutation, the same one the torch loader uses.
    ref = create_loader("torch", ds, 2, augment=augment, shuffle=True, seed=5, drop_last=False)
    assert torch.equal(y, torch.cat([b[1] for b in take(ref)]))
    from bnao.data.loaders.base import epoch_permutation

    order = epoch_permutation(5, 0, len(ds), True, torch.Generator()).tolist()
    _check_solid(x, y, ds, colours, order)


@pytest.mark.parametrize("name", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_folder_cutout(folder_ds, name):
    _need(name)
    ds, _ = folder_ds
    x = torch.cat([b[0] for b in take(create_loader(name, ds, 3, augment=AugmentConfig(cutout=8), seed=1))])
    holes = (x == 0).all(1).float().mean((1, 2))  # a flat colour is never exactly the mean
    assert (holes <= 64 / 1024).all() and (holes >= 16 / 1024).all()


# ----------------------------------------------------------------------------- split


def test_split_train_dev_sizes_disjoint_deterministic():
    n = 50000
    ds = ArrayDataset(np.zeros((n, 1, 1, 1), np.uint8), np.arange(n), n, (0.0,), (1.0,))
    train, dev = split_train_dev(ds)
    assert (len(train), len(dev)) == (45000, 5000)
    tr, dv = set(train.labels.tolist()), set(dev.labels.tolist())
    assert not tr & dv and len(tr | dv) == n
    train2, dev2 = split_train_dev(ds, seed=0)
    assert np.array_equal(dev.labels, dev2.labels)
    assert not np.array_equal(dev.labels, split_train_dev(ds, seed=1)[1].labels)
    assert len(split_train_dev(ds, dev_size=500)[1]) == 500
    assert len(split_train_dev(ds, dev_fraction=0.2)[1]) == 10000
    with pytest.raises(ValueError):
        split_train_dev(ds, dev_size=0)


def test_split_folder(folder_ds):
    ds, _ = folder_ds
    train, dev = split_train_dev(ds, dev_size=2, seed=3)
    assert len(train) == 4 and len(dev) == 2 and not set(train.paths) & set(dev.paths)
    assert all(ds.labels[ds.paths.index(p)] == lab for p, lab in zip(dev.paths, dev.labels))


# ----------------------------------------------------------------------------- loaders: shapes


@pytest.mark.parametrize("name", ARRAY_LOADERS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_loader_shapes_and_dtypes(name, channels_last):
    _need(name)
    ds = create_dataset("synthetic", num_samples=70, image_shape=(12, 10, 3), num_classes=5)
    loader = create_loader(name, ds, 32, augment=AugmentConfig(cutout=4), drop_last=False,
                           channels_last=channels_last)
    got = take(loader)
    assert len(loader) == len(got) == 3 and [len(b[1]) for b in got] == [32, 32, 6]
    x, y = got[0]
    assert x.shape == (32, 3, 12, 10) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.dtype == torch.int64 and y.max() < 5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt)
    assert len(create_loader(name, ds, 32)) == 2  # drop_last by default


@pytest.mark.parametrize("name", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
@pytest.mark.parametrize("augment", [NO_AUGMENT, AugmentConfig(), AugmentConfig(crop_padding=3, cutout=9)])
def test_loaders_agree_with_tensor_loader(name, augment):
    """Same seeds -> same order and augmentation parameters, so the CPU batches agree."""
    _need(name)
    ds = create_dataset("synthetic", num_samples=100, image_shape=(9, 11, 3), seed=4)
    kw = dict(augment=augment, seed=7, drop_last=False)
    ref = create_loader("tensor", ds, 24, **kw)
    other = create_loader(name, ds, 24, **kw)
    for epoch in (0, 3):
        ref.set_epoch(epoch)
        other.set_epoch(epoch)
        got_ref, got = take(ref), take(other)
        assert len(got_ref) == len(got) == 5
        for (a, ya), (b, yb) in zip(got_ref, got):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- augmentation statistics


def _decode(x, size=32):
    """Crop offsets and flips from coded images (their centre is never padding)."""
    c = size // 2
    dy = x[:, 0, c, c].round().long() - 1 - c
    step = x[:, 1, c, c + 1] - x[:, 1, c, c]
    flip = step < 0
    col = x[:, 1, c, c].round().long() - 1
    dx = torch.where(flip, col - (size - 1 - c), col - c)
    return dy, dx, flip


def test_crop_and_flip_statistics():
    ds = coded_dataset(n=2000)
    loader = create_loader("tensor", ds, 1000, augment=AugmentConfig(crop_padding=4, flip=True))
    xs = torch.cat([x for x, _ in take(loader)] + [x for x, _ in take(loader)])  # two epochs, 4000 images
    dy, dx, flip = _decode(xs)
    assert abs(flip.float().mean().item() - 0.5) < 0.03
    for d in (dy, dx):
        counts = torch.bincount(d + 4, minlength=9)
        assert d.min() >= -4 and d.max() <= 4 and counts.numel() == 9
        expected = len(d) / 9
        chi2 = (((counts - expected) ** 2) / expected).sum().item()
        assert chi2 < 26.1  # chi-square, 8 dof, p = 0.001
    # Rows/cols shifted in from outside are zero padding (raw 0 in every channel).
    i = int(torch.nonzero(dy == -3)[0])
    assert (xs[i, :, :3] == 0).all() and (xs[i, 2, 3, 4:28] == 200).all()
    # Away from the border every pixel is the shifted (and possibly mirrored) source pixel.
    rows = torch.arange(4, 28)
    assert torch.equal(xs[:, 0, 4:28, 16], (rows[None] + dy[:, None] + 1).float())


def test_cutout_area_and_shape():
    ds = ArrayDataset(np.full((3000, 32, 32, 1), 200, np.uint8), np.zeros(3000), 1, (0.0,), (1 / 255,))
    length = 16
    loader = create_loader("tensor", ds, 1000, augment=AugmentConfig(crop_padding=0, flip=False, cutout=length))
    x = torch.cat([b[0] for b in take(loader)])[:, 0]
    holes = x == 0
    assert set(x.unique().tolist()) == {0.0, 200.0}
    # Every hole is one clipped axis-aligned square: its bounding box is full.
    rows, cols = holes.any(2), holes.any(1)
    assert torch.equal(holes.sum((1, 2)), rows.sum(1) * cols.sum(1))
    assert rows.sum(1).min() >= length // 2 and rows.sum(1).max() <= length
    # Mean area against the exact expectation for a uniformly drawn centre.
    side = np.mean([min(c + 8, 32) - max(c - 8, 0) for c in range(32)])
    assert abs(holes.float().sum((1, 2)).mean().item() - side**2) < 0.03 * side**2


def test_normalised_fashion_mnist_is_standard():
    try:
        ds = create_dataset("fashion_mnist")
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    loader = create_loader("tensor", ds, 10000, augment=False, shuffle=False)
    total = sq = 0.0
    count = 0
    for x, y in loader:
        total += x.double().sum().item()
        sq += (x.double() ** 2).sum().item()
        count += x.numel()
    mean = total / count
    std = math.sqrt(sq / count - mean**2)
    assert abs(mean) < 0.01 and abs(std - 1) < 0.01


# ----------------------------------------------------------------------------- epochs and resume


@pytest.mark.parametrize("name", ARRAY_LOADERS)
def test_a_live_loader_takes_the_seed_of_a_loaded_state(name):
    """A loader that already ran, given another run's state at the position it has reached, gives that run's
    batches (DALI's running pipeline once kept its old seed there)."""
    _need(name)
    ds = create_dataset("synthetic", num_samples=100, image_shape=(8, 8, 3), seed=2)
    live = create_loader(name, ds, 32, seed=1)
    list(live)  # its pipeline now stands at (epoch 1, batch 0)
    other = create_loader(name, ds, 32, seed=2)
    state = dict(other.state_dict(), epoch=1, position=0)
    live.load_state_dict(state)
    other.load_state_dict(state)
    (x, y), (want_x, want_y) = next(iter(live)), next(iter(other))
    assert torch.equal(y, want_y) and torch.equal(x, want_x)


@pytest.mark.parametrize("name", ARRAY_LOADERS)
def test_resume_gives_identical_batches(name):
    _need(name)
    ds = create_dataset("synthetic", num_samples=200, image_shape=(8, 8, 3), seed=2)
    kw = dict(augment=AugmentConfig(cutout=4), seed=11)
    full = create_loader(name, ds, 32, **kw)
    stream = full.stream()
    reference = [tuple(t.clone() for t in next(stream)) for _ in range(14)]  # crosses 2 epoch ends
    for k in (3, 6, 9):
        first = create_loader(name, ds, 32, **kw)
        s = first.stream()
        for _ in range(k):
            next(s)
        state = first.state_dict()
        resumed = create_loader(name, ds, 32, **kw)
        resumed.load_state_dict(state)
        rest = resumed.stream()
        for want_x, want_y in reference[k:]:
            x, y = next(rest)
            assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_epochs_differ_and_set_epoch_repeats():
    ds = create_dataset("synthetic", num_samples=64, image_shape=(4, 4, 1))
    loader = create_loader("tensor", ds, 16)
    e0 = take(loader)
    e1 = take(loader)
    assert loader.epoch == 2 and not torch.equal(e0[0][1], e1[0][1])
    loader.set_epoch(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(take(loader), e1))
    # A fully consumed epoch whose loop was not closed still moves on to the next one.
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    fresh = create_loader("tensor", ds, 16)
    fresh.set_epoch(loader.epoch + 1)
    assert torch.equal(take(loader)[0][1], take(fresh)[0][1])
    with pytest.raises(ValueError, match="batch_size"):
        create_loader("tensor", ds, 8).load_state_dict(loader.state_dict())


# ----------------------------------------------------------------------------- choice and errors


def test_auto_rule_on_cpu(folder_ds):
    ds = create_dataset("synthetic", num_samples=16, image_shape=(4, 4, 3))
    assert choose_loader(ds, "cpu") == "tensor"
    assert choose_loader(folder_ds[0], "cpu") == "torch"
    assert create_loader("auto", ds, 8, num_workers=0).name == "tensor"
    assert create_loader("auto", folder_ds[0], 2).name == "torch"


def test_dali_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    ds = create_dataset("synthetic", num_samples=16, image_shape=(4, 4, 3))
    with pytest.raises(LoaderUnavailableError, match=r"pip install \.\[dali\]"):
        create_loader("dali", ds, 8)
    assert not dali_available() and "dali" not in available_loaders("cpu")


def test_tensor_loader_rejects_folders(folder_ds):
    with pytest.raises(TypeError, match="ArrayDataset"):
        create_loader("tensor", folder_ds[0], 2)


@pytest.mark.cuda
def test_tensor_loader_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ds = create_dataset("synthetic", num_samples=300, image_shape=(32, 32, 3))
    kw = dict(device="cuda", augment=AugmentConfig(cutout=16), channels_last=True)
    loader = create_loader("tensor", ds, 64, **kw)
    batches = take(loader, 3)
    x, y = batches[0]
    assert x.is_cuda and y.is_cuda and x.shape == (64, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    again = create_loader("tensor", ds, 64, **kw)
    again.load_state_dict({**loader.state_dict(), "epoch": 0, "position": 1})
    assert torch.equal(next(iter(again))[0], batches[1][0])
