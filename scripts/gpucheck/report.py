"""The gpu-check report: ``gpu-check.md`` for people, ``gpu-check.json`` for tools."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .runner import CUT, FAIL, SKIP, PartResult

STATUS_WORD = {"pass": "PASS", "fail": "FAIL", "skip": "skipped", "cut": "CUT"}


def _fmt(value: Optional[float], unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if unit == "s":
        if value < 60:
            return f"{value:,.1f} s"
        minutes, seconds = divmod(int(round(value)), 60)
        if minutes < 60:
            return f"{value:,.0f} s ({minutes} min {seconds:02d} s)"
        return f"{value:,.0f} s ({minutes // 60} h {minutes % 60:02d} min)"
    if abs(value) >= 1e7:
        return f"{value:.3g} {unit}".strip()
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:,.2f} {unit}".strip()


def _target(fig) -> str:
    if fig.target is None:
        return "-"
    return ("<= " if fig.better == "lower" else ">= ") + _fmt(fig.target, fig.unit)


def overall(results: Sequence[PartResult]) -> str:
    """``FAIL`` if a part failed, ``INCOMPLETE`` if one was cut, else ``PASS``."""
    statuses = {r.status for r in results}
    if FAIL in statuses:
        return "FAIL"
    if CUT in statuses:
        return "INCOMPLETE"
    return "PASS"


def render_markdown(meta: Dict[str, Any], results: Sequence[PartResult]) -> str:
    """The readable report: header, parts, figures against targets, search extrapolation, what was cut."""
    comparable = not meta.get("smoke")
    lines = ["# bnao gpu-check", ""]
    if meta.get("smoke"):
        lines += ["**CPU smoke run**: every part's driver ran on the CPU with tiny sizes to check the plumbing. "
                  "Its figures say nothing about a GPU and are not compared with the targets.", ""]
    lines += ["| | |", "|---|---|"]
    for key in ("device", "driver", "torch", "python", "commit", "date", "budget"):
        lines.append(f"| {key} | {meta.get(key, '-')} |")
    lines.append(f"| result | **{overall(results)}** |")
    lines += ["", "## Parts", "", "| part | status | seconds | limit | summary |", "|---|---|---:|---:|---|"]
    for r in results:
        summary = r.summary.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {STATUS_WORD[r.status]} | {r.seconds:.0f} | {r.limit_s:.0f} | {summary} |")
    figures = [(r.name, f) for r in results for f in r.figures]
    if figures:
        lines += ["", "## Figures", "", "| figure | value | target | verdict | note |", "|---|---:|---:|---|---|"]
        for _, f in figures:
            lines.append(f"| {f.name} | {_fmt(f.value, f.unit)} | {_target(f)} | {f.verdict(comparable)} | "
                         f"{f.note.replace('|', '/')} |")
    ext = next((r.details.get("extrapolation") for r in results if r.details.get("extrapolation")), None)
    if ext:
        lines += _search_lines(ext)
    tables = next((r.details.get("top_kernels") for r in results if r.details.get("top_kernels")), None)
    if tables:
        lines += _kernel_lines(tables)
    combine = next((r.details.get("combine") for r in results if r.details.get("combine")), None)
    if combine:
        lines += _combine_lines(combine)
    cut = [r for r in results if r.status in (CUT, SKIP)]
    if cut:
        lines += ["", "## Cut or skipped", ""]
        lines += [f"- {r.name}: {STATUS_WORD[r.status]} - {r.summary}" for r in cut]
    failed = [r for r in results if r.status == FAIL]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {r.name}: {r.summary} (log: {r.log or '-'})" for r in failed]
    lines += ["", "Logs: `logs/` beside this file and `gpu-check-logs.tar.gz`.", ""]
    return "\n".join(lines)


def _search_lines(ext: Dict[str, Any]) -> List[str]:
    lines = ["", "## Search at the reference settings (extrapolated)", "",
             f"Shortened run: {ext['rounds']} rounds, {ext['steps_per_round']} supernet steps each, settings "
             f"{ext['settings']}; measured {_fmt(ext['measured_s'], 's')}. Each phase's cost per unit (median over "
             "the rounds) times its count at the reference settings (pool 1000 + 3 x 300, 50 epochs x 703 steps "
             "per round, 4 rounds, controller 1000 epochs, top 5 re-ranked for 10 epochs):", "",
             "| phase | measured | unit | cost per unit | units at the reference settings | extrapolated |",
             "|---|---:|---|---:|---:|---:|"]
    for p in ext["phases"]:
        unit_cost = "-" if p["unit_s"] is None else f"{p['unit_s'] * 1e3:,.3f} ms"
        lines.append(f"| {p['phase']} | {_fmt(p['measured_s'], 's')} | {p['unit']} | {unit_cost} | "
                     f"{p['full_count']:,} | {_fmt(p['full_s'], 's')} |")
    lines.append(f"| **total** | | | | | **{_fmt(ext['total_s'], 's')}** |")
    for p in ext["phases"]:
        if p.get("source"):
            own = "-" if p.get("search_unit_s") is None else f"{p['search_unit_s'] * 1e3:,.3f} ms"
            lines += ["", f"The {p['phase']}'s cost per unit is {p['source']}; the shortened run's own small pools "
                          f"gave {own}, which its per-epoch overhead inflates."]
    return lines


def _combine_lines(combine: Dict[str, Any]) -> List[str]:
    """bnao::combine's forward + backward against the stack + ReLU + 1x1 convolution it replaced in training."""
    lines = ["", f"## The combine op against cuDNN (batch {combine['batch_size']}, 7 states, 4 loose; forward + "
             "backward)", "", "| shape | bnao::combine | stack + ReLU + 1x1 conv |", "|---|---:|---:|"]
    for row in combine["rows"]:
        lines.append(f"| C={row['channels']}, {row['side']}x{row['side']} | {row['combine_ms']:.3f} ms | "
                     f"{row['convolution_ms']:.3f} ms |")
    return lines


def _kernel_lines(tables: Dict[str, Any]) -> List[str]:
    """Per cell path and workload, the kernels that take most of the time (``bnao profile --top-kernels``)."""
    lines = ["", "## Where the time goes, kernel by kernel (uncaptured)"]
    for label, table in tables.items():
        unit = table["unit"]
        lines += ["", f"{label}: {table['total_ms']:.2f} ms of kernels per {unit}", "",
                  f"| share | ms per {unit} | calls per {unit} | kernel |", "|---:|---:|---:|---|"]
        for row in table["rows"]:
            name = row["name"].replace("|", "/")[:140]
            lines.append(f"| {row['share']:.1%} | {row['ms']:.3f} | {row['calls']:.1f} | `{name}` |")
    return lines


def to_json(meta: Dict[str, Any], results: Sequence[PartResult]) -> Dict[str, Any]:
    """Everything in the report as plain data (figures with their verdicts)."""
    comparable = not meta.get("smoke")
    parts = []
    for r in results:
        d = dataclasses.asdict(r)
        for fig, src in zip(d["figures"], r.figures):
            fig["verdict"] = src.verdict(comparable)
        parts.append(d)
    return {"meta": meta, "result": overall(results), "parts": parts}


def write_report(out: Path, meta: Dict[str, Any], results: Sequence[PartResult]) -> str:
    """Writes ``gpu-check.md`` and ``gpu-check.json`` into ``out`` and returns the Markdown."""
    text = render_markdown(meta, results)
    (out / "gpu-check.md").write_text(text)
    (out / "gpu-check.json").write_text(json.dumps(to_json(meta, results), indent=2, default=str))
    return text
