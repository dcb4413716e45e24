"""Data-parallel search on torch.distributed: two gloo processes on the CPU, started by torchrun.

What two processes must give, each compared with something computed without them:

* the same arch sequence on both ranks and bit-identical weights after k steps (both unused-slot rules on
  the eager cells, and the fused cells);
* the weights of one process on the full batch, when that process normalises each half of the batch with its
  own BatchNorm statistics as the two ranks do (tolerance 1e-5: only the summation order differs);
* pool scores and the stand-alone trainer equal to one process;
* a search killed with SIGKILL and resumed ends with the uninterrupted 2-process run's pool, ranking and best
  arch; a rank that dies stops the other with a clear error in bounded time and leaves a valid checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnao import data_parallel, distributed
from bnao.cli import main
from bnao.safe_io import safe_load
from bnao.supernet import Supernet, evaluate_pool
from bnao.supernet import fused_forward

import distributed_workers as workers_module

# Tiny nets: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
# Weights of 2 processes vs one: the same arithmetic except the order of the gradient sum (all-reduce).
TOLERANCE = dict(atol=1e-5, rtol=1e-4)
# A tiny search with every phase: 2 x 3 supernet steps (a checkpoint each step), a controller round, a
# re-rank of 2 archs (one per rank).
TINY = [
    "data.dataset=synthetic", "data.synthetic_samples=200", "data.synthetic_size=8", "data.synthetic_channels=1",
    "data.synthetic_classes=3", "supernet.channels=4", "supernet.batch_size=32", "supernet.steps_per_epoch=3",
    "supernet.checkpoint_every=1", "supernet.eval_batch_size=40", "search.pool_size=6", "search.iterations=1",
    "search.top_k=3", "search.new_per_iteration=2", "search.max_params=null", "controller.epochs=2",
    "final.rerank_top=2", "final.epochs=1", "final.full_epochs=0", "final.batch_size=32", "device=cpu", "threads=1",
    # The fused cells refuse these one-channel images on the CPU (channels-last strides); the workers test the
    # fused path on three channels.
    "supernet.kernels=eager",
]


def _torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _search_command(run, *extra, resume=False):
    where = ["--resume", str(run)] if resume else ["--config", "demo", "--out", str(run), *TINY]
    return _torchrun("-m", "bnao", "search", "--no-progress", *where, *extra)


def _run(command, timeout=240):
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _results(run):
    """Pool, ranking and best arch of a run, without timings."""

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if "seconds" not in k}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    lines = lambda name: [strip(json.loads(x)) for x in (run / name).read_text().splitlines()]  # noqa: E731
    return lines("pool.jsonl"), lines("ranking.jsonl"), strip(json.loads((run / "best.json").read_text()))


def _halves(model):
    """Makes ``model`` normalise each half of a batch with that half's statistics, as each of 2 ranks does."""
    forward = model.forward

    def two_halves(images, *args, **kwargs):
        half = images.shape[0] // 2
        return torch.cat([forward(images[:half], *args, **kwargs), forward(images[half:], *args, **kwargs)])

    model.forward = two_halves


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """What each of 2 ranks saw in tests/distributed_workers.py."""
    out = tmp_path_factory.mktemp("workers")
    done = _run(_torchrun(str(ROOT / "tests" / "distributed_workers.py"), str(out)))
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for record in records:
        record["out"], record["stdout"] = out, done.stdout
    return records


# ------------------------------------------------------------------------------ supernet steps
#: Runs of the workers: both unused-slot rules on the eager cells, and the fused cells (dense slot gradients).
RUNS = {"decay": ("decay", "eager"), "freeze": ("freeze", "eager"), "fused": ("decay", "fused")}


@pytest.mark.parametrize("rule", list(RUNS))
def test_both_ranks_train_the_same_archs_and_end_with_identical_weights(workers, rule):
    first, second = workers[0][rule], workers[1][rule]
    assert workers[0]["world_size"] == 2
    assert first["draws"] == second["draws"] and len(first["draws"]) == workers_module.STEPS
    assert first["model"].keys() == second["model"].keys()
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), name
    for a, b in zip(first["momentum"], second["momentum"]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("rule", list(RUNS))
def test_two_processes_equal_one_process_whose_batch_norm_sees_each_half(workers, rule, monkeypatch):
    monkeypatch.setattr(fused_forward, "fused_built", fused_forward.fused_built)  # restored after the test
    trainer, draws = workers_module.build(RUNS[rule][0], kernels=RUNS[rule][1])
    assert trainer.model.kernels == RUNS[rule][1]
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _halves(trainer.model)
    # The halves are emulated by patching Supernet.forward, which the device-data (graph) step does not call
    # (ranks that train data-parallel take the eager step anyway).
    trainer.graph = "off"
    stats = trainer.train_steps(workers_module.STEPS)
    ranked = workers[0][rule]
    assert draws == ranked["draws"]
    moved = 0.0
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(ranked["model"][name], param.detach(), **TOLERANCE, msg=name)
        moved = max(moved, float((param.detach() - start[name]).abs().max()))
    assert moved > 1e-2  # the steps did train: equality is not that of untouched weights
    for mine, theirs in zip([trainer.optimizer.state[p].get("momentum_buffer") for p in trainer.params],
                            ranked["momentum"]):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(theirs, mine, **TOLERANCE)
    # The reported loss is the mean over both ranks' halves, as the one process's.
    assert ranked["stats"]["loss"] == pytest.approx(stats["loss"], abs=1e-5)


def test_the_tolerance_tells_per_rank_statistics_from_full_batch_statistics(workers):
    """Without the per-half BatchNorm accounting, one process differs by far more than the tolerance."""
    trainer, _ = workers_module.build("decay")
    trainer.train_steps(workers_module.STEPS)
    ranked = workers[0]["decay"]["model"]
    gaps = [float((ranked[n] - p.detach()).abs().max()) for n, p in trainer.model.named_parameters()]
    assert max(gaps) > 100 * TOLERANCE["atol"]


def test_the_arch_check_stops_ranks_that_drew_different_archs(workers):
    for record in workers:
        assert record["mismatch"] is not None and "the ranks trained different archs" in record["mismatch"]


def test_drop_path_masks_of_a_rank_are_its_slice_of_the_global_masks():
    def model(shard):
        net = Supernet("small", layers=1, channels=4, num_classes=3, in_channels=1, drop_path_keep_prob=0.5, seed=3)
        net.batch_shard = shard
        net.set_step(5)
        return net

    whole = model((0, 1)).drop_path_masks(8, torch.device("cpu"))
    for rank in range(2):
        part = model((rank, 2)).drop_path_masks(4, torch.device("cpu"))
        assert torch.equal(part, whole[:, 4 * rank: 4 * rank + 4])


def test_the_ranks_slices_make_up_the_global_batch_and_the_state_stays_global():
    from bnao.data import create_dataset, create_loader

    data = create_dataset("synthetic", num_samples=40, image_shape=(8, 8, 3), num_classes=3, seed=4)
    make = lambda: create_loader("tensor", data, 8, device="cpu", augment=True, shuffle=True, seed=9)  # noqa: E731
    whole = list(make())
    shards = [data_parallel.ShardedLoader(make(), distributed.Context(rank=r, world_size=2)) for r in range(2)]
    parts = [list(shard) for shard in shards]
    assert len(whole) == len(parts[0]) == 5
    for b, (images, labels) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), images)
        assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), labels)
    assert shards[0].state_dict() == make().state_dict() | {"epoch": 1} and shards[0].batch_size == 8


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    class Loader:
        batch_size = 30

    with pytest.raises(distributed.DistributedError, match="choose a multiple of 4"):
        data_parallel.ShardedLoader(Loader(), distributed.Context(rank=0, world_size=4), "supernet.batch_size")


# ------------------------------------------------------------------------ evaluation, stand-alone
def test_pool_evaluation_split_over_ranks_scores_as_one_process(workers):
    model, archs, batches = workers_module.eval_setup()
    acc, loss = evaluate_pool(model, archs, batches)
    per_epoch = len(batches.loader)
    after = batches.state_dict()
    for record in workers:
        np.testing.assert_allclose(record["eval"]["acc"], acc, atol=1e-7)
        np.testing.assert_allclose(record["eval"]["loss"], loss, rtol=1e-6)
        state = record["eval"]["loader"]  # the dev stream stands where one process's does
        assert state["epoch"] * per_epoch + state["position"] == after["epoch"] * per_epoch + after["position"]


def test_standalone_data_parallel_equals_one_process(workers):
    trainer = workers_module.standalone_setup()
    _halves(trainer.model)
    trainer.fit(resume=False)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(workers[0]["standalone"][name], param.detach(), **TOLERANCE, msg=name)
    for name, value in workers[0]["standalone"].items():  # buffers too: running statistics are averaged
        assert torch.equal(value, workers[1]["standalone"][name]), name


def test_a_stop_asked_of_one_rank_stops_every_rank_at_the_same_step(workers):
    assert [record["stop_steps"] for record in workers] == [1, 1]
    assert [record["standalone_stop"] for record in workers] == ["epoch 1, step 1 of 4"] * 2


def test_an_epoch_stopped_mid_way_on_2_processes_refuses_to_resume_on_1_and_says_why(workers):
    from bnao.train import CheckpointError

    trainer = workers_module.standalone_setup()
    refusal = r"stopped in the middle of an epoch with 2 process\(es\).*nproc_per_node=2"
    with pytest.raises(CheckpointError, match=refusal):
        trainer.load_checkpoint(workers[0]["out"] / "mid.pt")


def test_bnao_train_runs_data_parallel_and_rank_0_alone_writes_and_prints(workers):
    assert [record["train_exit"] for record in workers] == [0, 0]
    out = workers[0]["out"] / "train"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo" and metrics["epochs"] == 1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    stdout = workers[0]["stdout"]
    assert stdout.count("bnao train: arch") == 1 and stdout.count("test error") == 1
    assert "4 steps, device cpu, 2 processes (gloo)" in stdout  # 128 images / global batch 32


# --------------------------------------------------------------------------------- whole search
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process search."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = _run(_search_command(run))
    assert "running on 2 processes (gloo)" in done.stdout
    return run


def test_the_run_directory_records_how_it_ran(reference):
    import yaml

    launch = yaml.safe_load((reference / "config.yaml").read_text())["distributed"]
    assert launch["world_size"] == 2 and launch["backend"] == "gloo" and launch["hosts"]
    log = (reference / "log.txt").read_text()
    assert log.count("running on 2 processes (gloo)") == 1  # one writer: rank 0
    assert log.count("best arch:") == 1


def _start(command):
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_step(run, process, step, timeout=120):
    """Waits until the run's checkpoint is at supernet step ``step`` of iteration 0 (or later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed: " + process.stdout.read()[-3000:]
        try:
            progress = json.loads((run / "progress.json").read_text())
        except (OSError, ValueError):
            progress = {}
        if progress.get("iteration", 0) > 0 or progress.get("phase") not in (None, "init", "train") or (
                progress.get("train_step") or 0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not reach the step in time")


def test_a_search_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, reference):
    run = tmp_path / "run"
    process = _start(_search_command(run))
    _wait_for_step(run, process, 2)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks, without warning
    process.wait(timeout=30)
    _run(_search_command(run, resume=True))
    assert _results(run) == _results(reference)


def _rank_pid(parent, rank):
    """The pid of the torchrun worker of ``rank`` (a child of ``parent``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and env.get("RANK") == str(rank):
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


def test_a_rank_that_dies_stops_the_other_with_a_clear_error_and_a_valid_checkpoint(tmp_path):
    run = tmp_path / "run"
    process = _start(_search_command(run))
    try:
        _wait_for_step(run, process, 1)
        killed_at = time.monotonic()
        os.kill(_rank_pid(process.pid, 1), signal.SIGKILL)
        output, _ = process.communicate(timeout=90)
        stopped_after = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert stopped_after < 60, stopped_after
    assert "bnao search: error: rank 0 of 2 stopped during" in output and "another rank died" in output, output[-3000:]
    checkpoint = safe_load(run / "checkpoint.pt")  # the latest is intact: written atomically by rank 0 alone
    assert checkpoint["state"]["phase"] in ("train", "eval", "controller", "generate")
    assert checkpoint["config"]["distributed"]["world_size"] == 2
    # It resumes, here as one process: another world size works (recorded; exact replay needs the same one).
    assert main(["search", "--resume", str(run), "--no-progress"]) == 0
    resumed_with = json.loads((run / "changes.jsonl").read_text().splitlines()[-1])["resumed_with"]
    assert resumed_with["distributed.world_size"] == [2, 1]
    assert json.loads((run / "best.json").read_text())["standalone_accuracy"] >= 0
