"""Recovery of a search: safe loading, the previous checkpoint, failed writes, out of memory, graceful stop."""

import errno
import json
import os
import signal

import numpy as np
import pytest
import torch

from bnao import safe_io, signals
from bnao.cli import main
from bnao.search.resume import ResumeChangeError, keep_schedule, rescale_loader_state, split_changes
from bnao.search.rundir import RunDir
from bnao.supernet import SupernetTrainer
from bnao.train import load_file

# Tiny nets: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

# Every phase real, as small as a search gets: 6 supernet steps per iteration (a checkpoint every 2),
# one controller round, a re-rank of one arch.
TINY = [
    "data.dataset=synthetic", "data.synthetic_samples=200", "data.synthetic_size=8", "data.synthetic_channels=1",
    "data.synthetic_classes=3", "supernet.channels=4", "supernet.batch_size=32", "supernet.steps_per_epoch=3",
    "supernet.checkpoint_every=2", "supernet.eval_batch_size=40", "search.pool_size=8", "search.iterations=1",
    "search.top_k=4", "search.new_per_iteration=3", "controller.epochs=2", "final.rerank_top=1", "final.epochs=1",
    "final.full_epochs=0", "final.batch_size=32", "device=cpu", "threads=1",
]


def _search(out, *extra):
    return main(["search", "--config", "demo", "--out", str(out), "--no-progress", *TINY, *extra])


def _resume(out, *extra):
    return main(["search", "--resume", str(out), "--no-progress", *extra])


def _results(run):
    """What a search found, without timings: pool, ranking and best arch."""

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if "seconds" not in k}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    pool = [strip(json.loads(line)) for line in (run / "pool.jsonl").read_text().splitlines()]
    ranking = [strip(json.loads(line)) for line in (run / "ranking.jsonl").read_text().splitlines()]
    return pool, ranking, strip(json.loads((run / "best.json").read_text()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: what every recovered run must end with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert _search(run) == 0
    return _results(run)


def _hook_steps(monkeypatch, at_step, action):
    """Calls ``action()`` after supernet step ``at_step`` (counted over the whole process)."""
    real = SupernetTrainer.train_steps
    done = [0]

    def train_steps(self, n, progress=None):
        def on_step(k):
            done[0] += k
            if done[0] == at_step:
                action()
            if progress is not None:
                progress(k)

        return real(self, n, progress=on_step)

    monkeypatch.setattr(SupernetTrainer, "train_steps", train_steps)


# ------------------------------------------------------------------ safe loading
class _RunsCode:
    """Unpickling this creates a folder: evidence that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_numpy_values_survive_a_weights_only_load(tmp_path):
    values = {
        "int8": np.arange(-5, 5, dtype=np.int8).reshape(2, 5),
        "uint64": np.array([0, 2**64 - 1, 12345], dtype=np.uint64),
        "float32": np.linspace(0, 1, 7, dtype=np.float32),
        "bool": np.array([True, False]),
        "strided": np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2],
        "empty": np.zeros((0, 40), dtype=np.int16),
        "scalar": np.float64(2.5),
        "nested": [{"index": np.arange(3)}, (np.int64(7), "text", None)],
    }
    path = tmp_path / "state.pt"
    safe_io.save_atomic(values, path)
    raw = torch.load(path, weights_only=True)  # torch's own safe loader accepts the file as written
    assert isinstance(raw["uint64"]["__bnao_ndarray__"], torch.Tensor)
    back = safe_io.safe_load(path)
    for key in ("int8", "uint64", "float32", "bool", "strided", "empty"):
        assert back[key].dtype == values[key].dtype and np.array_equal(back[key], values[key]), key
    assert type(back["scalar"]) is np.float64 and back["scalar"] == 2.5
    assert np.array_equal(back["nested"][0]["index"], np.arange(3))
    assert back["nested"][1] == (np.int64(7), "text", None)


def test_a_real_search_checkpoint_loads_with_weights_only(tmp_path, reference):
    run = tmp_path / "run"
    assert _search(run) == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        state = torch.load(run / name, weights_only=True)
        assert state["config"]["search"]["pool_size"] == 8


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    evidence = tmp_path / "would_be_created_by_pickle"
    torch.save({"x": _RunsCode(tmp_path / "control")}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control").is_dir()  # the payload really runs code when fully unpickled

    run = tmp_path / "run"
    from bnao.search.config import load_config

    RunDir(run).create(load_config("demo", TINY))
    torch.save({"format": 1, "config": {}, "state": {"phase": "train"}, "x": _RunsCode(evidence)},
               run / "checkpoint.pt")
    assert _resume(run) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "arbitrary unpickling" in err and "makedirs" in err and str(run) in err
    assert not evidence.exists()

    # A planted previous checkpoint is refused too, not skipped.
    (run / "checkpoint.pt").write_bytes(b"damaged")
    torch.save({"format": 1, "config": {}, "state": {}, "x": _RunsCode(evidence)}, run / "checkpoint.prev.pt")
    assert _resume(run) == 2 and "refused" in capsys.readouterr().err

    with pytest.raises(safe_io.UnsafeFileError, match="arbitrary unpickling"):
        load_file(run / "checkpoint.prev.pt", "bnao-standalone-checkpoint", "fix")
    assert not evidence.exists()


# ------------------------------------------------------------- two checkpoints
def test_latest_and_previous_checkpoints_are_kept(tmp_path):
    run = RunDir(tmp_path)
    for step in range(3):
        run.save_checkpoint({"format": 1, "config": {}, "state": {"iteration": 0, "phase": "train", "train_step": step}})
    assert safe_io.safe_load(run.checkpoint_path)["state"]["train_step"] == 2
    assert safe_io.safe_load(run.previous_checkpoint_path)["state"]["train_step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]  # no temporary files


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, capsys, monkeypatch, reference):
    run = tmp_path / "run"
    # Ctrl-C after step 3: a checkpoint at step 3, the one before at step 2.
    _hook_steps(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert _search(run) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT at iteration 0, phase train, step 3" in err
    assert f"Resume with: bnao search --resume {run}" in err
    monkeypatch.undo()

    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert _resume(run) == 0
    err = capsys.readouterr().err
    assert "checkpoint.pt is corrupt or truncated" in err
    assert "resuming from the previous checkpoint checkpoint.prev.pt (iteration 0, phase train, step 2)" in err
    assert "up to iteration 0, phase train, step 3, is redone" in err
    assert _results(run) == reference  # redoing step 3 gives the same search


def test_both_checkpoints_damaged_stops_with_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    from bnao.search.config import load_config

    RunDir(run).create(load_config("demo", TINY))
    (run / "checkpoint.pt").write_bytes(b"x" * 100)
    (run / "checkpoint.prev.pt").write_bytes(b"PK\x03\x04 torn")
    assert _resume(run) == 2
    err = capsys.readouterr().err
    assert f"both checkpoints of {run} are damaged" in err and "checkpoint.prev.pt is corrupt" in err
    assert "--overwrite" in err and "Traceback" not in err


# ---------------------------------------------------------------- failed writes
def _failing_fsync(monkeypatch, name_part, err_no):
    """os.fsync fails with ``err_no`` for files whose name contains ``name_part``."""
    real = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(err_no, os.strerror(err_no))
        return real(fd)

    monkeypatch.setattr(safe_io.os, "fsync", fsync)


@pytest.mark.parametrize("err_no, fix", [(errno.ENOSPC, "Free disk space"), (errno.EACCES, "Make the folder writable")])
def test_a_failed_write_keeps_both_files(tmp_path, monkeypatch, err_no, fix):
    path, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    safe_io.save_atomic({"v": 1}, path, previous)
    safe_io.save_atomic({"v": 2}, path, previous)
    _failing_fsync(monkeypatch, "checkpoint.pt", err_no)
    with pytest.raises(safe_io.FileWriteError) as caught:
        safe_io.save_atomic({"v": 3}, path, previous)
    message = str(caught.value)
    assert str(path) in message and os.strerror(err_no) in message and fix in message and "intact" in message
    monkeypatch.undo()
    assert safe_io.safe_load(path) == {"v": 2} and safe_io.safe_load(previous) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_a_search_whose_disk_fills_stops_with_the_path_and_resumes(tmp_path, capsys, monkeypatch, reference):
    run = tmp_path / "run"
    # pool.jsonl is first written after the iteration-0 evaluation; the checkpoints before it are good.
    _failing_fsync(monkeypatch, "pool.jsonl", errno.ENOSPC)
    assert _search(run) == 1
    err = capsys.readouterr().err
    assert f"cannot write {run / 'pool.jsonl'}: No space left on device" in err and "Traceback" not in err
    assert not list(run.glob(".*tmp"))  # no temporary file left behind
    monkeypatch.undo()

    _failing_fsync(monkeypatch, "checkpoint.pt", errno.ENOSPC)
    assert _resume(run) == 1
    assert f"cannot write {run / 'checkpoint.pt'}" in capsys.readouterr().err
    monkeypatch.undo()
    assert _resume(run) == 0
    assert _results(run) == reference


# ----------------------------------------------------------------- out of memory
def test_out_of_memory_stops_and_resumes_with_a_smaller_batch(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _hook_steps(monkeypatch, 3, oom)
    assert _search(run) == 1
    err = capsys.readouterr().err
    assert "CUDA out of memory in phase train" in err
    assert f"bnao search --resume {run} supernet.batch_size=16" in err and "changes.jsonl" in err
    monkeypatch.undo()
    stopped_at = json.loads((run / "progress.json").read_text())
    assert stopped_at["train_step"] == 2  # the last checkpoint before the failed step

    assert _resume(run, "search.pool_size=9", "supernet.batch_size=16", "seed=3") == 2
    err = capsys.readouterr().err
    assert "search.pool_size: 8 -> 9" in err and "seed: 0 -> 3" in err and "supernet.batch_size: " not in err

    assert _resume(run, "supernet.batch_size=16", "supernet.eval_batch_size=20") == 0
    err = capsys.readouterr().err
    assert "supernet.batch_size 32 -> 16" in err and "no longer replays an uninterrupted run exactly" in err
    records = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert records == [{"resumed_with": {"supernet.batch_size": [32, 16], "supernet.eval_batch_size": [40, 20]},
                        "exact_replay": False}]
    assert "batch_size: 16" in (run / "config.yaml").read_text()
    assert json.loads((run / "best.json").read_text())["arch"]


def test_host_out_of_memory_names_the_phase_batch():
    from bnao.search.resume import oom_advice, out_of_memory

    config = {"supernet": {"batch_size": 64, "eval_batch_size": 500, "bf16": False}, "final": {"batch_size": 96}}
    assert out_of_memory(MemoryError()) and out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not out_of_memory(RuntimeError("shape mismatch"))
    advice = oom_advice(MemoryError(), "runs/x", config, "eval")
    assert advice.startswith("host out of memory in phase eval") and "supernet.eval_batch_size=250" in advice
    assert "final.batch_size=48" in oom_advice(MemoryError(), "runs/x", config, "rerank")


def test_only_keys_that_do_not_change_the_search_may_change_on_resume():
    old = {"seed": 0, "device": "auto", "supernet": {"batch_size": 64, "epochs": 2, "steps_per_epoch": None}}
    new = {"seed": 0, "device": "cuda", "supernet": {"batch_size": 32, "epochs": 2, "steps_per_epoch": None}}
    changes = split_changes(old, new)
    assert changes == {"device": ("auto", "cuda"), "supernet.batch_size": (64, 32)}
    with pytest.raises(ResumeChangeError, match=r"supernet\.epochs: 2 -> 3"):
        split_changes(old, {**new, "supernet": {**new["supernet"], "epochs": 3}})
    # The steps per iteration of the checkpoint (2 epochs of 50 steps) stay: only images per step change.
    pinned = keep_schedule(new, {"trainer": {"schedule": {"steps": 100}}}, changes)
    assert pinned["supernet"]["steps_per_epoch"] == 50 and new["supernet"]["steps_per_epoch"] is None
    assert changes["supernet.steps_per_epoch"] == (None, 50)


def test_a_loader_position_moves_to_the_same_image_at_a_new_batch_size():
    state = {"seed": 1, "epoch": 3, "position": 10, "batch_size": 32}
    assert rescale_loader_state(state, 32) is state
    assert rescale_loader_state(state, 16) == {"seed": 1, "epoch": 3, "position": 20, "batch_size": 16}
    assert rescale_loader_state(state, 64)["position"] == 5


# ----------------------------------------------------------------- graceful stop
def test_sigterm_stops_at_the_next_step_and_resumes_exactly(tmp_path, capsys, monkeypatch, reference):
    run = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGTERM)
    _hook_steps(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert _search(run) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at iteration 0, phase train, step 1" in capsys.readouterr().err
    assert json.loads((run / "progress.json").read_text())["train_step"] == 1  # checkpointed at that step
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handlers restored
    assert _resume(run) == 0
    assert _results(run) == reference


def test_a_second_signal_interrupts_at_once():
    with signals.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.stop_requested() and stop.signal_name == "SIGINT" and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert not signals.stop_requested()


def test_bnao_train_stops_mid_epoch_and_resumes_bit_identically(tmp_path, monkeypatch):
    from bnao.data import ArrayDataset
    from bnao.space import NAOSpace
    from bnao.train import StandaloneTrainer, make_config

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 128)
    images = np.clip(np.where(labels[:, None, None, None] == 1, 170, 60) + rng.integers(-50, 50, (128, 8, 8, 1)),
                     0, 255).astype(np.uint8)
    train = ArrayDataset(images, labels, 2, (0.45,), (0.25,), name="bright")
    space = NAOSpace()
    arch = space.sample(3)
    settings = dict(layers=1, channels=4, batch_size=32, epochs=2, drop_path_keep_prob=0.8, dropout=0.3, seed=1)

    def trainer(path):
        return StandaloneTrainer(arch, space, train, train, make_config(**settings), device="cpu", checkpoint_path=path)

    full = trainer(tmp_path / "full.pt")
    full_result = full.fit()

    cut = trainer(tmp_path / "cut.pt")
    real_loss = StandaloneTrainer._loss
    calls = [0]

    def loss_then_signal(self, logits, labels):
        calls[0] += 1
        if calls[0] == 7:  # epoch 2, step 3 of 4 (4 steps of 32 images per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, logits, labels)

    monkeypatch.setattr(StandaloneTrainer, "_loss", loss_then_signal)
    with signals.GracefulStop(), pytest.raises(signals.Stopped, match="epoch 2, step 3 of 4"):
        cut.fit()
    monkeypatch.undo()
    saved = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["partial_epoch"]["seen"] == 96

    resumed = trainer(tmp_path / "cut.pt")
    result = resumed.fit()  # continues at step 4 of epoch 2
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))
    assert result["eval_acc"] == full_result["eval_acc"]
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]
