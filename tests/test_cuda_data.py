"""CUDA paths around the supernet: stand-alone training, DALI on the GPU, host-to-device copies.

Marked ``cuda`` (skipped without a GPU; DALI cases also ``dali``). Each compares
the GPU result with the CPU's, or counts what the host did.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bnao.data import ArrayDataset, AugmentConfig, create_dataset, create_loader
from bnao.space import NAOSpace
from bnao.supernet import Supernet, evaluate_pool
from bnao.train import StandaloneTrainer, make_config

pytestmark = pytest.mark.cuda
CUDA = torch.cuda.is_available()
SPACE = NAOSpace(op_set="small")


def _bright(n, seed):
    """Two learnable classes (dark vs bright noise), 8x8 grey images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    base = np.where(labels[:, None, None, None] == 1, 170, 60)
    images = np.clip(base + rng.integers(-50, 50, (n, 8, 8, 1)), 0, 255).astype(np.uint8)
    return ArrayDataset(images, labels, 2, (0.45,), (0.25,), name=f"bright-{seed}")


def _blocking_syncs(fn) -> int:
    """Host synchronisations (``.item()``, blocking copies, stream syncs) ``fn`` triggers, counted by torch."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_standalone_epoch_syncs_do_not_grow_with_steps():
    """The stand-alone loop reads the GPU per epoch (statistics), not per step: 8 and 16 steps, same count."""
    counts = []
    for samples in (256, 512):  # batch 32: 8 and 16 steps per epoch
        config = make_config(layers=1, channels=4, batch_size=32, epochs=1, seed=0)
        trainer = StandaloneTrainer(SPACE.sample(3), SPACE, _bright(samples, 0), None, config, device="cuda")
        trainer._train_epoch(0)  # warm-up: cuDNN autotuning and allocator growth may synchronise once
        counts.append(_blocking_syncs(lambda: trainer._train_epoch(1)))
    assert counts[0] == counts[1], counts


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_standalone_skips_a_poisoned_step_on_cuda(monkeypatch):
    calls = {"n": 0}
    real = StandaloneTrainer._loss

    def poisoned(self, logits, labels):
        calls["n"] += 1
        loss = real(self, logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(StandaloneTrainer, "_loss", poisoned)
    config = make_config(layers=1, channels=4, batch_size=32, epochs=1, seed=0)
    trainer = StandaloneTrainer(SPACE.sample(3), SPACE, _bright(256, 0), None, config, device="cuda")
    record = trainer._train_epoch(0)
    assert record["skipped_steps"] == 1 and np.isfinite(record["train_loss"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_new_arch_plans_copy_from_pinned_memory():
    """Pool evaluation uploads the pool's tables (or a plan per new arch) from pinned memory, never pageable."""
    from torch.profiler import ProfilerActivity, profile

    model = Supernet(SPACE, layers=1, channels=8).cuda()
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    archs = SPACE.sample_array(8, rng=3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        evaluate_pool(model, archs, (x, y))
    copies = [e.name for e in prof.events() if "Memcpy HtoD" in e.name]
    assert copies and not any("Pageable" in name for name in copies), sorted(set(copies))


def _need_dali():
    pytest.importorskip("nvidia.dali")


@pytest.mark.dali
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_dali_array_pipeline_on_gpu_equals_cpu_tensor_loader():
    _need_dali()
    ds = create_dataset("synthetic", num_samples=200, image_shape=(32, 32, 3), seed=2)
    kw = dict(augment=AugmentConfig(crop_padding=4, cutout=16), seed=5, drop_last=False)
    ref = list(create_loader("tensor", ds, 64, device="cpu", **kw))
    got = list(create_loader("dali", ds, 64, device="cuda", **kw))
    assert len(got) == len(ref) == 4
    for (xr, yr), (xg, yg) in zip(ref, got):
        assert xg.is_cuda and torch.equal(yg.cpu(), yr)
        torch.testing.assert_close(xg.cpu(), xr, rtol=0, atol=1e-5)


@pytest.mark.dali
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_dali_folder_pipeline_decodes_on_gpu_once_across_epochs(tmp_path):
    _need_dali()
    from PIL import Image

    from bnao.data.loaders.base import epoch_permutation

    colours = {}
    for cls_i, cls in enumerate(["ant", "bee"]):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        for j in range(3):
            colour = (60 + 40 * j, 200 * cls_i, 90)
            Image.new("RGB", (40, 48), colour).save(folder / f"img{j}.JPEG", quality=95)
            colours[str(folder / f"img{j}.JPEG")] = colour
    ds = create_dataset("imagenet", root=str(tmp_path), image_size=32)
    loader = create_loader("dali", ds, 2, device="cuda", augment=False, shuffle=True, seed=5, drop_last=False)
    mean, std = torch.tensor(ds.mean)[:, None, None], torch.tensor(ds.std)[:, None, None]
    for epoch in range(2):
        batches = list(loader)
        order = epoch_permutation(5, epoch, len(ds), True, torch.Generator()).tolist()
        x = torch.cat([b[0] for b in batches]).cpu()
        assert batches[0][0].is_cuda and x.shape == (6, 3, 32, 32)
        for img, i in zip(x, order):
            want = (torch.tensor(colours[ds.paths[i]], dtype=torch.float32)[:, None, None] / 255 - mean) / std
            assert (img - want).abs().max() < 0.08  # JPEG and resampling error on a flat colour
    assert loader.pipelines_built == 1  # the GPU decoder pipeline is built once, not per epoch
