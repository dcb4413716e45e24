"""CPU tests of the GPU-readiness fixes (issue 7) that do not need a GPU to be checked.

* a supernet checkpoint's mask-generator state for a device this machine lacks is kept, not fatal;
* the state round trip that the CUDA comparison relies on is exact on one device;
* ``setup.py`` retries a CPU-only build when the CUDA compile fails under ``BNAO_CUDA=auto``;
* the DALI folder pipeline is built once across epochs and again only when training jumps.
"""

from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path

import pytest
import torch

from bnao.space import NAOSpace
from bnao.supernet import Supernet

sys.path.insert(0, str(Path(__file__).parent))
from test_cuda_paths import build_trainer, compare_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_mask_generator_state_of_an_absent_device_is_kept(caplog):
    model = Supernet(NAOSpace(op_set="small"), layers=1, channels=4, drop_path_keep_prob=0.8, seed=3)
    model.drop_path_masks(8, torch.device("cpu"))
    cpu_state = model.generator(torch.device("cpu")).get_state()
    following = model.drop_path_masks(8, torch.device("cpu"))
    absent = torch.arange(16, dtype=torch.uint8)  # a state for a GPU this machine does not have
    fresh = Supernet(NAOSpace(op_set="small"), layers=1, channels=4, drop_path_keep_prob=0.8, seed=3)
    with caplog.at_level(logging.WARNING, logger="bnao.supernet.drop_path"):
        fresh.set_rng_state({"cpu": cpu_state, "cuda:63": absent})
    assert "cuda:63" in caplog.text and "kept aside" in caplog.text
    assert torch.equal(fresh.drop_path_masks(8, torch.device("cpu")), following)  # the CPU stream continues
    saved = fresh.rng_state()
    assert torch.equal(saved["cuda:63"], absent)  # written again, so the GPU stream can be picked up later


def test_renewed_mask_generator_continues_the_stream():
    """After a failed capture the trainer swaps in a fresh generator with the saved state (graph_step)."""
    model = Supernet(NAOSpace(op_set="small"), layers=1, channels=4, drop_path_keep_prob=0.8, seed=3)
    cpu = torch.device("cpu")
    old = model.generator(cpu)
    state = old.get_state()
    expected = model.drop_path_masks(8, cpu)  # what the stream gives from `state`
    model.drop_path_masks(8, cpu)  # draws a failed capture might have reserved
    renewed = model.renew_generator(cpu, state)
    assert renewed is not old and model.generator(cpu) is renewed
    assert torch.equal(model.drop_path_masks(8, cpu), expected)


def test_state_forced_steps_are_exact_on_one_device():
    """The CUDA comparison starts each step from the CPU trainer's state; on one device that is exact."""
    reference, _ = build_trainer("cpu", steps_total=4)
    other, _ = build_trainer("cpu", steps_total=4)
    compare_steps(reference, other, 2)
    mine = dict(other.model.named_parameters())
    for name, param in reference.model.named_parameters():
        assert torch.equal(param, mine[name]), name


def _setup_namespace(monkeypatch):
    """setup.py's functions, without running setup() or building anything."""
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("BNAO_NO_EXTENSION", "1")
    return runpy.run_path(str(ROOT / "setup.py"))


class _FakeExtension:
    def __init__(self, sources):
        self.sources = sources


class _FakeBuildExt:
    """Stands in for torch's BuildExtension: fails on CUDA sources when told to, records every run."""

    runs = []
    fail_cuda = True
    fail_cpu = False

    @classmethod
    def with_options(cls, **kw):
        return cls

    def __init__(self, extensions):
        self.extensions = extensions
        self.distribution = type("Dist", (), {"ext_modules": extensions})()
        self.inplace = True

    def run(self):
        sources = [s for e in self.extensions for s in e.sources]
        type(self).runs.append(sources)
        cuda = any(s.endswith(".cu") for s in sources)
        if (cuda and self.fail_cuda) or (not cuda and self.fail_cpu):
            raise RuntimeError("nvcc: error")


@pytest.mark.parametrize("mode", ["auto", "1"])
def test_setup_retries_cpu_only_when_cuda_compile_fails(monkeypatch, tmp_path, mode):
    ns = _setup_namespace(monkeypatch)
    monkeypatch.delenv("BNAO_REQUIRE_EXTENSION", raising=False)
    (tmp_path / "bnao").mkdir()
    _FakeBuildExt.runs = []
    info = {"cuda": True, "arch_list": "9.0"}
    cls = ns["soft_build_ext"](_FakeBuildExt, mode == "1", info, lambda: _FakeExtension(["csrc/a.cpp"]),
                               root=str(tmp_path))
    build = cls([_FakeExtension(["csrc/a.cpp", "csrc/sampler/cuda/k.cu"])])
    if mode == "1":  # CUDA required: the failure stands
        with pytest.raises(RuntimeError, match="nvcc"):
            build.run()
        return
    build.run()
    assert _FakeBuildExt.runs == [["csrc/a.cpp", "csrc/sampler/cuda/k.cu"], ["csrc/a.cpp"]]
    written = (tmp_path / "bnao" / "_build_info.json").read_text()
    assert '"cuda": false' in written and '"cuda_failed": true' in written


def test_setup_default_arch_list_has_ptx_for_newer_gpus(monkeypatch):
    ns = _setup_namespace(monkeypatch)
    assert ns["DEFAULT_ARCH_LIST"].split(";")[-1].endswith("+PTX")


@pytest.mark.dali
def test_dali_folder_pipeline_built_once_across_epochs(tmp_path):
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    from bnao.data import create_dataset, create_loader

    for cls in ("ant", "bee"):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (20, 24), (40 * j, 90, 200)).save(folder / f"img{j}.JPEG")
    ds = create_dataset("imagenet", root=str(tmp_path), image_size=16)
    loader = create_loader("dali", ds, 2, augment=False, shuffle=True, seed=1, drop_last=False)
    reference = create_loader("torch", ds, 2, augment=False, shuffle=True, seed=1, drop_last=False)
    for _ in range(3):  # three epochs, one pipeline; labels follow the seeded order of each epoch
        assert torch.equal(torch.cat([y for _, y in loader]), torch.cat([y for _, y in reference]))
    assert loader.pipelines_built == 1
    resumed = create_loader("dali", ds, 2, augment=False, shuffle=True, seed=1, drop_last=False)
    resumed.load_state_dict({**loader.state_dict(), "epoch": 1, "position": 1})
    reference.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in resumed]), torch.cat([y for _, y in reference][1:]))
    assert resumed.pipelines_built == 1


def test_no_capture_is_tried_without_the_caching_allocator(monkeypatch):
    """compute-sanitizer runs gpu-check's step with PYTORCH_NO_CUDA_MEMORY_CACHING=1, where every capture fails
    (a plain cudaMalloc during capture; seen on an H200): the step then runs uncaptured and says why."""
    from bnao.cuda_graphs import capture_blocker

    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("PYTORCH_NO_CUDA_MEMORY_CACHING", raising=False)
    assert capture_blocker(True, cuda) is None
    assert capture_blocker(False, cuda) == "capture off"
    assert capture_blocker(True, torch.device("cpu")) == "CPU"
    for off in ("0", "false", "off", ""):  # torch's own spellings of "not set"
        monkeypatch.setenv("PYTORCH_NO_CUDA_MEMORY_CACHING", off)
        assert capture_blocker(True, cuda) is None, off
    for on in ("1", "true", "YES"):
        monkeypatch.setenv("PYTORCH_NO_CUDA_MEMORY_CACHING", on)
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING" in capture_blocker(True, cuda), on
