"""Stand-alone network builder (bnao.nets): shapes, forward/backward, drop-path, auxiliary head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from bnao.nets import build_network
from bnao.nets.layers import AuxHeadCIFAR, AuxHeadImageNet, FactorizedReduce, make_op, scheduled_keep_prob
from bnao.size import model_size
from bnao.space import InvalidArchError, NAOSpace
from bnao.space.ops import op_table


@pytest.mark.parametrize("op_set", ["small", "middle"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_every_op_keeps_channels_and_halves_with_ceil(op_set, stride, size):
    x = torch.randn(2, 6, size, size)
    want = size if stride == 1 else (size + 1) // 2
    for kind, kernel in op_table(op_set):
        y = make_op(kind, kernel, 6, stride)(x)
        assert y.shape == (2, 6, want, want), (kind, kernel, stride)


def test_factorized_reduce_odd_channels():
    fr = FactorizedReduce(5, 7)
    assert fr(torch.randn(1, 5, 9, 9)).shape == (1, 7, 5, 5)
    assert fr.conv1.out_channels == 3 and fr.conv2.out_channels == 4


@pytest.mark.parametrize("size", [8, 7, 4, 2])
def test_aux_heads_any_resolution(size):
    for head in (AuxHeadCIFAR(16, 10), AuxHeadImageNet(16, 10)):
        assert head(torch.randn(2, 16, size, size)).shape == (2, 10)


def test_scheduled_keep_prob():
    # Last cell at the end of training: the base rate; first cell at step 0 of 10: almost no drop.
    assert scheduled_keep_prob(0.6, 10, 11, 99, 100) == pytest.approx(0.6)
    assert scheduled_keep_prob(0.6, 0, 11, 0, 10) == pytest.approx(1 - 0.1 * (1 / 11) * 0.4)
    assert scheduled_keep_prob(0.6, 4, 10, None, None) == pytest.approx(1 - 0.5 * 0.4)
    assert scheduled_keep_prob(1.0, 3, 10, 5, 10) == 1.0


@pytest.mark.parametrize(
    "skeleton,op_set,image,in_ch,classes",
    [("cifar", "small", 32, 3, 10), ("cifar", "middle", 28, 1, 10), ("imagenet", "small", 64, 3, 20),
     ("imagenet", "middle", 48, 3, 5)],
)
def test_forward_backward_aux_drop_path(skeleton, op_set, image, in_ch, classes):
    torch.manual_seed(0)
    space = NAOSpace(op_set=op_set)
    arch = space.sample(3)
    net = build_network(arch, space, skeleton, layers=1, channels=8, num_classes=classes, in_channels=in_ch,
                        auxiliary=True, drop_path_keep_prob=0.5, dropout=0.1, total_steps=10)
    # The auxiliary head is extra: the closed form counts everything else.
    aux = sum(p.numel() for p in net.auxiliary_head.parameters())
    total = sum(p.numel() for p in net.parameters())
    assert total - aux == model_size(arch, space, skeleton, layers=1, channels=8, classes=classes,
                                     in_channels=in_ch)[0]
    x = torch.randn(4, in_ch, image, image)
    net.train()
    net.set_step(9)
    logits, aux_logits = net(x)
    assert logits.shape == (4, classes) and aux_logits.shape == (4, classes)
    (logits.logsumexp(1).mean() + 0.4 * aux_logits.logsumexp(1).mean()).backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in net.auxiliary_head.parameters() for g in [g.grad])
    net.eval()
    with torch.no_grad():
        out = net(x)
        assert isinstance(out, torch.Tensor) and out.shape == (4, classes)
        assert torch.equal(out, net(x))  # no drop-path, no dropout in eval


def test_drop_path_is_active_in_training():
    torch.manual_seed(1)
    space = NAOSpace(op_set="small")
    arch = space.parse(" ".join(["0 0 1 1"] * 10))  # sep convs only: every branch can be dropped
    net = build_network(arch, space, layers=1, channels=4, drop_path_keep_prob=0.5)
    x = torch.randn(8, 3, 16, 16)
    # BN in eval mode isolates drop-path as the only source of randomness in train mode.
    net.train()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
            m.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
    assert not torch.equal(a, b)
    no_drop = build_network(arch, space, layers=1, channels=4, drop_path_keep_prob=None)
    no_drop.load_state_dict(net.state_dict())
    no_drop.train()
    for m in no_drop.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
            m.eval()
    with torch.no_grad():
        assert torch.equal(no_drop(x), no_drop(x))


def test_drop_path_on_identity_as_the_reference_unless_exempted():
    # The reference's Node drops every branch (identity included); zero stays zero either way.
    space = NAOSpace(op_set="middle")
    arch = space.parse(" ".join(["0 0 1 1"] * 5 + ["0 2 1 8"] * 5))
    net = build_network(arch, space, layers=1, channels=4, drop_path_keep_prob=0.8)
    normal, reduction = net.cells[0], net.cells[1]
    assert all(not n.x_drop and n.y_drop for n in normal.nodes)  # zero, identity
    assert all(n.x_drop and n.y_drop for n in reduction.nodes)  # sep conv, avg pool
    exempt = build_network(arch, space, layers=1, channels=4, drop_path_keep_prob=0.8, drop_path_identity=False)
    assert all(not n.x_drop and not n.y_drop for n in exempt.cells[0].nodes)


def test_identity_branch_is_dropped_in_training():
    # A normal cell of identities only: with drop-path on identity some samples of a state are zeroed.
    space = NAOSpace()
    identity = space.op_names.index("identity")
    normal = [0, identity, 1, identity] * 5
    net = build_network(normal + [0, 0] * 10, space, layers=1, channels=4, drop_path_keep_prob=0.5)
    cell = net.cells[0].train()
    torch.manual_seed(0)
    s = torch.randn(1, 12, 4, 4).expand(64, 12, 4, 4).contiguous()  # every sample the same
    out = cell(s, s, 0.5)
    # Inputs are calibrated (ReLU-conv-BN) then summed per node: dropped branches show as per-sample
    # differences; without drop-path every sample stays identical.
    per_sample = out.flatten(1)
    assert not torch.allclose(per_sample, per_sample[:1].expand_as(per_sample))
    assert torch.allclose(*(lambda o: (o, o[:1].expand_as(o)))(cell(s, s, None).flatten(1)))


def test_factorized_reduce_relu_only_in_calibration():
    # The reference: ReLU before the calibration's factorized reduce (MaybeCalibrateSize), none in
    # the identity-with-stride-2 op or the loose-end reductions (FactorizedReduce itself has no ReLU).
    space = NAOSpace()
    identity = space.op_names.index("identity")
    reduce_arch = [1, identity, 1, identity] + [2, 0, 2, 0] * 4  # input 0 is a loose end
    net = build_network([0, 0, 1, 0] * 5 + reduce_arch, space, layers=1, channels=4)
    reduction, after = net.cells[1], net.cells[2]
    assert reduction.nodes[0].x_op.relu is False and reduction.nodes[0].y_op.relu is False
    assert list(reduction.reduce_loose) == ["0"] and reduction.reduce_loose["0"].relu is False
    assert after.pre0.relu is True
    # By hand: 1x1 weights of one, BN as the identity (eval mode, fresh statistics): a negative input
    # passes through without ReLU and becomes zero with it.
    fr = FactorizedReduce(1, 2).eval()
    with torch.no_grad():
        fr.conv1.weight.fill_(1.0)
        fr.conv2.weight.fill_(1.0)
    x = -torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    expected = torch.stack([x[0, 0, ::2, ::2], x[0, 0, 1::2, 1::2]])[None] / math.sqrt(1 + 1e-5)
    torch.testing.assert_close(fr(x), expected)
    fr.relu = True
    assert torch.count_nonzero(fr(x)) == 0


def test_structure_matches_nao():
    space = NAOSpace()
    net = build_network(space.sample(0), space, layers=2, channels=6, auxiliary=True)
    assert len(net.cells) == 8 and net.reduction_indices == (2, 5)
    assert net.auxiliary_head is not None and net.aux_index == 5
    assert net.stem[0].out_channels == 18
    with pytest.raises(InvalidArchError):
        build_network("0 1 0 1", space)
    with pytest.raises(ValueError, match="skeleton"):
        build_network(space.sample(0), space, skeleton="resnet")
    with pytest.raises(ValueError, match="layers"):
        build_network(space.sample(0), space, layers=0)
    # An op-set name builds in that space.
    assert build_network(NAOSpace(op_set="middle").sample(1), "middle", layers=1, channels=4) is not None


def test_imagenet_224_shapes_on_meta():
    space = NAOSpace()
    with torch.device("meta"):
        net = build_network(space.sample(5), space, "imagenet", layers=1, channels=16, num_classes=1000,
                            auxiliary=True)
        net.train()
        logits, aux = net(torch.empty(2, 3, 224, 224))
    assert logits.shape == (2, 1000) and aux.shape == (2, 1000)
