"""Balanced NAO end to end on real data (Fashion-MNIST), resume after SIGKILL, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bnao.cli import main
from bnao.data import DatasetNotFoundError, create_dataset

try:
    create_dataset("fashion_mnist", split="test")
    HAVE_FMNIST = True
except DatasetNotFoundError:
    HAVE_FMNIST = False

needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

# A search small enough for a test, but every phase real: supernet training with
# proportional draws, pool evaluation, controller fit, generation, re-rank.
TINY = [
    "data.train_limit=800",
    "final.full_epochs=0",  # the demo's final training on all 60,000 images has its own test
    "supernet.channels=4",
    "supernet.batch_size=32",
    "supernet.steps_per_epoch=12",
    "supernet.checkpoint_every=4",
    "supernet.eval_batch_size=200",
    "search.pool_size=24",
    "search.iterations=2",
    "search.top_k=8",
    "search.new_per_iteration=6",
    "controller.epochs=8",
    "final.rerank_top=2",
    "final.epochs=1",
    "final.batch_size=64",
    "device=cpu",
    "threads=1",  # the same in the killed subprocess and in this process
]


def _search(out, *extra):
    return main(["search", "--config", "demo", "--out", str(out), "--no-progress", *TINY, *extra])


def _strip_times(obj):
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


@needs_fmnist
def test_search_end_to_end_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert _search(out) == 0
    printed = capsys.readouterr().out
    assert "best arch:" in printed and "iter 0:" in printed and "iter 2:" in printed
    best = json.loads((out / "best.json").read_text())
    assert {"arch", "size", "one_shot", "standalone_accuracy"} <= set(best)
    assert 0.0 <= best["standalone_accuracy"] <= 1.0 and best["size"] > 0
    pool = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(pool) > 24  # the controller added new archs
    assert all(len(r["one_shot"]) == 3 for r in pool[:24])  # scored at iterations 0, 1, 2
    assert len({r["hash"] for r in pool}) == len(pool)
    ranking = [json.loads(line) for line in (out / "ranking.jsonl").read_text().splitlines()]
    assert len(ranking) == 2 and ranking[0]["arch"] == best["arch"]
    for png in ("score_vs_size.png", "best_per_iteration.png", "draws_vs_size.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert list((out / "tb").glob("events.*"))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [0, 1, 2]
    assert "pairwise_accuracy" in history[0]["controller"]


def test_search_runs_on_synthetic_data_anywhere(tmp_path):
    """No data set needed: the synthetic preset shape used for timing searches."""
    out = tmp_path / "synthetic"
    extra = ["data.dataset=synthetic", "data.synthetic_samples=400", "data.synthetic_size=16",
             "data.synthetic_channels=3", "data.synthetic_classes=5", "search.iterations=1"]
    assert _search(out, *extra) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["size"] > 0 and 0.0 <= best["standalone_accuracy"] <= 1.0


def test_search_records_how_steps_and_evaluation_ran(tmp_path, capsys):
    """Each round's record and summary line say whether the supernet steps, the pool evaluation and the
    controller's minibatches replayed CUDA graphs, and why not: on a CPU they run uncaptured ("CPU")."""
    out = tmp_path / "fused"
    extra = ["data.dataset=synthetic", "data.synthetic_samples=400", "data.synthetic_size=8",
             "data.synthetic_channels=3", "data.synthetic_classes=5", "search.iterations=1", "supernet.layers=1",
             "supernet.kernels=fused", "supernet.steps_per_epoch=3", "controller.epochs=2", "final.rerank_top=1"]
    assert _search(out, *extra) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step_path"] for h in history] == [{"mode": "uncaptured", "reason": "CPU"}] * 2
    assert [h["eval_path"] for h in history] == [{"mode": "uncaptured", "reason": "CPU"}] * 2
    assert history[0]["controller_path"] == {"mode": "uncaptured", "reason": "CPU"}  # no controller after the last
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    assert [line.count(", uncaptured: CPU)") for line in lines] == [3, 2]
    out = tmp_path / "eager"
    assert _search(out, *extra[:-4], "supernet.kernels=eager", *extra[-3:], "supernet.graph=off",
                   "controller.graph=off") == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history[0]["step_path"] == {"mode": "eager", "reason": "graph='off'"}
    assert history[0]["eval_path"] == {"mode": "eager", "reason": "graph='off'"}
    assert history[0]["controller_path"] == {"mode": "uncaptured", "reason": "graph='off'"}


@needs_fmnist
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    assert _search(reference) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "bnao", "search", "--config", "demo", "--out", str(killed), "--no-progress", *TINY]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = killed / "progress.json"
    deadline = time.time() + 240
    state = None
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            state = None
        # Mid-iteration: the second iteration's supernet phase has checkpointed at least once.
        if state and state["iteration"] == 1 and state["phase"] == "train" and state["train_step"] >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run was not killed mid-iteration (last state {state})"
    assert not (killed / "best.json").exists()

    assert main(["search", "--resume", str(killed), "--no-progress"]) == 0
    for name in ("pool.jsonl", "ranking.jsonl", "best.json"):
        a, b = (reference / name).read_text(), (killed / name).read_text()
        if name.endswith(".jsonl"):
            a = [_strip_times(json.loads(x)) for x in a.splitlines()]
            b = [_strip_times(json.loads(x)) for x in b.splitlines()]
        else:
            a, b = _strip_times(json.loads(a)), _strip_times(json.loads(b))
        assert a == b, name


@needs_fmnist
def test_bad_input_is_refused_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "run"
    # Unknown key: the closest valid key is named.
    assert main(["search", "--config", "demo", "--out", str(out), "supernet.chanels=4"]) == 2
    assert "did you mean 'supernet.channels'" in capsys.readouterr().err

    # controller.graph=on where no graph can be captured (a CPU): refused before any training.
    assert main(["search", "--config", "demo", "--out", str(out), *TINY, "controller.graph=on"]) == 2
    assert "controller graph='on': minibatches cannot be captured here: CPU" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()

    # Invalid arch in a pool file: its line number; --skip-invalid skips it.
    pool = tmp_path / "pool.txt"
    good = "0 1 0 1 " * 10
    pool.write_text(f"{good}\n0 1 9\n")
    assert main(["search", "--config", "demo", "--out", str(out), "--pool", str(pool), *TINY]) == 2
    assert "pool.txt:2:" in capsys.readouterr().err

    # A run directory holding another run is refused unless --resume / --overwrite.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("seed: 0\n")
    assert main(["search", "--config", "demo", "--out", str(tmp_path / "other"), *TINY]) == 2
    assert "already holds a search run" in capsys.readouterr().err

    # A resume with a changed config names the keys that differ.
    run = tmp_path / "stopped"
    from bnao.search.config import load_config
    from bnao.search.rundir import RunDir

    RunDir(run).create(load_config("demo", TINY))
    assert main(["search", "--resume", str(run), "supernet.channels=8", "seed=5"]) == 2
    err = capsys.readouterr().err
    assert "seed: 0 -> 5" in err and "supernet.channels: 4 -> 8" in err

    # A damaged checkpoint is named, with the way out.
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["search", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is corrupt or truncated" in err and "--overwrite" in err
