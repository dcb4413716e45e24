"""Up-front checks of ``bnao search``: config ranges, data size, run directory, resume and help."""

import argparse

import pytest

from bnao.cli import main
from bnao.search import config_checks
from bnao.search.config import ConfigError, list_presets, load_config

# A search on random images, small enough to reach every start-up check in a second or two.
SYNTHETIC = [
    "data.dataset=synthetic",
    "data.synthetic_samples=200",
    "data.train_limit=200",
    "supernet.layers=1",
    "supernet.channels=4",
    "search.pool_size=6",
    "search.iterations=0",
    "final.full_epochs=0",
    "device=cpu",
    "threads=1",
]


def _search(out, *extra):
    return main(["search", "--config", "demo", "--out", str(out), "--no-progress", *SYNTHETIC, *extra])


def check_config(config):
    # Looked up at call time, so that each test fails on its own where the check is missing.
    return config_checks.check_config(config)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnao search: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_every_preset_passes_the_checks():
    for name in list_presets():
        check_config(load_config(name))


def test_rerank_top_zero_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert _search(out, "final.rerank_top=0") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "config key 'final.rerank_top' must be >= 1, got 0" in line
    assert not out.exists()  # refused before the run directory is written


@pytest.mark.parametrize("override, message", [
    ("final.epochs=0", "config key 'final.epochs' must be >= 1, got 0"),
    ("supernet.epochs=-1", "config key 'supernet.epochs' must be >= 1, got -1"),
    ("supernet.batch_size=0", "config key 'supernet.batch_size' must be >= 1, got 0"),
    ("final.batch_size=0", "config key 'final.batch_size' must be >= 1, got 0"),
    ("controller.batch_size=0", "config key 'controller.batch_size' must be >= 1, got 0"),
    ("search.pool_size=-1", "config key 'search.pool_size' must be >= 1, got -1"),
    ("search.pool_size=0", "config key 'search.pool_size' must be >= 1, got 0"),
    ("search.iterations=-1", "config key 'search.iterations' must be >= 0, got -1"),
    ("supernet.grad_clip=-1", "config key 'supernet.grad_clip' must be >= 0, got -1.0"),
    ("threads=-2", "config key 'threads' must be >= 0, got -2"),
    ("data.train_limit=0", "config key 'data.train_limit' must be >= 1, got 0"),
    ("data.synthetic_size=0", "config key 'data.synthetic_size' must be >= 1, got 0"),
    ("supernet.drop_path_keep_prob=0", "config key 'supernet.drop_path_keep_prob' must be in (0, 1], got 0.0"),
    ("final.dropout=1", "config key 'final.dropout' must be in [0, 1), got 1.0"),
    ("supernet.label_smoothing=-0.1", "config key 'supernet.label_smoothing' must be in [0, 1), got -0.1"),
    ("data.dev_fraction=1", "config key 'data.dev_fraction' must be in (0, 1), got 1.0"),
    ("supernet.lr_max=0", "config key 'supernet.lr_max' must be > 0, got 0.0"),
    ("controller.lr=-0.1", "config key 'controller.lr' must be > 0, got -0.1"),
    ("final.lr_max=.nan", "config key 'final.lr_max' must be > 0, got nan"),
    ("seed=-1", "config key 'seed' must be >= 0, got -1"),
])
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ConfigError) as err:
        check_config(load_config("demo", [override]))
    assert message in str(err.value)


def test_zero_where_zero_means_something_is_accepted():
    check_config(load_config("demo", ["search.iterations=0", "supernet.grad_clip=0", "threads=0",
                                      "final.full_epochs=0", "final.dropout=0"]))


def test_final_batch_larger_than_the_data_is_refused_before_the_search(tmp_path, capsys):
    out = tmp_path / "run"
    assert _search(out, "final.batch_size=256") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'final.batch_size'" in line and "256" in line and "180 training images" in line
    assert not (out / "checkpoint.pt").exists() and not (out / "config.yaml").exists()


def test_missing_data_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "--config", "demo", "--out", str(out), "--no-progress", "--data-dir", str(tmp_path / "none"),
            "data.dataset=cifar10", "device=cpu"]
    assert main(args) == 2
    capsys.readouterr()
    assert not (out / "config.yaml").exists()
    assert main(args) == 2  # the retry meets the same problem, not "already holds a search run"
    assert "already holds" not in capsys.readouterr().err


def test_data_root_may_change_on_resume_but_the_search_may_not():
    from bnao.search.resume import RESTORE_MAY_DIFFER, ResumeChangeError, split_changes

    old = load_config("demo", ["data.root=/old"])
    changes = split_changes(old, load_config("demo", ["data.root=/new"]))
    assert changes == {"data.root": ("/old", "/new")}
    assert "data.root" in RESTORE_MAY_DIFFER
    with pytest.raises(ResumeChangeError, match="seed"):
        split_changes(old, load_config("demo", ["data.root=/new", "seed=3"]))


@pytest.mark.parametrize("text, problem", [
    ("device: [auto\n", "not valid YAML"),
    ("- 1\n- 2\n", "not a mapping"),
    ("seed: 0\n", "misses"),
])
def test_a_damaged_config_yaml_is_named_on_resume(tmp_path, capsys, text, problem):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    assert main(["search", "--resume", str(run), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(run / "config.yaml") in line and problem in line and "--out" in line


def test_help_lists_every_preset():
    from bnao.commands import search

    parser = argparse.ArgumentParser()
    search.add_arguments(parser)
    text = parser.format_help()
    for name in list_presets():
        assert name in text, name
    assert "imagenet-mobile" in text
