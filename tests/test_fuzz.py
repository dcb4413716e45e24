"""Property-based fuzzing of everything bnao reads: arch text, pool files, YAML, overrides, CLI arguments.

Every input either works or ends with ONE error line (exit code 2 on the command line), never a
traceback. Each property draws ``FUZZ.max_examples`` inputs per run (random each run; a failure
prints the seed that reproduces it). The compiled ops are fuzzed in tests/test_fuzz_ops.py.
"""

import contextlib
import io
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnao.cli import main
from bnao.search.config import ConfigError, flatten, load_config
from bnao.search.config import DEFAULTS as SEARCH_DEFAULTS
from bnao.search.pool import PoolFileError, read_pool_file
from bnao.space import InvalidArchError, NAOSpace

# Inputs per property and run; BNAO_FUZZ_SCALE=10 fuzzes ten times longer (a deeper hunt by hand).
SCALE = float(os.environ.get("BNAO_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=list(HealthCheck), database=None)
CLI_FUZZ = settings(FUZZ, max_examples=int(60 * SCALE))

SPACE = NAOSpace()
VALID = [SPACE.format(SPACE.sample(seed)) for seed in range(5)]
KEYS = sorted(flatten(SEARCH_DEFAULTS))

# ----------------------------------------------------------------------------- strategies
integers = st.one_of(st.integers(-3, 12), st.integers(), st.sampled_from([2**31, 2**63, -(2**63)]))
# Beyond Python's 4300-digit limit for int(str): int() raises on it.
HUGE_NUMBER = "9" * 5000
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), integers, st.floats(allow_nan=True), st.text(max_size=8)),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=50,
)


@st.composite
def arch_texts(draw):
    """Arch-like text: valid archs mutated token by token, number soup, JSON, or arbitrary text."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        tokens = draw(st.sampled_from(VALID)).split()
        for _ in range(draw(st.integers(0, 3))):
            position = draw(st.integers(0, len(tokens)))
            token = draw(st.one_of(integers.map(str), st.text(string.printable, max_size=4), st.just(HUGE_NUMBER)))
            if draw(st.booleans()) and position < len(tokens):
                tokens[position] = token
            elif draw(st.booleans()):
                tokens.insert(position, token)
            elif tokens:
                tokens.pop(min(position, len(tokens) - 1))
        return draw(st.sampled_from([" ", ",", ", ", "\t"])).join(tokens)
    if kind == 1:
        return " ".join(map(str, draw(st.lists(integers, max_size=50))))
    if kind == 2:
        return json.dumps(draw(json_values))
    if kind == 3:
        cells = st.lists(integers, max_size=25)
        return json.dumps({"normal": draw(st.one_of(cells, json_values)), "reduction": draw(st.one_of(cells, json_values))})
    return draw(st.text(max_size=60))


def _one_line(err: BaseException) -> bool:
    text = str(err)
    return bool(text.strip()) and "\n" not in text.strip()


# ----------------------------------------------------------------------------- arch text
@FUZZ
@given(arch_texts())
def test_arch_text_parses_or_is_refused_in_one_line(text):
    try:
        arch = SPACE.arch(text)
    except InvalidArchError as err:
        assert _one_line(err), str(err)
        return
    SPACE.validate(arch.to_list())
    assert SPACE.parse(SPACE.format(arch)) == arch  # what parses, round-trips


@FUZZ
@given(st.lists(st.one_of(arch_texts(), st.sampled_from(VALID), st.just("# comment"), st.just(""),
                          arch_texts().map(lambda a: json.dumps({"arch": a, "size": 3})),
                          json_values.map(lambda v: json.dumps({"arch": v}))), max_size=8),
       st.binary(max_size=20), st.booleans())
def test_pool_files_are_read_or_refused_in_one_line(lines, junk, skip_invalid):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pool.txt"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + (b"\n" + junk if junk else b""))
        try:
            archs, problems = read_pool_file(str(path), SPACE, skip_invalid=skip_invalid)
        except PoolFileError as err:
            assert _one_line(err), str(err)
            return
    assert archs.ndim == 2 and archs.shape[1] == 2 * SPACE.cell_length and len(archs) >= 1
    SPACE.validate_array(archs)
    assert skip_invalid or not problems


# ----------------------------------------------------------------------------- configuration
scalar_values = st.one_of(st.none(), st.booleans(), integers, st.floats(), st.text(max_size=10),
                          st.lists(st.integers(-2, 5), max_size=3))
config_keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k[:-1]),
                        st.sampled_from(KEYS).map(lambda k: k.split(".")[0]), st.text(max_size=12))


def _nest(flat):
    out = {}
    for key, value in flat.items():
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[parts[-1]] = value
    return out


@FUZZ
@given(st.one_of(st.dictionaries(config_keys, scalar_values, max_size=6).map(lambda d: yaml.safe_dump(_nest(d))),
                 st.text(max_size=80), json_values.map(json.dumps)))
def test_yaml_presets_load_or_are_refused_in_one_line(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "preset.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            config = load_config(str(path))
        except ConfigError as err:
            assert _one_line(err), str(err)
            return
    assert set(flatten(config)) == set(KEYS)


@FUZZ
@given(st.lists(st.one_of(
    st.tuples(config_keys, scalar_values.map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n").strip()))
    .map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=30)), max_size=5))
def test_overrides_apply_or_are_refused_in_one_line(overrides):
    try:
        config = load_config("demo", overrides)
    except ConfigError as err:
        assert _one_line(err), str(err)
        return
    assert set(flatten(config)) == set(KEYS)


# ----------------------------------------------------------------------------- the command line
class _WouldRun(Exception):
    """Raised where a command that parsed its input would start real work."""


@pytest.fixture(scope="module")
def no_real_work():
    """Stops every command just before it would train, search or profile (all input checks still run)."""
    from bnao.rank import experiment
    from bnao.search import loop
    from bnao.supernet import profiling
    from bnao.train import standalone

    def would_run(*args, **kwargs):
        raise _WouldRun

    patch = pytest.MonkeyPatch()
    patch.setattr(loop.BalancedNAO, "__init__", would_run)
    patch.setattr(standalone.StandaloneTrainer, "__init__", would_run)
    patch.setattr(profiling, "profile_supernet", would_run)
    patch.setattr(experiment, "run_rank", would_run)
    import bnao.rank

    patch.setattr(bnao.rank, "run_rank", would_run)
    yield tempfile.mkdtemp(prefix="bnao-fuzz-")
    patch.undo()


FLAGS = ["--config", "-c", "--out", "-o", "--resume", "--overwrite", "--pool", "--skip-invalid", "--device",
         "--seed", "--no-progress", "--space", "--nodes", "--skeleton", "--layers", "--channels", "--classes",
         "--in-channels", "--image-size", "--range", "--measure", "--file", "--epochs", "--batch-size", "--lr",
         "--dataset", "--format", "--weights", "--steps", "--threads", "--json", "--split", "--limit", "--preset"]
WORDS = ["demo", "cifar10", "small", "middle", "both", "madds", "cpu", "cuda:7", "auto", "0", "-1", "3",
         "1e9", "nan", "x", "synthetic", "onnx", "torchscript", "supernet.epochs=2", "seed=x", "device=cpu",
         "search.pool_size=-4"] + VALID[:2]


@CLI_FUZZ
@given(st.sampled_from(["size", "search", "train", "eval", "export", "rank", "profile", "info", "nope", "-h"]),
       st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(WORDS), arch_texts(), st.text(max_size=12)),
                max_size=7))
def test_cli_arguments_work_or_end_with_one_error_line(no_real_work, command, arguments):
    folder = Path(no_real_work)
    # Paths the commands create land in a scratch folder, never in the working tree.
    argv = [command] + [str(folder / a) if previous in ("--out", "-o", "--resume", "--file", "--pool", "--weights")
                        else a for previous, a in zip([command] + arguments, arguments)]
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = main(argv)
    except SystemExit as exit_:  # argparse: usage line, then one error line
        code = exit_.code
    except _WouldRun:
        return  # the input was accepted
    text = stderr.getvalue()
    assert "Traceback" not in text
    if code in (0, None):
        return
    assert code == 2, (argv, code, text)
    # One error: the only line that names the program outside argparse's usage block and warnings.
    # (A refusal may list the keys it refuses on indented lines below it.)
    errors = [line for line in text.splitlines() if line.startswith("bnao") and "warning:" not in line]
    assert len(errors) == 1 and text.rstrip().splitlines()[-1].startswith(("bnao", "  ")), (argv, text)
