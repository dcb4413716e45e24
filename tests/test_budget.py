"""Size budgets: config values, exact extremes of the space, rejection sampling, and a budgeted search.

The extremes are checked against brute-force enumeration of whole spaces with
B=1 (10,000 and 160,000 archs), against every normal cell (and every
reduction cell) of the B=2 space combined with random partners, and against
random archs of the full B=5 space. A one-off brute force of the whole B=2
small space (5.06e8 archs) agreed too (see the module docstring of
``bnao.size.extremes``).
"""

import itertools
import json

import numpy as np
import pytest
import torch

from bnao.cli import main
from bnao.nets import build_network
from bnao.search.budget import Budget, BudgetError
from bnao.search.config import ConfigError, load_config
from bnao.search.pareto import pareto_front
from bnao.size import model_size
from bnao.size.extremes import size_extremes
from bnao.space import NAOSpace


def _all_cells(space):
    choices = []
    for node in range(space.num_nodes):
        choices += [range(node + 2), range(space.num_ops)] * 2
    return np.array(list(itertools.product(*choices)), dtype=np.int64)


SHAPE = dict(layers=2, channels=6, classes=10, in_channels=3)


@pytest.mark.parametrize("op_set", ["small", "middle"])
@pytest.mark.parametrize("skeleton", ["cifar", "imagenet"])
def test_extremes_equal_brute_force_of_a_whole_space(op_set, skeleton):
    space = NAOSpace(num_nodes=1, op_set=op_set)
    cells = _all_cells(space)
    archs = np.concatenate([np.repeat(cells, len(cells), 0), np.tile(cells, (len(cells), 1))], axis=1)
    sizes = model_size(archs, space=space, skeleton=skeleton, measure="both", **SHAPE)
    extremes = size_extremes(space, skeleton=skeleton, **SHAPE)
    for column, measure in enumerate(("params", "madds")):
        found = extremes[measure]
        assert (found.smallest, found.largest) == (sizes[:, column].min(), sizes[:, column].max())


def test_extremes_bound_every_cell_of_the_b2_space_and_are_attained():
    space = NAOSpace(num_nodes=2, op_set="small")
    cells = _all_cells(space)  # 22,500 cells
    rng = np.random.default_rng(0)
    partners = cells[rng.choice(len(cells), 12, replace=False)]
    archs = np.concatenate([
        np.concatenate([np.repeat(cells, len(partners), 0), np.tile(partners, (len(cells), 1))], axis=1),
        np.concatenate([np.tile(partners, (len(cells), 1)), np.repeat(cells, len(partners), 0)], axis=1),
    ])
    sizes = model_size(archs, space=space, measure="both", **SHAPE)
    extremes = size_extremes(space, **SHAPE)
    for column, measure in enumerate(("params", "madds")):
        found = extremes[measure]
        assert found.smallest <= sizes[:, column].min() and sizes[:, column].max() <= found.largest
        # The archs given for the extremes really have those sizes (counted by building the network).
        for arch, size in ((found.smallest_arch, found.smallest), (found.largest_arch, found.largest)):
            assert model_size(arch, space=space, measure=measure, backend="reference", **SHAPE)[0] == size
            if measure == "params":
                with torch.device("meta"):
                    net = build_network(arch, space, layers=2, channels=6, num_classes=10)
                assert sum(p.numel() for p in net.parameters()) == size


def test_extremes_bound_random_archs_of_the_full_space():
    space = NAOSpace(num_nodes=5, op_set="middle")
    archs = space.sample_array(300_000, rng=3)
    sizes = model_size(archs, space=space, measure="both", **SHAPE)
    extremes = size_extremes(space, **SHAPE)
    assert extremes["params"].smallest <= sizes[:, 0].min() and sizes[:, 0].max() <= extremes["params"].largest
    assert extremes["madds"].smallest <= sizes[:, 1].min() and sizes[:, 1].max() <= extremes["madds"].largest


def test_config_accepts_the_units_users_write():
    config = load_config("demo", ["search.max_params=3.5e6", "search.max_madds=600000000", "search.min_params=1e5"])
    assert config["search"]["max_params"] == 3.5e6 and isinstance(config["search"]["max_params"], float)
    assert config["search"]["max_madds"] == 600e6 and config["search"]["min_params"] == 1e5
    for bad in ("search.max_params=big", "search.max_params=true"):
        with pytest.raises(ConfigError, match="search.max_params"):
            load_config("demo", [bad])


def _budget(**bounds):
    # The demo preset's own budget is cleared first: each test states its bounds.
    config = load_config("demo", ["search.max_params=null"] + [f"search.{k}={v}" for k, v in bounds.items()]
                         + ["supernet.channels=4"])
    return Budget.from_config(config, NAOSpace(), classes=10, in_channels=1, image_size=28)


def test_bad_budgets_are_refused_with_the_range_of_the_space():
    with pytest.raises(BudgetError, match="search.min_params=50000 is above search.max_params=10000"):
        _budget(min_params=5e4, max_params=1e4)
    for bad in (-3, ".inf", 0):
        with pytest.raises(BudgetError, match="search.max_madds must be a positive number"):
            _budget(max_madds=bad)
    extremes = size_extremes(NAOSpace(), layers=1, channels=4, classes=10, in_channels=1, image_size=28)
    low, high = extremes["params"].smallest, extremes["params"].largest
    with pytest.raises(BudgetError, match=f"have {low:,} to {high:,} parameters .* Raise search.max_params to at least {low:,}"):
        _budget(max_params=low - 1).check_feasible()
    with pytest.raises(BudgetError, match="search.min_madds=.* cannot be met"):
        _budget(min_madds=extremes["madds"].largest + 1).check_feasible()
    _budget(max_params=low).check_feasible()  # exactly the smallest arch: feasible


def test_rejection_sampling_draws_distinct_archs_inside_the_budget():
    budget = _budget(min_params=12e3, max_params=16e3)
    archs = budget.draw(200, np.random.default_rng(0))
    assert len(archs) == 200 and len(set(budget.space.hash_array(archs).tolist())) == 200
    params = model_size(archs, space=budget.space, layers=1, channels=4, classes=10, in_channels=1, image_size=28,
                        backend="reference")
    assert params.min() >= 12e3 and params.max() <= 16e3
    tight = _budget(max_params=size_extremes(NAOSpace(), layers=1, channels=4, classes=10, in_channels=1,
                                             image_size=28)["params"].smallest + 50)
    with pytest.raises(BudgetError, match=r"too tight to fill the initial pool: \d+ of 20,000 random archs fit"):
        tight.draw(100, np.random.default_rng(0), max_draws=20_000)


# A budgeted search on synthetic data (no data set needed): every phase runs.
SEARCH = ["search.max_params=null", "final.full_epochs=0", "data.dataset=synthetic", "data.synthetic_samples=400", "data.synthetic_size=16", "data.synthetic_channels=3",
          "data.synthetic_classes=5", "supernet.channels=4", "supernet.batch_size=32", "supernet.steps_per_epoch=6",
          "supernet.eval_batch_size=100", "search.pool_size=24", "search.iterations=1", "search.top_k=8",
          "search.new_per_iteration=12", "search.fill_with_mutations=true", "controller.epochs=6",
          "final.rerank_top=3", "final.epochs=1", "final.batch_size=64", "device=cpu", "threads=1"]
NET = dict(layers=1, channels=4, classes=5, in_channels=3, image_size=16)


def test_budget_is_honoured_at_every_stage_of_a_search(tmp_path, capsys):
    space = NAOSpace()
    random_params = model_size(space.sample_array(20_000, rng=1), space=space, **NET)
    low, high = (int(v) for v in np.percentile(random_params, [10, 45]))
    out = tmp_path / "run"
    assert main(["search", "--config", "demo", "--out", str(out), "--no-progress", *SEARCH,
                 f"search.min_params={low}", f"search.max_params={high}"]) == 0
    log = capsys.readouterr().out
    assert "budget: " in log and "turned down" in log
    pool = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert len(pool) > 24 and any(r["iteration_added"] == 1 for r in pool)  # generated archs joined
    archs = np.array([[int(v) for v in r["arch"].split()] for r in pool])
    both = model_size(archs, space=space, measure="both", backend="reference", **NET)
    assert [r["final_params"] for r in pool] == both[:, 0].tolist()
    assert [r["final_madds"] for r in pool] == both[:, 1].tolist()
    assert all(low <= r["final_params"] <= high for r in pool)  # initial, generated and mutated archs
    ranking = [json.loads(line) for line in (out / "ranking.jsonl").read_text().splitlines()]
    best = json.loads((out / "best.json").read_text())
    for arch in [r["arch"] for r in ranking] + [best["arch"]]:
        with torch.device("meta"):
            net = build_network(arch, space, layers=1, channels=4, num_classes=5)
        assert low <= sum(p.numel() for p in net.parameters()) <= high
    fronts = [json.loads(line) for line in (out / "pareto.jsonl").read_text().splitlines()]
    final_scores = np.array([r["one_shot"][-1] for r in pool], dtype=float)
    expected = {pool[i]["hash"] for i in pareto_front(final_scores, both[:, 0])}
    assert {r["hash"] for r in fronts if r["stage"] == "one_shot" and r["iteration"] == 1} == expected
    assert any(r["stage"] == "standalone" for r in fronts)
    assert (out / "plots" / "pareto.png").is_file()


def test_impossible_budget_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--config", "demo", "--out", str(out), "--no-progress", *SEARCH,
                 "search.max_params=1000"]) == 2
    err = capsys.readouterr().err
    smallest = size_extremes(NAOSpace(), skeleton="cifar", **{k: v for k, v in NET.items()})["params"].smallest
    assert "search.max_params=1000 cannot be met" in err and f"{smallest:,} to" in err
    assert not (out / "checkpoint.pt").exists()


def test_generation_accepts_only_what_the_filter_allows():
    from bnao.controller import NAOController

    space = NAOSpace()
    seeds = space.sample_array(20, rng=0)
    # A limit the generator can meet: the median size of what it generates without a filter.
    unfiltered = NAOController(space, device="cpu", seed=0).generate(seeds, 10)
    limit = float(np.median(model_size(unfiltered, space=space, **NET)))
    budget_mask = lambda archs: model_size(archs, space=space, **NET) <= limit  # noqa: E731
    controller = NAOController(space, device="cpu", seed=0)
    new, info = controller.generate(seeds, 10, return_info=True, max_rounds=6, accept=budget_mask)
    assert len(new) > 0 and model_size(new, space=space, **NET).max() <= limit
    # Half of the unfiltered archs are above the limit: the filtered run refused some of what it generated.
    assert info["rejected"] > 0 and info["rounds"] <= 6
    none, info = controller.generate(seeds, 5, return_info=True, max_rounds=4, accept=lambda a: np.zeros(len(a), bool))
    assert len(none) == 0 and info["rounds"] == 4 and info["rejected"] > 0


def test_size_range_command(capsys):
    assert main(["size", "--range", "--layers", "2", "--channels", "6", "--measure", "both"]) == 0
    lines = capsys.readouterr().out.splitlines()
    extremes = size_extremes(NAOSpace(), **SHAPE)
    assert lines[0] == f"params {extremes['params'].smallest} {extremes['params'].largest}"
    assert lines[3] == f"madds {extremes['madds'].smallest} {extremes['madds'].largest}"
    smallest_arch = lines[1].split(":", 1)[1].split()
    assert model_size(" ".join(smallest_arch), layers=2, channels=6)[0] == extremes["params"].smallest
