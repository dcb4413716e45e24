"""Stand-alone training: learning, exact resume, checkpoint safety, divergence, the train/eval CLIs.

Everything runs on the CPU on tiny data (8x8 images, N=1, C=4) so the file
stays fast on a 2-core machine.
"""

import json
import os

import numpy as np
import pytest
import torch

from bnao.cli import main
from bnao.data import DATASETS, ArrayDataset
from bnao.space import NAOSpace
from bnao.train import (
    CheckpointError,
    NonFiniteLossError,
    StandaloneTrainer,
    load_model,
    make_config,
    rerank,
    save_atomic,
    train_standalone,
)

# Tiny nets: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = NAOSpace()
# Fixed archs: small ops mixed with pools/identity so reduction cells exercise factorized reduce.
ARCH = SPACE.sample(3)
ARCH2 = SPACE.sample(4)
TINY = dict(layers=1, channels=4, batch_size=32, eval_batch_size=64)


def brightness_task(n, seed, size=8):
    """Two classes: dark vs bright noise images (learnable in a few steps, 50% by chance)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    base = np.where(labels[:, None, None, None] == 1, 170, 60)
    images = np.clip(base + rng.integers(-50, 50, (n, size, size, 1)), 0, 255).astype(np.uint8)
    return ArrayDataset(images, labels, 2, (0.45,), (0.25,), name=f"bright-{seed}")


@pytest.fixture(scope="module")
def data():
    return brightness_task(128, 0), brightness_task(64, 1)


def test_training_learns_an_easy_task(data):
    train, test = data
    res = train_standalone(ARCH, SPACE, train, test, device="cpu", epochs=3, lr_max=0.05, seed=0, **TINY)
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert res["eval_acc"] >= 0.85, res  # chance is 0.5
    assert res["eval_error"] == pytest.approx(1 - res["eval_acc"])
    assert res["params"] > 0 and res["epochs"] == 3 and res["steps"] == 3 * (128 // 32)
    # lr is the reference's per-epoch cosine from lr_max to 0.
    assert [h["lr"] for h in hist] == pytest.approx([0.05, 0.05 * 0.75, 0.05 * 0.25])


class _Stop(Exception):
    pass


def _stop_after(epoch):
    def cb(rec):
        if rec["epoch"] == epoch:
            raise _Stop
    return cb


def test_resume_is_bit_identical_with_aux_head_and_drop_path(data, tmp_path):
    train, test = data
    cfg = make_config(epochs=2, auxiliary=True, auxiliary_weight=0.4, drop_path_keep_prob=0.7, dropout=0.2,
                      cutout=4, seed=5, **TINY)
    full = StandaloneTrainer(ARCH, SPACE, train, test, cfg, device="cpu")
    aux_init = {k: v.clone() for k, v in full.model.auxiliary_head.state_dict().items()}
    full_res = full.fit()

    ckpt = tmp_path / "ckpt.pt"
    first = StandaloneTrainer(ARCH, SPACE, train, test, cfg, device="cpu", checkpoint_path=ckpt,
                              on_epoch=_stop_after(1))
    with pytest.raises(_Stop):
        first.fit()
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    # A fresh process-like trainer continues from the checkpoint.
    torch.manual_seed(1234)  # the caller's RNG must not matter
    second = StandaloneTrainer(ARCH, SPACE, train, test, cfg, device="cpu", checkpoint_path=ckpt)
    res = second.fit()

    a, b = full.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res["eval_acc"] == full_res["eval_acc"] and res["eval_loss"] == full_res["eval_loss"]
    assert [h["train_loss"] for h in res["history"]] == [h["train_loss"] for h in full_res["history"]]
    # The auxiliary head is trained (its loss reaches the weights); drop-path did not break anything.
    aux_now = full.model.auxiliary_head.state_dict()
    assert any(not torch.equal(aux_init[k], aux_now[k]) for k in aux_init if aux_init[k].is_floating_point())
    # A finished checkpoint returns its result without training again.
    again = StandaloneTrainer(ARCH, SPACE, train, test, cfg, device="cpu", checkpoint_path=ckpt)
    assert again.fit()["eval_acc"] == res["eval_acc"] and again.global_step == second.global_step


@pytest.fixture(scope="module")
def one_epoch_checkpoint(data, tmp_path_factory):
    """Bytes of the checkpoint of a finished 1-epoch run (no eval set)."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "c.pt"
    res = train_standalone(ARCH, SPACE, data[0], None, device="cpu", epochs=1, seed=0, checkpoint_path=ckpt, **TINY)
    assert res["eval_acc"] is None and res["epochs"] == 1
    return ckpt.read_bytes()


def test_resume_with_other_settings_names_the_keys(data, tmp_path, one_epoch_checkpoint):
    train, _ = data
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(one_epoch_checkpoint)
    with pytest.raises(CheckpointError, match=r"lr_max: checkpoint 0\.025 vs now 0\.1"):
        train_standalone(ARCH, SPACE, train, None, device="cpu", epochs=1, lr_max=0.1, checkpoint_path=ckpt, **TINY)


def test_save_atomic_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    save_atomic({"format": "t", "v": torch.arange(3)}, path)
    import bnao.train.checkpoint as ck

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": "t", "v": torch.arange(10)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(3))
    assert os.listdir(tmp_path) == ["x.pt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other"])
def test_corrupt_checkpoint_is_reported_with_file_and_fix(data, tmp_path, damage, one_epoch_checkpoint):
    train, _ = data
    ckpt = tmp_path / "ckpt.pt"
    raw = one_epoch_checkpoint
    if damage == "truncate":
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"format": "something-else"}, ckpt)
    with pytest.raises(CheckpointError) as err:
        train_standalone(ARCH, SPACE, train, None, device="cpu", epochs=1, checkpoint_path=ckpt, **TINY)
    msg = str(err.value)
    assert str(ckpt) in msg and "Delete it" in msg


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(data, tmp_path, monkeypatch):
    train, _ = data
    ckpt = tmp_path / "ckpt.pt"
    steps = 128 // 32
    calls = {"n": 0}
    real = StandaloneTrainer._loss

    def flaky(self, logits, labels):
        calls["n"] += 1
        loss = real(self, logits, labels)
        # One NaN in epoch 1 is skipped; from the middle of epoch 2 on every loss is NaN.
        if calls["n"] == 2 or calls["n"] > steps + 1:
            return loss * float("nan")
        return loss

    monkeypatch.setattr(StandaloneTrainer, "_loss", flaky)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps \(epoch 2.*end of epoch 1\) is kept"):
        train_standalone(ARCH, SPACE, train, None, device="cpu", epochs=3, checkpoint_path=ckpt,
                         max_nonfinite_steps=3, **TINY)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["history"][0]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_rerank_orders_by_dev_accuracy(data, tmp_path):
    train, dev = data
    seen = []
    out = rerank([ARCH, ARCH2], SPACE, train, dev, device="cpu", epochs=1, checkpoint_dir=tmp_path,
                 on_result=seen.append, **TINY)
    assert [r["rank"] for r in out] == [1, 2]
    assert out[0]["dev_acc"] >= out[1]["dev_acc"]
    assert sorted(r["index"] for r in out) == [0, 1] and len(seen) == 2
    assert {r["arch"] for r in out} == {str(ARCH), str(ARCH2)}
    assert len(list(tmp_path.glob("rerank_*.pt"))) == 2
    # Re-running resumes from the finished checkpoints: same numbers, no training.
    again = rerank([ARCH, ARCH2], SPACE, train, dev, device="cpu", epochs=1, checkpoint_dir=tmp_path, **TINY)
    assert [(r["arch"], r["dev_acc"]) for r in again] == [(r["arch"], r["dev_acc"]) for r in out]


# ------------------------------------------------------------------------ CLI

def _bright_dataset(root=None, split="train"):
    return brightness_task(64 if split == "train" else 32, 0 if split == "train" else 1)


@pytest.fixture
def bright8(monkeypatch):
    """Registers a tiny 8x8 dataset for the CLI tests (the CLIs take any registered dataset), and removes
    it afterwards: other tests check the exact list of datasets and the registry has no unregister."""
    assert "test_bright8" not in DATASETS
    monkeypatch.setitem(DATASETS._factories, "test_bright8", _bright_dataset)

CLI_TINY = ["--dataset", "test_bright8", "--layers", "1", "--channels", "4", "--batch-size", "32",
            "--device", "cpu", "--no-progress"]


def test_cli_train_eval_resume_and_refusals(tmp_path, capsys, bright8):
    out = tmp_path / "run"
    arch_file = tmp_path / "best.json"
    arch_file.write_text(json.dumps({"arch": str(ARCH), "params": 1}))
    rc = main(["train", f"@{arch_file}", "--epochs", "1", "--cutout", "8", "--drop-path-keep-prob", "0.8",
               "--out", str(out)] + CLI_TINY)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "test error" in printed and "params" in printed
    for f in ("config.json", "checkpoint.pt", "model.pt", "metrics.json"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arch"] == str(ARCH) and metrics["epochs"] == 1
    assert metrics["test_error"] == pytest.approx(1 - metrics["test_acc"])

    # The model file rebuilds the network by itself; its parameter count is the trained one.
    model, info = load_model(out / "model.pt")
    assert info["config"]["arch"] == str(ARCH)
    assert info["metrics"]["params"] == metrics["params"]

    rc = main(["eval", str(out / "model.pt"), "--device", "cpu", "--json"])
    ev = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert ev["accuracy"] == pytest.approx(metrics["test_acc"]) and ev["loss"] == pytest.approx(metrics["test_loss"])
    assert ev["params"] == metrics["params"] and ev["images"] == 32

    # The directory holds a run: refused without --resume.
    rc = main(["train", str(ARCH), "--epochs", "1", "--out", str(out)] + CLI_TINY)
    assert rc == 2 and "pass --resume" in capsys.readouterr().err

    # --resume of a finished run changes nothing and rewrites the same metrics.
    rc = main(["train", "--resume", "--out", str(out), "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0 and "resumed after epoch 1" in printed
    assert json.loads((out / "metrics.json").read_text())["test_acc"] == metrics["test_acc"]


def test_cli_resume_after_interruption_matches_uninterrupted_run(tmp_path, capsys, monkeypatch, bright8):
    args = ["train", str(ARCH), "--epochs", "2", "--auxiliary-weight", "0.4"] + CLI_TINY
    assert main(args + ["--out", str(tmp_path / "full")]) == 0

    real_save = StandaloneTrainer.save_checkpoint

    def save_then_die(self):
        real_save(self)
        raise _Stop  # killed right after epoch 1's checkpoint

    with monkeypatch.context() as m, pytest.raises(_Stop):
        m.setattr(StandaloneTrainer, "save_checkpoint", save_then_die)
        main(args + ["--out", str(tmp_path / "cut")])
    assert not (tmp_path / "cut" / "model.pt").exists()
    capsys.readouterr()

    # A resume that changes the schedule is refused, naming the setting.
    rc = main(["train", "--resume", "--out", str(tmp_path / "cut"), "--lr", "0.1", "--device", "cpu"])
    assert rc == 2 and "lr_max" in capsys.readouterr().err

    rc = main(["train", "--resume", "--out", str(tmp_path / "cut"), "--device", "cpu", "--no-progress"])
    assert rc == 0 and "resumed after epoch 1" in capsys.readouterr().out
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert cut["test_acc"] == full["test_acc"] and cut["epochs"] == 2


def test_cli_bad_input(tmp_path, capsys, monkeypatch, bright8):
    bad = str(ARCH).split()
    bad[5] = "9"  # normal cell, node 3, x_op: ops are 0..4
    rc = main(["train", " ".join(bad), "--out", str(tmp_path / "a")] + CLI_TINY)
    err = capsys.readouterr().err
    assert rc == 2 and "position 5" in err and "node 3" in err
    assert not (tmp_path / "a").exists()

    rc = main(["train", "0 1 2", "--out", str(tmp_path / "a")] + CLI_TINY)
    assert rc == 2 and "40 integers" in capsys.readouterr().err
    rc = main(["train", str(ARCH), "--out", str(tmp_path / "a"), "--dataset", "cifar11"])
    assert rc == 2 and "did you mean 'cifar10'" in capsys.readouterr().err

    # A dataset that is not there: the error lists the places searched.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BNAO_DATA", raising=False)
    rc = main(["train", str(ARCH), "--dataset", "cifar10", "--data-dir", str(tmp_path / "nodata"),
               "--out", str(tmp_path / "b"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Searched" in err and str(tmp_path / "nodata") in err

    # A missing and a corrupt model file.
    rc = main(["eval", str(tmp_path / "missing.pt")])
    assert rc == 2 and "missing.pt" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    rc = main(["eval", str(junk), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and str(junk) in err and "corrupt" in err

    rc = main(["train", "--resume", "--out", str(tmp_path / "nothing")])
    assert rc == 2 and "nothing to resume" in capsys.readouterr().err


def test_preset_is_the_papers_final_setting_and_flags_override():
    from bnao.cli import build_parser
    from bnao.commands.train import resolve_settings

    args = build_parser("train").parse_args(["train", str(ARCH), "--preset", "cifar10-final", "--out", "x",
                                             "--epochs", "3"])
    s = resolve_settings(args)
    assert (s["dataset"], s["layers"], s["channels"], s["batch_size"], s["cutout"]) == ("cifar10", 6, 36, 128, 16)
    assert (s["auxiliary_weight"], s["drop_path_keep_prob"], s["dropout"], s["lr"], s["lr_min"]) == (
        0.4, 0.8, 0.4, 0.025, 0.0)
    assert s["epochs"] == 3  # the explicit flag wins over the preset's 600
    plain = resolve_settings(build_parser("train").parse_args(["train", str(ARCH), "--out", "x"]))
    assert (plain["layers"], plain["channels"], plain["epochs"], plain["cutout"]) == (3, 20, 10, 0)


def test_bf16_and_channels_last_train_matches_fp32(data):
    """One epoch (4 steps) with bf16 autocast and a channels-last model against the fp32 run of the same
    seed (same init, batches and drop-path masks). On the CPU the trainer is channels-last in both runs
    (it always is there, for speed), so only bf16 differs here; the layouts differ on CUDA only.

    Tolerances: bf16 keeps 8 significant bits and BN over 32 images at 2x2 amplifies the rounding;
    measured on 5 seeds (x86 CPU), the epoch's mean training loss (about 1) differs by <= 0.008 and the
    weights end 0.20-0.42 of the fp32 update away from the fp32 weights. Bounds: 0.025 and 0.75; a run
    whose updates are 10x too small ends about 0.9 away, one that skips them 1.0.
    """
    train, test = data

    def run(**kw):
        cfg = make_config(epochs=1, auxiliary=True, drop_path_keep_prob=0.8, seed=0, **TINY, **kw)
        tr = StandaloneTrainer(ARCH, SPACE, train, test, cfg, device="cpu")
        autocast, stem_nhwc = [], []
        tr.model.register_forward_pre_hook(lambda mod, args: autocast.append(torch.is_autocast_enabled("cpu")))
        # The stem's output (12 channels): the images have one channel, for which both layouts coincide.
        tr.model.stem.register_forward_hook(
            lambda mod, args, out: stem_nhwc.append(out.is_contiguous(memory_format=torch.channels_last)))
        w0 = torch.cat([p.detach().flatten() for p in tr.model.parameters()]).clone()
        res = tr.fit(resume=False)
        assert res["history"][0]["skipped_steps"] == 0 and 0.0 <= res["eval_acc"] <= 1.0
        w = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
        return res["train_loss"], w, w0, autocast, stem_nhwc

    loss32, w32, w0, autocast32, _ = run()
    loss16, w16, _, autocast16, stem_nhwc16 = run(bf16=True, channels_last=True)
    assert autocast32 and not any(autocast32)
    assert autocast16 and all(autocast16), "the bf16 run did not run under autocast"
    assert stem_nhwc16 and all(stem_nhwc16), "the channels-last run had NCHW activations"
    assert abs(loss16 - loss32) < 0.025, (loss16, loss32)
    drift = ((w16 - w32).norm() / (w32 - w0).norm()).item()
    assert drift < 0.75, f"bf16 weights {drift:.2f} of the fp32 update away from the fp32 weights"
