"""Faithful to the reference (NAO_pytorch, NAO_V2): one test per behaviour that bnao once got wrong.

Each test compares with a value computed independently of bnao's code: by hand, with
``torch.optim.SGD`` on per-slot parameters, or with an explicit count.
"""

import math

import numpy as np
import pytest
import torch

from bnao.controller import NAOController
from bnao.data import create_dataset, create_loader
from bnao.ops.cell import factorized_reduce
from bnao.sampling import create_sampler
from bnao.search.config import DEFAULTS, load_config
from bnao.space import NAOSpace
from bnao.supernet import RandomBatches, Supernet, SupernetTrainer, evaluate_pool

SPACE = NAOSpace()


def _trainer(pool, steps_total=20, **kw):
    torch.manual_seed(0)
    model = Supernet(SPACE, layers=1, channels=4, num_classes=4, drop_path_keep_prob=0.8)
    sampler = create_sampler("uniform", np.ones(len(pool)), seed=5)
    data = create_dataset("synthetic", num_samples=40, image_shape=(8, 8, 3), num_classes=4)
    loader = create_loader("tensor", data, 8, device="cpu", augment=False, shuffle=True, drop_last=True, seed=1)
    return SupernetTrainer(model, sampler, pool, loader, steps_total=steps_total, **kw)


# ---------------------------------------------------------------- 1. drop-path ramp per iteration
def test_drop_path_ramp_restarts_with_every_search_iteration():
    # The reference resets its step counter to 0 at every iteration and scales the drop rate by
    # (step + 1) / steps with steps = one iteration. Cell 0 of 5 with keep 0.8: keep = 1 - r * 0.2 / 5.
    trainer = _trainer(SPACE.sample_array(3, 0), steps_total=10)
    seen = []
    original = trainer.model.set_step
    trainer.model.set_step = lambda step: (seen.append(step), original(step))
    trainer.train_steps(10)
    assert seen == list(range(10))
    trainer.restart_schedule(10)  # the next search iteration
    trainer.train_steps(1)
    assert seen[-1] == 0
    assert trainer.model.keep_probs()[0] == pytest.approx(1 - 0.1 * 0.2 / 5)


# ---------------------------------------------------------------- 2. controller data volume
def test_controller_trains_on_expand_copies_drawn_once():
    # 30 archs, 10% held out -> 27 training archs; expand=10 -> 270 per epoch -> ceil(270/100) = 3 Adam steps.
    archs = SPACE.sample_array(30, 1)
    scores = np.linspace(0.1, 0.9, 30)
    ctrl = NAOController(SPACE, seed=0)
    steps, swaps = [], []
    original_swap = ctrl._swap_branches
    ctrl._swap_branches = lambda tokens: (swaps.append(1), original_swap(tokens))[1]
    ctrl.fit(archs, scores, epochs=2, batch_size=100, expand=10,
             progress=lambda e, n, m: steps.append(int(ctrl.optimizer.state[next(iter(ctrl.optimizer.state))]["step"])))
    assert [int(s) for s in steps] == [3, 6]
    assert len(swaps) == 9  # drawn once for the whole fit, as the reference
    swaps.clear()
    ctrl.fit(archs, scores, epochs=2, batch_size=100, expand=10, expand_redraw=True)
    assert len(swaps) == 18
    assert DEFAULTS["controller"]["expand"] == 10 and DEFAULTS["controller"]["expand_redraw"] is False
    with pytest.raises(ValueError, match="expand"):
        ctrl.fit(archs, scores, epochs=1, expand=0)


# ---------------------------------------------------------------- 3. factorized reduce without ReLU
def test_supernet_factorized_reduce_has_no_relu_but_the_calibration_does():
    x = -torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    x[1] *= 2  # two samples, so batch statistics are not degenerate
    w = torch.ones(1, 2, 1)
    g, b = torch.ones(1, 2), torch.zeros(1, 2)
    out = factorized_reduce([x], w, g, b, None, True, False, 0.1, 1e-5)
    # By hand: even pixels and odd pixels of each sample, each channel normalised over the batch.
    parts = torch.stack([x[:, 0, ::2, ::2], x[:, 0, 1::2, 1::2]], 1)
    mean = parts.mean(dim=(0, 2, 3), keepdim=True)
    var = parts.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (parts - mean) / torch.sqrt(var + 1e-5))
    # The calibration after a reduction cell keeps the reference's ReLU: a negative input vanishes.
    model = Supernet(SPACE, layers=1, channels=4, num_classes=4)
    fixed = model.fixed[2]  # first cell after the first reduction
    assert fixed.pre0 == "fr"
    s0 = -torch.rand(2, 4, 8, 8) - 0.1
    c0, _ = fixed.calibrate(s0, torch.randn(2, 8, 4, 4), batch_stats=True, update=False)
    torch.testing.assert_close(c0, fixed.pre0_bn.bias.detach().view(1, -1, 1, 1).expand_as(c0))


# ---------------------------------------------------------------- 4. evaluation data
def test_random_evaluation_data_gives_every_arch_its_own_batch():
    data = create_dataset("synthetic", num_samples=40, image_shape=(8, 8, 3), num_classes=4, seed=3)
    loader = create_loader("tensor", data, 10, device="cpu", augment=False, shuffle=True, drop_last=True, seed=2)
    model = Supernet(SPACE, layers=1, channels=4, num_classes=4)
    archs = SPACE.sample_array(6, 4)
    random_batches = RandomBatches(loader)
    state = random_batches.state_dict()
    acc, _ = evaluate_pool(model, archs, random_batches)
    # Independently: the loader's batches in order, one per arch, each scored by a plain forward.
    check = create_loader("tensor", data, 10, device="cpu", augment=False, shuffle=True, drop_last=True, seed=2)
    check.load_state_dict(state)
    stream = check.stream()
    model.eval()
    with torch.no_grad():
        expected = []
        for row in archs:
            x, y = next(stream)
            expected.append(float((model(x, tuple(row.tolist()), bn_train=True).argmax(1) == y).float().mean()))
    np.testing.assert_allclose(acc, expected)
    assert DEFAULTS["supernet"]["eval_data"] == "random"


# ---------------------------------------------------------------- 5. sampling sizes
def test_sampling_sizes_do_not_depend_on_the_final_network():
    base = load_config("demo")
    big_final = load_config("demo", ["final.layers=4", "final.channels=32"])
    from bnao.search.loop import BalancedNAO

    a = BalancedNAO.__new__(BalancedNAO)
    b = BalancedNAO.__new__(BalancedNAO)
    for obj, cfg in ((a, base), (b, big_final)):
        obj.config, obj.space, obj.num_classes, obj.in_channels = cfg, SPACE, 10, 1
    archs = SPACE.sample_array(20, 9)
    from bnao.size import model_size

    expected = model_size(archs, space=SPACE, layers=base["supernet"]["layers"],
                          channels=base["supernet"]["channels"], classes=10, in_channels=1)
    np.testing.assert_array_equal(a._sizes(archs), expected)
    np.testing.assert_array_equal(b._sizes(archs), expected)
    explicit = load_config("demo", ["sampler.size_layers=2", "sampler.size_channels=12"])
    b.config = explicit
    np.testing.assert_array_equal(
        b._sizes(archs), model_size(archs, space=SPACE, layers=2, channels=12, classes=10, in_channels=1))


# ---------------------------------------------------------------- 6. mutation top-up
def test_mutation_top_up_is_off_by_default():
    assert DEFAULTS["search"]["fill_with_mutations"] is False


# ---------------------------------------------------------------- 7. unused-slot update
def test_decay_rule_equals_per_slot_sgd_that_keeps_zero_gradients(per_slot_sgd):
    # Paper-era PyTorch: zero_grad() zeroed gradients in place, so a slot that once got a gradient
    # gets momentum and weight decay at every later step; a slot never used has grad None.
    stacked, rows, opt, ref = per_slot_sgd
    ever = torch.zeros(5, 1)
    for used in ([0, 1], [1, 2], [1], [0]):
        grad = torch.randn(5, 3)
        mask = torch.zeros(5, 1)
        mask[used] = 1
        ever = torch.maximum(ever, mask)
        stacked.grad = grad * mask
        opt.step({stacked: ever.clone()})
        for i, p in enumerate(rows):
            if i in used:
                p.grad = grad[i].clone()
            elif p.grad is not None:
                p.grad = torch.zeros(3)
        ref.step()
        torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in rows]))


@pytest.mark.parametrize("rule", ["decay", "freeze"])
def test_trainer_unused_slot_rules(rule):
    pool = SPACE.sample_array(2, 11)
    trainer = _trainer(pool, unused_slot_update=rule)
    model = trainer.model
    a, b = (tuple(row.tolist()) for row in pool)
    before = {name: p.detach().clone() for name, p in model.slot_params.items()}
    trainer.sampler.draw = lambda: 0
    trainer.train_steps(1)
    after_a = {name: p.detach().clone() for name, p in model.slot_params.items()}
    trainer.sampler.draw = lambda: 1
    trainer.train_steps(1)
    masks_a, masks_b = model.touched_masks(a), model.touched_masks(b)
    moved_in_b_only_by_decay = 0
    for name, p in model.slot_params.items():
        ma, mb = masks_a.get(p, True), masks_b.get(p, True)
        rows_a = _rows(ma, p.shape[0])
        rows_b = _rows(mb, p.shape[0])
        never = ~(rows_a | rows_b)
        assert torch.equal(p.detach()[never], before[name][never]), name  # never used: untouched by both
        only_a = rows_a & ~rows_b
        if only_a.any():
            changed = not torch.equal(p.detach()[only_a], after_a[name][only_a])
            assert changed == (rule == "decay"), name
            moved_in_b_only_by_decay += int(changed)
    assert (moved_in_b_only_by_decay > 0) == (rule == "decay")


def _rows(mask, n):
    if mask is True:
        return torch.ones(n, dtype=torch.bool)
    if mask is False:
        return torch.zeros(n, dtype=torch.bool)
    return mask.reshape(n, -1)[:, 0].bool()


# ---------------------------------------------------------------- lr per epoch, as the reference
def test_learning_rate_is_set_per_epoch_one_epoch_into_the_cosine():
    trainer = _trainer(SPACE.sample_array(2, 0), steps_total=30, lr_max=0.025, lr_min=0.001, lr_steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append(trainer.current_lr())
        trainer.schedule_step += 1
    # CosineAnnealingLR(T_max=3 epochs) stepped at each epoch start: epochs use t = 1, 2, 3.
    by_hand = [0.001 + 0.012 * (1 + math.cos(math.pi * t / 3)) for t in (1, 2, 3)]
    assert lrs == pytest.approx([by_hand[0]] * 10 + [by_hand[1]] * 10 + [by_hand[2]] * 10)
    assert DEFAULTS["supernet"]["lr_schedule"] == "epoch"
