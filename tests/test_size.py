"""Closed-form model size (bnao.size, csrc/size) against the networks bnao.nets builds."""

from __future__ import annotations

import contextlib
import io
import itertools
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn

from bnao.cli import main as cli_main
from bnao.extension import has_kernel
from bnao.nets import build_network
from bnao.size import SKELETON_CODES, count_reference, model_size
from bnao.space import InvalidArchError, NAOSpace
from bnao.space.ops import op_table

HAS_CPP = has_kernel("model_size", "cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="compiled model_size kernel not built")

# (layers N, channels C, classes, in_channels); odd C exercises the odd factorized-reduce split.
# Mostly N=1: building a network costs ~20 ms per 5 cells (nn.Module overhead) and
# deeper stacks only repeat the same cells; N=2 and N=3 are covered too.
CONFIGS = {
    "cifar": [(1, 4, 10, 3), (2, 8, 10, 1), (3, 6, 7, 3), (1, 5, 100, 3), (1, 20, 10, 3), (1, 7, 1, 2),
              (1, 36, 10, 1)],
    "imagenet": [(1, 4, 1000, 3), (2, 6, 10, 1), (3, 4, 10, 3), (1, 9, 5, 3), (1, 48, 1000, 3), (1, 3, 2, 2),
                 (1, 10, 10, 1)],
}
NUM_ARCHS = 500
SEEDS = {("small", "cifar"): 101, ("small", "imagenet"): 102, ("middle", "cifar"): 103, ("middle", "imagenet"): 104}


@contextlib.contextmanager
def shapes_only():
    """Builds modules on the meta device without running weight init (shapes, hence counts, are unchanged)."""
    noop = lambda self: None  # noqa: E731
    with torch.device("meta"), \
            mock.patch.object(nn.modules.conv._ConvNd, "reset_parameters", noop), \
            mock.patch.object(nn.modules.batchnorm._NormBase, "reset_parameters", noop), \
            mock.patch.object(nn.Linear, "reset_parameters", noop):
        yield


def n_params(net: nn.Module) -> int:
    """Parameters of a built network, auxiliary head excluded."""
    return sum(p.numel() for name, p in net.named_parameters() if not name.startswith("auxiliary_head."))


def hook_madds(net: nn.Module, image_size: int, in_channels: int) -> int:
    """Multiply-adds per image counted by forward hooks on every Conv2d / Linear during a meta forward."""
    total = [0]

    def conv_hook(mod, inp, out):
        kh, kw = mod.kernel_size
        total[0] += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod, inp, out):
        total[0] += mod.in_features * mod.out_features

    handles = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    net.eval()
    with torch.no_grad():
        logits = net(torch.empty(1, in_channels, image_size, image_size, device="meta"))
    for h in handles:
        h.remove()
    assert logits.shape[0] == 1
    return total[0]


def both_backends(archs, space, **kw):
    """(params, madds) per arch from the reference and, when built, the C++ kernel (asserted equal)."""
    ref = model_size(archs, space, measure="both", backend="reference", **kw)
    if HAS_CPP:
        cpp = model_size(archs, space, measure="both", backend="cpp", **kw)
        np.testing.assert_array_equal(cpp, ref)
    return ref


@pytest.mark.parametrize("skeleton", ["cifar", "imagenet"])
@pytest.mark.parametrize("op_set", ["small", "middle"])
def test_params_equal_built_network(op_set, skeleton):
    """500 random archs per op set and skeleton over several N, C, classes, in_channels."""
    space = NAOSpace(op_set=op_set)
    # A fixed seed per case (hash() of a string changes with every process, PYTHONHASHSEED).
    rng = np.random.default_rng(SEEDS[op_set, skeleton])
    archs = space.sample_array(NUM_ARCHS, rng)
    configs = CONFIGS[skeleton]
    mismatches = []
    for start, (layers, channels, classes, in_ch) in enumerate(configs):
        chunk = archs[start :: len(configs)]
        counts = both_backends(chunk, space, skeleton=skeleton, layers=layers, channels=channels, classes=classes,
                               in_channels=in_ch)[:, 0]
        with shapes_only():
            for arch, want in zip(chunk, counts):
                net = build_network(arch, space, skeleton, layers=layers, channels=channels, num_classes=classes,
                                    in_channels=in_ch)
                got = n_params(net)
                if got != want:
                    mismatches.append((space.format(arch), layers, channels, classes, in_ch, got, int(want)))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


# (skeleton, image sizes): 28 = Fashion-MNIST, odd sizes halve with rounding up.
MADDS_CASES = [("cifar", (32, 28, 15)), ("imagenet", (224, 64, 97))]


@pytest.mark.parametrize("skeleton,sizes", MADDS_CASES)
@pytest.mark.parametrize("op_set", ["small", "middle"])
def test_madds_equal_forward_hooks(op_set, skeleton, sizes):
    space = NAOSpace(op_set=op_set)
    rng = np.random.default_rng(7 + len(op_set) + len(skeleton))
    configs = CONFIGS[skeleton]
    per_case = 2  # a meta forward costs ~0.1 s; the kernels are cross-checked on many more archs elsewhere
    for (layers, channels, classes, in_ch), image_size in itertools.product(configs[:3], sizes):
        archs = space.sample_array(per_case, rng)
        counts = both_backends(archs, space, skeleton=skeleton, layers=layers, channels=channels, classes=classes,
                               in_channels=in_ch, image_size=image_size)
        for arch, (params, madds) in zip(archs, counts):
            with shapes_only():
                net = build_network(arch, space, skeleton, layers=layers, channels=channels, num_classes=classes,
                                    in_channels=in_ch)
                got = hook_madds(net, image_size, in_ch)
            assert got == madds, (space.format(arch), layers, channels, image_size, got, int(madds))


def test_hand_counts():
    """The counts derived by hand in csrc/tests/test_model_size.cpp, through Python and the built network."""
    cfg = dict(layers=1, channels=4, classes=10, in_channels=3, image_size=8)
    cases = {2: (6694, 91328), 3: (6694, 91328), 4: (10374, 111808), 0: (31254, 308928)}
    space = NAOSpace(op_set="small")
    for op, want in cases.items():
        arch = [0, op, 0, op] * 10
        assert tuple(both_backends(arch, space, **cfg)[0]) == want
        with shapes_only():
            net = build_network(arch, space, layers=1, channels=4)
            assert n_params(net) == want[0]
            assert hook_madds(net, 8, 3) == want[1]


@needs_cpp
@pytest.mark.parametrize("op_set", ["small", "middle"])
def test_cpp_equals_reference_many(op_set):
    """The C++ kernel and the Python reference agree on many archs, node counts and sizes (3: the smallest
    image a cifar network runs on)."""
    for num_nodes, skeleton, layers, channels, image_size in [(5, "cifar", 3, 20, 32), (5, "cifar", 6, 36, 32),
                                                              (5, "imagenet", 4, 48, 224), (2, "cifar", 2, 11, 28),
                                                              (7, "imagenet", 1, 5, 33), (1, "cifar", 1, 1, 3)]:
        space = NAOSpace(num_nodes=num_nodes, op_set=op_set)
        archs = space.sample_array(400, num_nodes)
        kw = dict(skeleton=skeleton, layers=layers, channels=channels, classes=10, image_size=image_size)
        np.testing.assert_array_equal(model_size(archs, space, measure="both", backend="cpp", **kw),
                                      model_size(archs, space, measure="both", backend="reference", **kw))


@needs_cpp
def test_cpp_threads_agree_and_defaults():
    space = NAOSpace()
    archs = space.sample_array(100_000, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_size(archs, backend="cpp", measure="both")
        torch.set_num_threads(max(2, threads))
        many = model_size(archs, backend="cpp", measure="both")
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one, many)
    sub = archs[:: 997]
    np.testing.assert_array_equal(one[:: 997], model_size(sub, backend="reference", measure="both"))


def test_api_forms():
    space = NAOSpace()
    arch = space.sample(11)
    text = str(arch)
    want = model_size(arch.to_array()[None, :])
    assert want.dtype == np.int64 and want.shape == (1,)
    for form in (text, arch, arch.to_list(), arch.to_array(), torch.from_numpy(arch.to_array()),
                 {"normal": list(arch.normal), "reduction": list(arch.reduction)}, [text], [arch]):
        out = model_size(form)
        assert out.dtype == np.int64 and out.shape == (1,)
        assert out[0] == want[0]
    pool = space.sample_array(5, 1)
    assert model_size(pool).shape == (5,)
    assert model_size([space.format(a) for a in pool]).tolist() == model_size(pool).tolist()
    assert model_size(pool.astype(np.int32)).tolist() == model_size(pool).tolist()
    assert model_size([]).shape == (0,)
    assert model_size(np.zeros((0, 40), dtype=np.int64)).shape == (0,)
    both = model_size(pool, measure="both")
    assert both.shape == (5, 2)
    assert both[:, 0].tolist() == model_size(pool).tolist()
    assert both[:, 1].tolist() == model_size(pool, measure="madds").tolist()
    # Defaults: cifar at 32x32, imagenet at 224x224; a different B through num_nodes or a space.
    assert model_size(pool, measure="madds").tolist() == model_size(pool, measure="madds", image_size=32).tolist()
    assert (model_size(pool, skeleton="imagenet", measure="madds")
            == model_size(pool, skeleton="imagenet", measure="madds", image_size=224)).all()
    b3 = NAOSpace(num_nodes=3, op_set="middle")
    small = b3.sample_array(4, 2)
    assert model_size(small, "middle", num_nodes=3).tolist() == model_size(small, b3).tolist()
    # Bigger networks have more parameters.
    assert (model_size(pool, channels=36, layers=6) > model_size(pool)).all()


@pytest.mark.parametrize("backend", ["reference"] + (["cpp", "auto"] if HAS_CPP else []))
def test_invalid_archs(backend):
    space = NAOSpace()
    good = space.sample_array(6, 5)
    bad = good.copy()
    bad[4, 5] = 9  # normal cell, node 3, x_op out of range
    with pytest.raises(InvalidArchError, match=r"arch 4: normal cell, node 3 \(position 5\), x_op"):
        model_size(bad, backend=backend)
    bad = good.copy()
    bad[2, 20 + 8] = 4  # reduction cell, node 4, x_id 4 is not earlier
    with pytest.raises(InvalidArchError, match=r"arch 2: reduction cell, node 4 .*input id 4"):
        model_size(bad, backend=backend)
    bad = good.copy()
    bad[0, 0] = -1
    with pytest.raises(InvalidArchError, match="arch 0"):
        model_size(bad, backend=backend)
    with pytest.raises(InvalidArchError, match="40 integers"):
        model_size("0 1 0 1", backend=backend)
    with pytest.raises(InvalidArchError, match="shape"):
        model_size(np.zeros((3, 39), dtype=np.int64), backend=backend)
    with pytest.raises(InvalidArchError, match="integers"):
        model_size(good.astype(np.float64), backend=backend)
    with pytest.raises(InvalidArchError, match="arch 1"):
        model_size([space.format(good[0]), "0 1 x"], backend=backend)


def test_invalid_arguments():
    arch = NAOSpace().sample(0)
    for kw, pattern in [(dict(skeleton="mobile"), "skeleton"), (dict(measure="flops"), "measure"),
                        (dict(layers=0), "layers"), (dict(channels=-1), "channels"), (dict(classes=0), "classes"),
                        (dict(image_size=0), "image_size"), (dict(skeleton="imagenet", channels=1), "channels"),
                        (dict(backend="gpu"), "backend"), (dict(space="large"), "op set")]:
        with pytest.raises(ValueError, match=pattern):
            model_size(arch, **kw)
    with pytest.raises(TypeError):
        model_size(arch, space=5)
    with mock.patch("bnao.size.has_kernel", return_value=False):
        with pytest.raises(RuntimeError, match="not available"):
            model_size(arch, backend="cpp")


def test_auto_backend_falls_back_to_the_reference():
    """Without the kernel, "auto" runs the Python reference and gives the hand counts; with it, the kernel."""
    # Hand counts of csrc/tests/test_model_size.cpp (N=1, C=4, 10 classes, 3 channels, 8x8): all-avg-pool,
    # all-identity and all-sep_conv_3x3 archs whose every node reads input 0.
    cfg = dict(layers=1, channels=4, classes=10, in_channels=3, image_size=8, measure="both")
    hand = {2: [6694, 91328], 4: [10374, 111808], 0: [31254, 308928]}
    archs = np.array([[0, op, 0, op] * 10 for op in hand], dtype=np.int64)
    want = np.array(list(hand.values()), dtype=np.int64)
    with mock.patch("bnao.size.has_kernel", return_value=False), \
            mock.patch("bnao.size.count_reference", wraps=count_reference) as reference:
        np.testing.assert_array_equal(model_size(archs, **cfg), want)
    assert reference.call_count == len(hand), "the fallback did not run the Python reference"
    if not HAS_CPP:
        pytest.skip("compiled model_size kernel not built: no compiled side to check")
    with mock.patch("bnao.size.count_reference", wraps=count_reference) as reference:
        np.testing.assert_array_equal(model_size(archs, **cfg), want)
    assert reference.call_count == 0, "with the kernel built, 'auto' ran the Python reference"


@needs_cpp
def test_kernel_checks_and_fake():
    table = op_table("small")
    kinds, kernels = [k for k, _ in table], [s for _, s in table]
    op = torch.ops.bnao.model_size
    archs = torch.from_numpy(NAOSpace().sample_array(3, 0))
    args = (5, kinds, kernels, SKELETON_CODES["cifar"], 3, 20, 10, 3, 32)
    assert op(archs, *args).shape == (3, 2)
    with pytest.raises(RuntimeError, match="int64"):
        op(archs.int(), *args)
    with pytest.raises(RuntimeError, match=r"shape \[n, 40\]"):
        op(archs[:, :39], *args)
    bad = archs.clone()
    bad[1, 21] = 7
    with pytest.raises(RuntimeError, match=r"arch 1: reduction cell, node 2 \(position 21\), x_op"):
        op(bad, *args)
    with pytest.raises(RuntimeError, match="skeleton"):
        op(archs, 5, kinds, kernels, 2, 3, 20, 10, 3, 32)
    with pytest.raises(RuntimeError, match="unknown kind"):
        op(archs, 5, [9] + kinds[1:], kernels, 0, 3, 20, 10, 3, 32)
    with pytest.raises(RuntimeError, match="overflow"):
        op(archs, 5, kinds, kernels, 0, 1 << 20, 1 << 24, 10, 3, 1 << 20)
    # Fake (meta) kernel: shape propagation without computing.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(archs)
        out = op(fake, *args)
    assert out.shape == (3, 2) and out.dtype == torch.int64


def _cli(argv, stdin_text=None, capsys=None):
    if stdin_text is not None:
        with mock.patch.object(sys, "stdin", io.StringIO(stdin_text)):
            code = cli_main(argv)
    else:
        code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_size(tmp_path, capsys):
    space = NAOSpace()
    archs = space.sample_array(3, 4)
    strings = [space.format(a) for a in archs]
    params = model_size(archs)
    both = model_size(archs, measure="both", layers=2, channels=8, classes=100, in_channels=1, image_size=28)

    code, out, _ = _cli(["size", *strings], capsys=capsys)
    assert code == 0 and out.split() == [str(v) for v in params]

    path = tmp_path / "archs.txt"
    path.write_text("# pool\n" + strings[0] + "\n\n" + "\n".join(strings[1:]) + "\n")
    code, out, _ = _cli(["size", "--file", str(path), "--measure", "both", "--layers", "2", "--channels", "8",
                         "--classes", "100", "--in-channels", "1", "--image-size", "28"], capsys=capsys)
    assert code == 0
    assert [line.split() for line in out.strip().splitlines()] == [[str(p), str(m)] for p, m in both]

    code, out, _ = _cli(["size", "-f", "-", "--measure", "madds", "--skeleton", "imagenet"],
                        stdin_text="\n".join(strings) + "\n", capsys=capsys)
    assert code == 0
    assert out.split() == [str(v) for v in model_size(archs, skeleton="imagenet", measure="madds")]

    mid = NAOSpace(num_nodes=3, op_set="middle").sample(1)
    code, out, _ = _cli(["size", str(mid), "--space", "middle", "--nodes", "3"], capsys=capsys)
    assert code == 0 and int(out) == model_size(mid, "middle", num_nodes=3)[0]


def test_cli_size_errors(tmp_path, capsys):
    space = NAOSpace()
    good = space.format(space.sample(0))
    path = tmp_path / "archs.txt"
    path.write_text(good + "\n\n" + good.replace("0", "7", 1) + "\n")
    code, out, err = _cli(["size", "--file", str(path)], capsys=capsys)
    assert code == 2 and out == ""
    assert "line 3" in err
    code, _, err = _cli(["size", good, "0 1 0 x"], capsys=capsys)
    assert code == 2 and "argument 2" in err
    code, _, err = _cli(["size"], capsys=capsys)
    assert code == 2 and "no archs" in err
    code, _, err = _cli(["size", good, "--layers", "0"], capsys=capsys)
    assert code == 2 and "layers" in err
    code, _, err = _cli(["size", "--file", str(tmp_path / "missing.txt")], capsys=capsys)
    assert code == 2 and "cannot read" in err
