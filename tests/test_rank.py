"""bnao rank: config, metrics (hand counts with ties, scipy), arch draws, the cache, the protocol end to end."""

import json

import numpy as np
import pytest
import scipy.stats

from bnao.cli import main
from bnao.rank import GroundTruthCache, load_rank_config, run_rank, score_metrics, spread
from bnao.rank import groundtruth as groundtruth_module
from bnao.rank.analysis import differences, main_metrics
from bnao.rank.common import draw_archs, load_data, make_space, sampling_sizes
from bnao.rank.oneshot import make_jobs
from bnao.search.config import ConfigError

# A protocol small enough for a test: synthetic 16x16 images, 5 archs, 1 epoch.
TINY = [
    "device=cpu", "data.dataset=synthetic", "data.synthetic_samples=240", "data.synthetic_size=16",
    "data.test_limit=60", "data.dev_fraction=0.25", "archs.count=5", "ground_truth.epochs=1",
    "ground_truth.batch_size=32", "ground_truth.workers=1", "supernet.batch_size=30", "supernet.epochs=[1,2]",
    "supernet.seeds=[0,1]", "supernet.workers=1", "supernet.eval_batch_size=20",
]


# ------------------------------------------------------------------- config
def test_presets_and_overrides():
    config = load_rank_config("demo", ["archs.count=5", "supernet.epochs=[4,1,2]"])
    assert config["archs"]["count"] == 5
    assert config["supernet"]["epochs"] == [1, 2, 4]  # sorted
    assert config["data"]["dataset"] == "fashion_mnist"
    assert load_rank_config("fashion-mnist")["supernet"]["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("overrides, message", [
    (["supernet.epoch=3"], "did you mean 'supernet.epochs'"),
    (["archs.mode=wide"], "must be one of diverse, similar"),
    (["supernet.epochs=[0,2]"], "distinct integers >= 1"),
    (["supernet.seeds=[1,1]"], "distinct integers >= 0"),
    (["sampler.names=[]"], "distinct sampler names"),
    (["archs.count=2"], ">= 3"),
    (["ground_truth.epochs=zero"], "expects int"),
    (["data.test_limit=0"], r"'data.test_limit' must be >= 1 \(or null for the whole split\), got 0"),
    (["data.train_limit=-5"], r"'data.train_limit' must be >= 1"),
])
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_rank_config(None, overrides)


def test_unknown_preset_names_the_rank_presets():
    # `cifar10` is a search preset, not a rank preset: the rank presets are listed instead.
    with pytest.raises(ConfigError, match=r"unknown preset 'cifar10'; available: demo, fashion-mnist"):
        load_rank_config("cifar10")


# ------------------------------------------------------------------ metrics
def test_metrics_hand_counts_with_ties():
    truth = [0.5, 0.5, 0.7, 0.9]  # a tie in the ground truth (pair 0,1)
    shots = [0.2, 0.3, 0.3, 0.1]  # a tie in the one-shot scores (pair 1,2)
    m = score_metrics(truth, shots)
    # Pairs i<j: (0,1) truth tie, 0.2 >= 0.3 is false -> disagree; (0,2) 0.5<0.7, 0.2<0.3 -> agree;
    # (0,3), (1,3), (2,3): truth rises, scores fall -> disagree; (1,2) 0.3<0.3 is false -> disagree.
    assert m["pairwise_accuracy"] == pytest.approx(1 / 6)
    # tau-b: P=1 (0,2), Q=3 ((0,3),(1,3),(2,3)), one tie in each list: (1-3)/sqrt(5*5).
    assert m["kendall_tau"] == pytest.approx(-0.4)
    # Average ranks: truth [1.5,1.5,3,4], scores [2,3.5,3.5,1]; centred dot -2.25 over sqrt(4.5*4.5).
    assert m["spearman_rho"] == pytest.approx(-0.5)
    assert m["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(truth, shots).statistic)
    assert m["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(truth, shots).statistic)


def test_metrics_against_scipy_with_ties():
    rng = np.random.default_rng(3)
    truth = np.round(rng.random(40), 2)
    shots = np.round(truth + 0.3 * rng.random(40), 1)  # coarse: many ties, like accuracy on a small batch
    m = score_metrics(truth, shots)
    assert m["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(truth, shots).statistic, abs=1e-12)
    assert m["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(truth, shots).statistic, abs=1e-12)


def test_spread_and_paired_differences():
    s = spread([0.6, 0.7, 0.8])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == pytest.approx((0.7, 0.1, 0.6, 0.8, 3))
    assert spread([0.5])["std"] is None  # undefined for one seed (ddof=1), not 0
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    main_scores = {"uniform": {2: {0: [1, 2, 4, 3], 1: [4, 3, 2, 1]}},  # pairwise 5/6 and 0
                   "proportional": {2: {0: [1, 2, 3, 4], 1: [2, 1, 3, 4]}}}  # 1 and 5/6
    metrics = main_metrics(truth, main_scores)
    pa = metrics["uniform"]["2"]["pairwise_accuracy"]
    assert pa["mean"] == pytest.approx(5 / 12) and pa["std"] == pytest.approx(np.std([5 / 6, 0], ddof=1))
    d = differences(metrics)["2"]["pairwise_accuracy"]
    assert d["mean_difference"] == pytest.approx(11 / 12 - 5 / 12)
    assert d["paired"]["min"] == pytest.approx(1 / 6) and d["paired"]["max"] == pytest.approx(5 / 6)


# -------------------------------------------------------------------- archs
def test_arch_draws():
    config = load_rank_config(None, TINY + ["archs.count=20", "archs.candidates=2000"])
    space, data = make_space(config), load_data(config)
    diverse = draw_archs(config, space, data)
    assert len(np.unique(space.hash_array(diverse))) == 20
    np.testing.assert_array_equal(diverse, draw_archs(config, space, data))  # seeded
    config["archs"]["mode"] = "similar"
    similar = draw_archs(config, space, data)
    sizes = sampling_sizes(config, space, similar, data)
    all_sizes = sampling_sizes(config, space, space.sample_array(2000, rng=np.random.default_rng(0)), data)
    median = np.median(all_sizes)
    assert np.all(np.abs(sizes / median - 1) <= 0.1 + 1e-9)
    assert np.ptp(sizes) < np.ptp(sampling_sizes(config, space, diverse, data))
    config["archs"]["band"], config["archs"]["count"] = 0.0001, 50
    with pytest.raises(ValueError, match="raise archs.candidates or archs.band"):
        draw_archs(config, space, data)


def test_jobs_cover_the_grid_and_the_variants():
    config = load_rank_config(None, TINY + ["supernet.seeds=[3,4]"])
    jobs = make_jobs(config)
    main_jobs = [j for j in jobs if j["variant"] is None]
    assert [(j["seed"], j["sampler"]) for j in main_jobs] == [
        (3, "uniform"), (3, "proportional"), (4, "uniform"), (4, "proportional")]
    assert [j["extra_eval_data"] for j in main_jobs] == ["fixed", "fixed", None, None]
    variants = [j for j in jobs if j["variant"]]
    assert [(j["sampler"], j["seed"], j["epochs"], j["unused_slot_update"]) for j in variants] == [
        ("uniform", 3, [2], "freeze"), ("proportional", 3, [2], "freeze")]
    config["supernet"]["schedule"] = "separate"
    assert sorted(j["epochs"] for j in make_jobs(config) if j["variant"] is None) == [[1]] * 4 + [[2]] * 4


# -------------------------------------------------------------------- cache
def test_cache_entries_are_keyed_and_damage_is_a_miss(tmp_path):
    cache = GroundTruthCache(tmp_path, {"training": {"epochs": 1}})
    assert cache.get("abc") is None
    cache.put("abc", {"accuracy": 0.5, "params": 10})
    assert cache.get("abc")["accuracy"] == 0.5
    assert GroundTruthCache(tmp_path, {"training": {"epochs": 2}}).get("abc") is None  # other settings
    cache.path("abc").write_text('{"accuracy": 0.')  # torn write
    assert cache.get("abc") is None
    assert not list(cache.folder.glob(".tmp-*"))


# ------------------------------------------------------------- end to end
@pytest.mark.slow
def test_protocol_end_to_end_and_cache_reuse(tmp_path, monkeypatch, capsys):
    calls = []
    real = groundtruth_module.train_standalone

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(groundtruth_module, "train_standalone", counting)
    cache, out = tmp_path / "cache", tmp_path / "run"
    assert main(["rank", "--out", str(out), "--cache", str(cache)] + TINY) == 0
    assert len(calls) == 5
    first = json.loads((out / "results.json").read_text())
    assert first["complete"] and first["ground_truth"]["trained"] == 5 and first["ground_truth"]["cache_hits"] == 0
    assert len(first["archs"]) == 5
    for arch in first["archs"]:
        assert set(arch) >= {"arch", "size", "ground_truth", "one_shot"}
        assert 0.0 <= arch["ground_truth"] <= 1.0 and arch["size"] > 0
        assert set(arch["one_shot"]) == {"uniform", "proportional"}
        for by_epochs in arch["one_shot"].values():
            assert set(by_epochs) == {"1", "2"} and all(set(s) == {"0", "1"} for s in by_epochs.values())
    for sampler in ("uniform", "proportional"):
        for e in ("1", "2"):
            entry = first["metrics"][sampler][e]
            for name in ("pairwise_accuracy", "kendall_tau", "spearman_rho"):
                per_seed = [entry["per_seed"][s][name] for s in ("0", "1")]
                assert entry[name]["mean"] == pytest.approx(np.mean(per_seed))
            # The stored scores give the stored metrics.
            truth = [a["ground_truth"] for a in first["archs"]]
            shots = [a["one_shot"][sampler][e]["1"] for a in first["archs"]]
            assert entry["per_seed"]["1"] == pytest.approx(score_metrics(truth, shots))
    assert {v["name"] for v in first["variants"]} == {"eval_data=fixed", "unused_slot_update=freeze"}
    assert (out / "results.md").read_text().startswith("# Ranking correlation")
    assert "| one-shot epochs | uniform | proportional |" in (out / "results.md").read_text()
    pytest.importorskip("matplotlib")
    assert {p.name for p in (out / "plots").glob("*.png")} == {
        "scatter_uniform.png", "scatter_proportional.png", "pairwise_vs_epochs.png", "size_vs_ground_truth.png"}

    # A second run trains no ground truth and, everything being seeded, gives the same results.
    assert main(["rank", "--out", str(out), "--cache", str(cache)] + TINY) == 2
    assert "--overwrite" in capsys.readouterr().err
    calls.clear()
    again = run_rank(load_rank_config(None, TINY), out, cache_dir=cache, overwrite=True, echo=lambda line: None)
    assert calls == []
    assert again["ground_truth"]["trained"] == 0 and again["ground_truth"]["cache_hits"] == 5
    assert again["archs"] == first["archs"] and again["metrics"] == first["metrics"]


@pytest.mark.slow
def test_worker_processes_give_the_in_process_results(tmp_path):
    small = TINY + ["archs.count=3", "supernet.epochs=[1]", "supernet.seeds=[0]", "variants.eval_data=false",
                    "variants.unused_slot_update=false", "sampler.names=[proportional]"]
    alone = run_rank(load_rank_config(None, small), tmp_path / "a", cache_dir=tmp_path / "c1", echo=lambda s: None)
    pooled = run_rank(load_rank_config(None, small + ["ground_truth.workers=2", "supernet.workers=2"]),
                      tmp_path / "b", cache_dir=tmp_path / "c2", echo=lambda s: None)
    assert pooled["ground_truth"]["trained"] == 3
    assert pooled["archs"] == alone["archs"]  # one thread per job wherever it runs: the same numbers


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    code = main(["rank", "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "nothing"), "data.dataset=cifar10",
                 "archs.count=3"])
    assert code == 2
    assert "cifar" in capsys.readouterr().err.lower()
