"""Search configuration and pool: presets, overrides, unknown keys, pool files."""

import json

import numpy as np
import pytest

from bnao.search.config import (
    DEFAULTS,
    ConfigError,
    apply_overrides,
    diff,
    list_presets,
    load_config,
    parse_overrides,
)
from bnao.search.pool import Pool, PoolFileError, read_pool_file
from bnao.space import NAOSpace


def test_presets_load_and_differ_from_defaults_where_documented():
    assert {"demo", "cifar10", "cifar100", "imagenet"} <= set(list_presets())
    c10 = load_config("cifar10")
    # The reference's settings (SPEC sections 4-6).
    assert c10["search"]["pool_size"] == 1000 and c10["search"]["new_per_iteration"] == 300
    assert c10["supernet"]["epochs"] == 50 and c10["supernet"]["batch_size"] == 64
    assert load_config("cifar100")["data"]["dataset"] == "cifar100"
    assert load_config("imagenet")["supernet"]["skeleton"] == "imagenet"
    assert load_config("demo")["data"]["dataset"] == "fashion_mnist"


def test_overrides_are_typed():
    c = load_config(None, ["supernet.epochs=5", "sampler.name=uniform", "supernet.lr_max=0.1", "data.root=/x"])
    assert c["supernet"]["epochs"] == 5 and c["sampler"]["name"] == "uniform"
    assert c["supernet"]["lr_max"] == 0.1 and c["data"]["root"] == "/x"
    # An int where a float is expected is fine; a string where an int is expected is not.
    assert load_config(None, ["supernet.weight_decay=0"])["supernet"]["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="expects int"):
        load_config(None, ["supernet.epochs=five"])
    with pytest.raises(ConfigError, match="expects bool"):
        load_config(None, ["supernet.bf16=3"])


def test_on_and_off_choices_survive_yaml_booleans(tmp_path):
    """YAML 1.1 reads an unquoted on/off as a boolean; for a key whose choices are on/off it means the word."""
    assert load_config(None, ["supernet.graph=off"])["supernet"]["graph"] == "off"
    assert load_config(None, ["supernet.graph=on"])["supernet"]["graph"] == "on"
    assert load_config(None, ["controller.graph=off"])["controller"]["graph"] == "off"
    path = tmp_path / "run.yaml"
    path.write_text("supernet:\n  graph: off\n")
    assert load_config(str(path))["supernet"]["graph"] == "off"
    # Keys without on/off choices still refuse a boolean.
    with pytest.raises(ConfigError, match="expects str, got a boolean"):
        load_config(None, ["supernet.kernels=off"])


def test_unknown_keys_name_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'supernet.epoch'; did you mean 'supernet.epochs'"):
        load_config(None, ["supernet.epoch=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'search.new_per_iteration'"):
        load_config(None, ["search.new_per_iter=3"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["supernet=3"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["supernet.epochs"])


def test_unknown_key_in_yaml_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("supernet:\n  chanels: 16\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'supernet.chanels'; did you mean 'supernet.channels'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no_such_preset")


def test_diff_names_changed_keys():
    a = load_config("cifar10")
    b = apply_overrides(a, {"supernet.epochs": 10, "seed": 3})
    assert diff(a, b) == ["seed: 0 -> 3", "supernet.epochs: 50 -> 10"]
    assert diff(a, a) == []
    assert set(DEFAULTS) >= {"data", "supernet", "sampler", "controller", "search", "final"}


def test_pool_adds_only_new_archs_by_canonical_hash():
    space = NAOSpace()
    pool = Pool.empty(space)
    archs = space.sample_array(50, rng=0)
    added = pool.add(archs, np.arange(50) + 1, iteration=0)
    assert added.tolist() == list(range(50)) and len(pool) == 50
    # Branch-swapped copies and repeats are not new.
    swapped = archs.copy()
    swapped[:, 0:2], swapped[:, 2:4] = archs[:, 2:4], archs[:, 0:2]
    fresh = space.sample_array(5, rng=99)
    added = pool.add(np.concatenate([swapped, fresh, fresh]), np.ones(60), iteration=1)
    assert added.tolist() == list(range(50, 55))
    assert pool.born[50:].tolist() == [1] * 5
    assert len(set(pool.hashes.tolist())) == len(pool)


def test_pool_scores_top_and_state_round_trip(tmp_path):
    space = NAOSpace()
    pool = Pool.empty(space)
    pool.add(space.sample_array(10, rng=1), np.arange(10) + 100, iteration=0)
    pool.set_scores(0, np.linspace(0, 1, 10))
    pool.add(space.sample_array(3, rng=2), np.ones(3), iteration=1)
    assert pool.top(3).tolist() == [9, 8, 7]
    assert np.isnan(pool.latest_scores()[10:]).all()
    with pytest.raises(ValueError, match="expected 13 scores"):
        pool.set_scores(1, np.zeros(10))
    other = Pool.empty(space)
    other.load_state_dict(pool.state_dict())
    np.testing.assert_array_equal(other.archs, pool.archs)
    path = tmp_path / "pool.jsonl"
    pool.write_jsonl(str(path))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 13 and records[9]["one_shot"] == [1.0] and records[12]["one_shot"] == [None]
    assert records[0]["size"] == 100 and len(records[0]["hash"]) == 16
    # A pool.jsonl of an earlier run is a valid pool file.
    archs, problems = read_pool_file(str(path), space)
    np.testing.assert_array_equal(archs, pool.archs)
    assert problems == []


def test_pool_file_reports_the_line_number(tmp_path):
    space = NAOSpace()
    good = " ".join(map(str, space.sample(rng=0).to_list()))
    path = tmp_path / "pool.txt"
    path.write_text(f"# my pool\n{good}\n\n0 1 2\n{good}\n")
    with pytest.raises(PoolFileError, match=r"pool.txt:4: .*has 40 integers.*--skip-invalid"):
        read_pool_file(str(path), space)
    archs, problems = read_pool_file(str(path), space, skip_invalid=True)
    assert archs.shape == (2, 40) and len(problems) == 1 and ":4:" in problems[0]
    with pytest.raises(FileNotFoundError):
        read_pool_file(str(tmp_path / "nope.txt"), space)
