"""gpu-check's plumbing on the CPU: time limits, parsing, the search extrapolation and the report.

The GPU parts themselves need a GPU; what decides whether their report can be
trusted (a hung part is cut and its processes killed, counts are parsed right,
figures are compared with the right targets, the extrapolation multiplies the
right units) is checked here with hand-made inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpucheck import measure, report  # noqa: E402
from gpucheck.runner import CUT, FAIL, PASS, SKIP, Context, Figure, Part, PartResult, run_parts  # noqa: E402


def _ctx(tmp_path, budget=60.0):
    return Context(tmp_path / "out", ROOT, sys.executable, gpu=False, smoke=False, deadline=time.monotonic() + budget)


def test_figure_verdicts():
    assert Figure("a", 3500.0, "img/s", 3000.0).verdict() == "met"
    assert Figure("a", 2999.0, "img/s", 3000.0).verdict() == "missed"
    assert Figure("s", 1700.0, "s", 1800.0, better="lower").verdict() == "met"
    assert Figure("s", 1900.0, "s", 1800.0, better="lower").verdict() == "missed"
    assert Figure("a", None, "img/s", 3000.0).verdict() == "not measured"
    assert Figure("m", 812.0, "MiB").verdict() == "no target"
    assert Figure("a", 3500.0, "img/s", 3000.0).verdict(comparable=False) == "not comparable"


def test_run_parts_limits_kills_and_budget(tmp_path):
    pid_file = tmp_path / "pid"
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    def command_part(code):
        def run(ctx):
            res = ctx.command([sys.executable, "-c", code], "c.log")
            status = CUT if res.timed_out else (PASS if res.returncode == 0 else FAIL)
            return PartResult("", status, f"exit {res.returncode}")
        return run

    def broken(ctx):
        raise KeyError("no such figure")

    parts = [
        Part("ok", "passes", 30, 1, command_part("pass")),
        Part("bad", "exits 3", 30, 1, command_part("raise SystemExit(3)")),
        Part("hang", "sleeps past its limit", 2, 1, command_part(hang)),
        Part("broken", "driver raises", 30, 1, broken),
        Part("late", "needs more than the budget has", 30, 1000, command_part("pass")),
        Part("skipped", "not selected", 30, 1, command_part("pass")),
        # Nothing to run here (as DALI without its wheels): skipped, not cut, though the budget cannot hold it.
        Part("unready", "has nothing to run", 30, 1000, command_part("raise SystemExit(5)"),
             ready=lambda ctx: PartResult("unready", SKIP, "nothing to run here")),
        Part("ready", "its check lets it run", 30, 1, command_part("pass"), ready=lambda ctx: None),
    ]
    start = time.monotonic()
    results = run_parts(_ctx(tmp_path), parts, skip=["skipped"], echo=lambda line: None)
    assert time.monotonic() - start < 30  # the 60 s sleep was cut at 2 s
    status = {r.name: r.status for r in results}
    assert status == {"ok": PASS, "bad": FAIL, "hang": CUT, "broken": FAIL, "late": CUT, "skipped": SKIP,
                      "unready": SKIP, "ready": PASS}
    by_name = {r.name: r for r in results}
    assert "KeyError" in by_name["broken"].summary and "not started" in by_name["late"].summary
    assert by_name["unready"].summary == "nothing to run here"
    assert 1.5 < by_name["hang"].seconds < 15 and by_name["hang"].limit_s == 2
    with pytest.raises(ProcessLookupError):  # the hung child was killed with its process group
        os.kill(int(pid_file.read_text()), 0)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda_paths" name="test_a"/>
<testcase classname="tests.test_cuda_paths" name="test_b"><failure message="boom">trace</failure></testcase>
<testcase classname="tests.test_cuda_data" name="test_c"><skipped message="needs two CUDA GPUs"/></testcase>
<testcase classname="tests.test_cuda_data" name="test_d"><error message="fixture">trace</error></testcase>
</testsuite></testsuites>"""

CTEST = """    Start 2: test_alias_cuda
2/3 Test #2: test_alias_cuda ..................***Skipped   1.12 sec
3/3 Test #3: test_model_size ..................   Passed    1.32 sec

67% tests passed, 1 tests failed out of 3

The following tests did not run:
\t  2 - test_alias_cuda (Skipped)

The following tests FAILED:
\t  1 - test_alias (Failed)
"""


def test_parsers(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(JUNIT)
    c = measure.pytest_counts(xml)
    assert (c["passed"], c["failed"], c["errors"], c["skipped"]) == (1, 1, 1, 1)
    assert c["failed_ids"] == ["tests.test_cuda_paths::test_b", "tests.test_cuda_data::test_d"]
    assert "needs two CUDA GPUs" in c["skipped_ids"][0]
    t = measure.ctest_counts(CTEST)
    assert (t["total"], t["failed"], t["skipped"], t["parsed"]) == (3, 1, 1, True)
    assert t["skipped_names"] == ["test_alias_cuda"] and t["failed_names"] == ["test_alias"]
    # CTest on the H200 machine (2026-11-27) words an all-passed run without the failed count.
    passed = measure.ctest_counts("6/6 Test #6: test_reduction_split ....   Passed    1.18 sec\n\n"
                                  "100% tests passed out of 6\n\nTotal Test time (real) =   4.70 sec\n")
    assert (passed["total"], passed["failed"], passed["parsed"]) == (6, 0, True)
    # A crash as the H200 machine printed it (2026-11-27): the test that died, not the module list.
    crashed = ("FF.....Fatal Python error: Segmentation fault\n\nThread 0x00007fe07f4516c0 (most recent call "
               "first):\n  <no Python frame>\n\nCurrent thread 0x00007fe40cd3e140 (most recent call first):\n"
               '  File "/opt/torch/.venv/lib/python3.12/site-packages/torch/_ops.py", line 1269 in __call__\n'
               '  File "/home/user/bnao/tests/test_fused_round.py", line 406 in test_backward_accumulate_overwrites\n'
               '  File "/opt/torch/.venv/lib/python3.12/site-packages/_pytest/python.py", line 167 in pytest_pyfunc\n')
    crash = measure.pytest_crash(crashed)
    assert crash.test == "tests/test_fused_round.py::test_backward_accumulate_overwrites" and crash.line == 406
    assert str(crash) == ("Segmentation fault in tests/test_fused_round.py::test_backward_accumulate_overwrites, "
                          "line 406")
    assert measure.pytest_crash("3 passed in 1.0s") is None
    assert measure.sanitizer_errors("...\n========= ERROR SUMMARY: 0 errors\n") == 0
    assert measure.sanitizer_errors("========= ERROR SUMMARY: 3 errors") == 3
    assert measure.sanitizer_errors("Segmentation fault") is None


def _write_run(run_dir: Path):
    """A shortened run: 4 rounds of 200 steps, pools 300..600, one re-ranked arch (numbers chosen by hand)."""
    run_dir.mkdir()
    rounds = [  # pool after generation, generated, train, eval, controller, generate seconds
        (400, 100, 10.0, 6.0, 3.0, 1.0), (500, 100, 8.0, 8.0, 4.0, 2.0), (600, 100, 8.0, 10.0, 5.0, 1.0),
    ]
    lines = [{"iteration": i, "pool": p, "generated": g,
              "phase_seconds": {"train": t, "eval": e, "controller": c, "generate": gen}}
             for i, (p, g, t, e, c, gen) in enumerate(rounds)]
    lines.append({"iteration": 3, "pool": 600, "phase_seconds": {"train": 8.0, "eval": 12.0}})
    (run_dir / "history.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run_dir / "ranking.jsonl").write_text(json.dumps({"standalone_seconds": 20.0}) + "\n")
    return {"data": {"dataset": "synthetic", "dev_fraction": 0.1, "synthetic_samples": 50000},
            "supernet": {"epochs": 1, "steps_per_epoch": 200, "batch_size": 64},
            "controller": {"epochs": 10}, "final": {"epochs": 1, "rerank_top": 1}}


def test_search_extrapolation_by_hand(tmp_path):
    ext = measure.extrapolate_search(tmp_path / "run", _write_run(tmp_path / "run"))
    full = {p["phase"]: p["full_s"] for p in ext["phases"]}
    # Medians of the per-unit costs times the units at the reference settings:
    # train 0.04 s/step x 4 x 50 x 703; eval 0.02 s/arch x (1000+1300+1600+1900);
    # controller 0.001 s/(epoch x arch) x 1000 x (1000+1300+1600); generate 0.01 s x 900; rerank 20 s x 5 x 10.
    assert full == pytest.approx({"train": 5624.0, "eval": 116.0, "controller": 3900.0, "generate": 9.0,
                                  "rerank": 1000.0})
    assert ext["total_s"] == pytest.approx(10649.0)
    assert ext["measured_s"] == pytest.approx(34 + 36 + 12 + 4 + 20)
    assert ext["rounds"] == 4 and ext["steps_per_round"] == 200


def test_controller_extrapolation_takes_the_epoch_measured_at_the_reference_pool(tmp_path):
    """A controller epoch measured on 1,000 archs in 0.071 s: 1000 epochs on pools 1000 + 1300 + 1600 take
    0.071 / 1000 x 1000 x 3900 = 276.9 s, whatever the shortened run's own (small-pool) cost per unit."""
    config = _write_run(tmp_path / "run")
    ext = measure.extrapolate_search(tmp_path / "run", config, controller_epoch=(1000, 0.071))
    controller = next(p for p in ext["phases"] if p["phase"] == "controller")
    assert controller["full_s"] == pytest.approx(276.9)
    assert controller["search_unit_s"] == pytest.approx(0.001) and "1,000 archs" in controller["source"]
    assert ext["total_s"] == pytest.approx(10649.0 - 3900.0 + 276.9)
    text = report.render_markdown({"device": "x"}, [PartResult("search", PASS, "", details={"extrapolation": ext})])
    assert "a controller epoch on 1,000 archs (bench-controller)" in text and "1.000 ms" in text


def test_search_extrapolation_scales_the_rerank_to_the_reference_split(tmp_path):
    """A re-rank on 9,000 training images: its epoch costs 45,000 / 9,000 = 5 times as much at the reference."""
    config = _write_run(tmp_path / "run")
    (tmp_path / "run" / "ranking.jsonl").write_text(
        json.dumps({"standalone_seconds": 20.0, "standalone_train_images": 9000}) + "\n")
    ext = measure.extrapolate_search(tmp_path / "run", config)
    rerank = next(p for p in ext["phases"] if p["phase"] == "rerank")
    assert rerank["unit_s"] == pytest.approx(100.0) and rerank["full_s"] == pytest.approx(5000.0)
    assert rerank["measured_s"] == pytest.approx(20.0)


def test_report_markdown_and_json(tmp_path):
    ext = measure.extrapolate_search(tmp_path / "run", _write_run(tmp_path / "run"))
    results = [
        PartResult("build", PASS, "built", seconds=80, limit_s=240),
        PartResult("bench-supernet", PASS, "3 figures", seconds=40, limit_s=120,
                   figures=[Figure("supernet training, batch 64", 3500.0, "img/s", 3000.0),
                            Figure("supernet training, batch 256", 9000.0, "img/s", 10000.0)]),
        PartResult("search", PASS, "4 rounds", details={"extrapolation": ext},
                   figures=[Figure("full search (extrapolated)", ext["total_s"], "s", 1800.0, better="lower")]),
        PartResult("sanitizer", CUT, "killed at its time limit", log="logs/sanitizer.log"),
        PartResult("dali", SKIP, "DALI's wheels were not brought along"),
    ]
    meta = {"device": "NVIDIA H100 80GB HBM3 (sm_90)", "driver": "580.159.04", "torch": "2.11.0+cu130",
            "python": "3.12.3", "commit": "abc", "date": "2026-11-26 10:00 UTC", "budget": "470 s", "smoke": False}
    text = report.write_report(tmp_path, meta, results)
    assert (tmp_path / "gpu-check.md").read_text() == text
    assert "| result | **INCOMPLETE** |" in text and "NVIDIA H100" in text and "580.159.04" in text
    assert "| supernet training, batch 64 | 3,500 img/s | >= 3,000 img/s | met |" in text
    assert "| supernet training, batch 256 | 9,000 img/s | >= 10,000 img/s | missed |" in text
    assert "<= 1,800 s" in text and "| **total** |" in text and "10,649 s (2 h 57 min)" in text
    assert "- sanitizer: CUT - killed at its time limit" in text and "- dali: skipped" in text
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["result"] == "INCOMPLETE" and [p["status"] for p in data["parts"]] == [
        "pass", "pass", "pass", "cut", "skip"]
    assert data["parts"][1]["figures"][1]["verdict"] == "missed"
    results.append(PartResult("ctest", FAIL, "1 failed", log="logs/ctest.log"))
    smoke = report.render_markdown(dict(meta, smoke=True), results)
    assert "CPU smoke run" in smoke and "| result | **FAIL** |" in smoke and "not comparable" in smoke
    assert "## Failures" in smoke and "logs/ctest.log" in smoke


def test_cli_smoke_run_writes_report(tmp_path):
    """The real entry point in smoke mode with one cheap part: report, JSON and log bundle appear."""
    out = tmp_path / "gc"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(out), "--smoke",
                           "--only", "bench-sampler", "--budget", "300"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((out / "gpu-check.json").read_text())
    parts = {p["name"]: p for p in data["parts"]}
    assert parts["bench-sampler"]["status"] == "pass" and parts["build"]["status"] == "skip"
    assert parts["bench-sampler"]["figures"][0]["unit"] == "draws/s"
    assert parts["bench-sampler"]["figures"][0]["value"] > 0
    assert (out / "gpu-check-logs.tar.gz").stat().st_size > 0 and "# bnao gpu-check" in done.stdout


def test_json_output_skips_what_surrounds_the_document(tmp_path):
    log = tmp_path / "p.log"
    log.write_text('$ python -m bnao profile --json\nbnao: warning: {not json} here\n{\n  "a": {"b": [1, 2]}\n}\n'
                   "[gpu-check] a note after it\n")
    from gpucheck.runner import CommandResult

    assert CommandResult(0, 1.0, log).json_output() == {"a": {"b": [1, 2]}}
    log.write_text("$ cmd\nTraceback (most recent call last):\n")
    assert CommandResult(1, 1.0, log).json_output() is None


def test_kernels_part_in_smoke_mode_reports_both_cell_paths(tmp_path):
    """The kernels part's driver on the CPU (ops instead of kernels): both tables reach the report."""
    from gpucheck import parts

    ctx = Context(tmp_path / "out", ROOT, sys.executable, gpu=False, smoke=True, deadline=time.monotonic() + 600)
    ctx.part_limit, ctx.part_started = 600.0, time.monotonic()
    result = parts.kernels(ctx)
    from bnao.supernet.fused_forward import fused_built

    if not fused_built("cpu"):
        assert result.status == FAIL and "fused" in result.summary
        return
    assert result.status == PASS, result.summary
    tables = result.details["top_kernels"]
    assert sorted(tables) == ["eager cells, pool evaluation, batch 20", "eager cells, training step, batch 4",
                              "fused cells, pool evaluation, batch 20", "fused cells, training step, batch 4"]
    assert all(t["rows"] for t in tables.values())
    fused_step = tables["fused cells, training step, batch 4"]
    assert any(row["name"] == "bnao::branch_round" for row in fused_step["rows"]) and fused_step["unit"] == "step"
    fused_eval = tables["fused cells, pool evaluation, batch 20"]
    calls = {row["name"]: row["calls"] for row in fused_eval["rows"]}
    assert fused_eval["unit"] == "arch" and calls.get("bnao::combine") == 5  # N=1: 5 cells, one combine each
    # The eager tables come from the eager cells: none of bnao's cell ops.
    for label in ("eager cells, training step, batch 4", "eager cells, pool evaluation, batch 20"):
        assert not any(row["name"].startswith("bnao::") for row in tables[label]["rows"])
    combine = result.details["combine"]
    assert [(row["channels"], row["side"]) for row in combine["rows"]] == [(20, 32), (80, 8)]
    assert all(row["combine_ms"] > 0 and row["convolution_ms"] > 0 for row in combine["rows"])
    text = report.render_markdown({"smoke": True}, [result])
    assert "## The combine op against cuDNN" in text and "| C=80, 8x8 |" in text
    assert "## Where the time goes, kernel by kernel" in text and "fused cells, training step, batch 4:" in text
    assert "| share | ms per arch | calls per arch | kernel |" in text


def test_the_sanitizer_workload_runs_on_the_cpu(capsys):
    """The workload gpu-check runs under compute-sanitizer is plain bnao code: on the CPU it must run
    through every stage, so that a GPU session does not spend its minutes on a broken script."""
    from gpucheck.onestep import run_one_step

    assert run_one_step("cpu") == 0
    out = capsys.readouterr().out
    for stage in ("sampler:", "loader:", "train (eager cells)", "evaluate (bf16)", "one step: ok"):
        assert stage in out, out
    from bnao import extension

    if extension.has_kernel("combine", "cpu"):
        assert "combine (torch.bfloat16): forward and backward" in out


def test_supernet_figures_name_the_cells_path_and_why_the_eager_cells_ran():
    """The report's supernet figures from a real (tiny, CPU) profile: the cells' path in the name, and the
    eager cells' reason (the profile's ``kernels_note``) in the note."""
    from bnao.supernet.profiling import profile_supernet

    result = profile_supernet(kernels="eager", layers=1, channels=4, batch_size=4, steps=1, warmup=0, pool_size=4,
                              device="cpu", count_ops=False, sequence_archs=0)
    training = measure.supernet_figures([result])[0]
    assert training.name == "supernet training, batch 4, eager cells"
    assert "; eager (kernels='eager')" in training.note


def test_pytest_part_reruns_without_the_test_that_crashed(tmp_path, monkeypatch):
    """A crash loses pytest's failure list: the part runs the suite again without the crashed test (its
    node prefix passed to --deselect) and reports both the counts of that run and the crash."""
    from gpucheck import parts
    from gpucheck.runner import CommandResult

    ctx = Context(tmp_path / "out", ROOT, sys.executable, gpu=True, smoke=False, deadline=time.monotonic() + 600)
    calls = []
    dump = ('Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n'
            '  File "/home/user/bnao/tests/test_fused_round.py", line 406 in test_overwrites\n')
    junit = ('<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok[cuda]"/>'
             '<testcase classname="tests.test_a" name="test_bad[cuda]"><failure message="x"/></testcase>'
             '</testsuite></testsuites>')

    def fake_command(argv, log_name, timeout=None, env=None):
        calls.append([a for a in argv if a.startswith("--deselect")])
        log = ctx.logs / log_name
        if len(calls) == 1:
            log.write_text("FF..." + dump)
        else:
            log.write_text("..F")
            (ctx.logs / "pytest-cuda.xml").write_text(junit)
        return CommandResult(-11 if len(calls) == 1 else 1, 1.0, log)

    monkeypatch.setattr(ctx, "command", fake_command)
    result = parts.pytest_cuda(ctx)
    assert calls == [[], ["--deselect=tests/test_fused_round.py::test_overwrites"]]
    assert result.status == FAIL and result.log == "logs/pytest-cuda-2.log"
    assert "1 passed, 1 failed" in result.summary and "tests.test_a::test_bad[cuda]" in result.summary
    assert "Segmentation fault in tests/test_fused_round.py::test_overwrites, line 406" in result.summary


def test_controller_part_in_smoke_mode_reports_both_variants(tmp_path):
    """The controller part's driver on the CPU: both controller.graph variants measured, each saying how its
    minibatches ran (uncaptured on a CPU, with the reason)."""
    from gpucheck import parts

    ctx = Context(tmp_path / "out", ROOT, sys.executable, gpu=False, smoke=True, deadline=time.monotonic() + 600)
    ctx.part_limit, ctx.part_started = 600.0, time.monotonic()
    result = parts.bench_controller(ctx)
    assert result.status == PASS, result.summary
    names = [figure.name for figure in result.figures]
    assert names == ["controller minibatch, graph=auto (uncaptured: CPU)",
                     "controller fit, 1,000 epochs on 40 archs, graph=auto (extrapolated)",
                     "controller minibatch, graph=off (uncaptured: graph='off')",
                     "controller fit, 1,000 epochs on 40 archs, graph=off (extrapolated)"]
    assert all(figure.value > 0 for figure in result.figures)

