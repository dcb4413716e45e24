"""Ranking correlation: does size-proportional sampling make one-shot rankings agree better (SPEC section 7)?

Typical use::

    from bnao.rank import load_rank_config, run_rank

    config = load_rank_config("demo", ["archs.count=12"])
    results = run_rank(config, "runs/rank-demo")
    results["metrics"]["proportional"]["2"]["pairwise_accuracy"]["mean"]

The command line is ``bnao rank --config demo --out runs/rank-demo``.
"""

from .analysis import score_metrics, spread
from .config import RANK_DEFAULTS, RANK_SCHEMA, check_config, list_rank_presets, load_rank_config
from .experiment import run_rank
from .groundtruth import GroundTruthCache, default_cache_dir

__all__ = ["RANK_DEFAULTS", "RANK_SCHEMA", "GroundTruthCache", "check_config", "default_cache_dir",
           "list_rank_presets", "load_rank_config", "run_rank", "score_metrics", "spread"]
