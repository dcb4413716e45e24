"""The compiled core loads softly: without it, one warning and the same results from the references."""

import json
import os
import subprocess
import sys

import pytest

from bnao import extension

SCRIPT = r"""
import json, os, sys, warnings
if os.environ.get("HIDE_BNAO_C"):
    # As on a machine where the build had no compiler: bnao._C cannot be imported.
    class HideCompiledCore:
        def find_spec(self, name, path=None, target=None):
            if name == "bnao._C":
                raise ImportError("No module named 'bnao._C' (hidden by the test)")
            return None
    sys.meta_path.insert(0, HideCompiledCore())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import bnao
    space = bnao.create_search_space()
    sizes = bnao.model_size(space.sample_array(50, 0), space=space).tolist()
    sampler = bnao.create_sampler("proportional", [float(s) for s in sizes], seed=3)
    draws = [sampler.draw() for _ in range(20)] + sampler.draw(30).tolist()
    import bnao.extension as e
    loaded = e.has_ops()
messages = [str(w.message) for w in caught if "compiled core" in str(w.message)]
print(json.dumps({"sizes": sizes, "draws": draws, "loaded": loaded, "warnings": messages}))
"""


def _run(hide: bool) -> dict:
    env = dict(os.environ)
    env.pop("BNAO_DISABLE_EXTENSION", None)
    if hide:
        env["HIDE_BNAO_C"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_the_extension_one_warning_and_reference_results():
    fallback = _run(hide=True)
    assert fallback["loaded"] is False
    assert len(fallback["warnings"]) == 1 and "pure-PyTorch reference" in fallback["warnings"][0]
    if not extension.has_ops():
        pytest.skip("the extension is not built here: nothing to compare the references with")
    compiled = _run(hide=False)
    assert compiled["loaded"] is True and compiled["warnings"] == []
    # The references are exact twins of the kernels: same sizes, same random stream.
    assert fallback["sizes"] == compiled["sizes"]
    assert fallback["draws"] == compiled["draws"]
