"""The search's last phase: the re-rank's winner trained on the whole training split and tested."""

import json

import torch

from bnao import load_model
from bnao.cli import main

SYNTHETIC = [
    "data.dataset=synthetic", "data.synthetic_samples=300", "data.synthetic_size=8", "data.synthetic_channels=1",
    "data.synthetic_classes=3", "supernet.channels=4", "supernet.batch_size=32", "supernet.steps_per_epoch=3",
    "supernet.eval_batch_size=50", "search.pool_size=8", "search.iterations=1", "search.top_k=4",
    "search.new_per_iteration=3", "controller.epochs=2", "final.rerank_top=2", "device=cpu", "threads=1",
]


def test_final_training_tests_the_winner_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--config", "demo", "--out", str(out), "--no-progress", *SYNTHETIC,
                 "final.full_epochs=2"]) == 0
    best = json.loads((out / "best.json").read_text())
    ranking = [json.loads(line) for line in (out / "ranking.jsonl").read_text().splitlines()]
    assert best["arch"] == ranking[0]["arch"]  # the re-rank's winner
    final = best["final"]
    # Whole training split (300 synthetic images, no dev hold-out) and the test split.
    assert final["epochs"] == 2 and final["train_images"] == 300 and final["test_images"] > 0
    assert best["test_accuracy"] == final["test_accuracy"]
    model, info = load_model(out / "model.pt")
    assert info["config"]["arch"] == best["arch"]
    assert 0.0 <= final["test_accuracy"] <= 1.0
    logits = model(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 3)


def test_no_final_training_by_default(tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--config", "demo", "--out", str(out), "--no-progress", *SYNTHETIC,
                 "final.full_epochs=0"]) == 0
    best = json.loads((out / "best.json").read_text())
    assert "final" not in best and not (out / "model.pt").exists()
