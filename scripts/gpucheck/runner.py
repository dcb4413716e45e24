"""Runs the parts of gpu-check one after another, each under its own time limit.

A part is one entry of :data:`gpucheck.parts.PARTS`: a name, a time limit, the
shortest time worth starting it with, and a driver ``run(ctx) -> PartResult``.
The runner gives every part ``min(limit, time left of the whole budget)``; a
part that would start with less than its minimum is reported as cut without
being started, and a command that outlives its limit is killed with its whole
process group (so a hung GPU kernel or build cannot eat the other parts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

PASS, FAIL, SKIP, CUT = "pass", "fail", "skip", "cut"
# Seconds kept back from the budget for writing the report after the last part.
REPORT_RESERVE_S = 5.0


@dataclasses.dataclass
class Figure:
    """One measured number, optionally checked against a target.

    Attributes:
        name: What was measured (e.g. "supernet training, batch 64").
        value: The measurement (None when it could not be taken).
        unit: Unit of ``value`` (e.g. "img/s").
        target: Target value (None: reported without a verdict).
        better: ``"higher"`` (value >= target meets it) or ``"lower"``.
        note: Free text (how it was measured, what it excludes).
    """

    name: str
    value: Optional[float]
    unit: str
    target: Optional[float] = None
    better: str = "higher"
    note: str = ""

    def verdict(self, comparable: bool = True) -> str:
        """``met``, ``missed``, ``no target``, ``not measured`` or ``not comparable`` (CPU smoke runs)."""
        if self.value is None:
            return "not measured"
        if self.target is None:
            return "no target"
        if not comparable:
            return "not comparable"
        ok = self.value >= self.target if self.better == "higher" else self.value <= self.target
        return "met" if ok else "missed"


@dataclasses.dataclass
class PartResult:
    """What one part did.

    Attributes:
        name: Part name.
        status: ``pass``, ``fail``, ``skip`` or ``cut``.
        summary: One line for the report.
        seconds: Wall time spent.
        limit_s: The time limit it ran under.
        figures: Measurements it took.
        details: Anything else worth keeping in the JSON (counts, parsed output).
        log: Log file, relative to the output folder.
    """

    name: str
    status: str
    summary: str
    seconds: float = 0.0
    limit_s: float = 0.0
    figures: List[Figure] = dataclasses.field(default_factory=list)
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)
    log: str = ""


@dataclasses.dataclass
class Part:
    """One entry of the gpu-check list.

    Attributes:
        name: Short name (also the log file's name).
        title: What it checks, for the report.
        limit_s: Longest it may run.
        min_s: Not started with less time than this left.
        run: Driver, ``run(ctx) -> PartResult`` (status, summary, figures; the runner fills in times).
        ready: Optional quick check before the budget's: a result (a skip: nothing to run here) or None (run it),
            so that a part with nothing to run is reported skipped, not cut, when the budget has run out.
    """

    name: str
    title: str
    limit_s: float
    min_s: float
    run: Callable[["Context"], PartResult]
    ready: Optional[Callable[["Context"], Optional[PartResult]]] = None


@dataclasses.dataclass
class CommandResult:
    """Outcome of one command run under a time limit."""

    returncode: Optional[int]  # None when it was killed at its limit
    seconds: float
    log: Path

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, lines: int = 15) -> str:
        """Last lines of the log (for failure reports)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def json_output(self) -> Optional[Any]:
        """The JSON object the command printed (``--json``): parsed from the first line of its log that starts
        with ``{``, ignoring what comes after it; None when there is none."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return None
        start = next((i for i, line in enumerate(text.splitlines(keepends=True)) if line.startswith("{")), None)
        if start is None:
            return None
        body = "".join(text.splitlines(keepends=True)[start:])
        try:
            return json.JSONDecoder().raw_decode(body)[0]
        except ValueError:
            return None


class Context:
    """What the drivers share: folders, the interpreter, the mode and the clock.

    Args:
        out: Output folder (report, logs).
        repo: Repository root (commands run there).
        python: Interpreter that runs bnao.
        gpu: Whether a CUDA GPU is visible.
        smoke: CPU smoke mode: drivers run on the CPU with tiny settings (plumbing check only).
        deadline: ``time.monotonic()`` by which every part must be done.
    """

    def __init__(self, out: Path, repo: Path, python: str, gpu: bool, smoke: bool, deadline: float):
        self.out, self.repo, self.python = Path(out), Path(repo), python
        self.gpu, self.smoke, self.deadline = gpu, smoke, deadline
        self.logs = self.out / "logs"
        self.work = self.out / "work"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.background: Dict[str, subprocess.Popen] = {}
        self.part_limit = 0.0  # limit of the part now running (set by run_parts)
        self.part_started = 0.0
        self.info: Dict[str, Any] = {}
        # A smoke run's tiny sizes still take longer on a small shared CPU than the real ones on a GPU machine.
        self.limit_scale = 3.0 if smoke else 1.0

    @property
    def device(self) -> str:
        """Device the drivers measure on: ``cuda`` or, in smoke mode, ``cpu``."""
        return "cuda" if self.gpu and not self.smoke else "cpu"

    def time_left(self) -> float:
        """Seconds the running part still has (its own limit or the budget, whichever ends first)."""
        now = time.monotonic()
        return max(0.0, min(self.part_started + self.part_limit, self.deadline) - now)

    def command(self, argv: Sequence[str], log_name: str, timeout: Optional[float] = None,
                env: Optional[Dict[str, str]] = None, append: bool = False) -> CommandResult:
        """Runs ``argv`` in the repository, output to ``logs/<log_name>``, killed at ``timeout``.

        Args:
            argv: Command and arguments.
            log_name: Log file name under ``logs/``.
            timeout: Seconds (default: what the part has left).
            env: Extra environment variables.
            append: Append to the log instead of replacing it.
        """
        log = self.logs / log_name
        limit = self.time_left() if timeout is None else min(timeout, self.time_left())
        start = time.monotonic()
        with open(log, "ab" if append else "wb") as fh:
            fh.write(f"$ {' '.join(map(str, argv))}\n".encode())
            fh.flush()
            proc = subprocess.Popen([str(a) for a in argv], cwd=self.repo, stdout=fh, stderr=subprocess.STDOUT,
                                    env=dict(self.env, **(env or {})), start_new_session=True)
            code = wait_or_kill(proc, limit)
            if code is None:
                fh.write(f"\n[gpu-check] killed after {limit:.0f} s (time limit)\n".encode())
        return CommandResult(code, time.monotonic() - start, log)

    def start_background(self, key: str, argv: Sequence[str], log_name: str,
                         env: Optional[Dict[str, str]] = None) -> None:
        """Starts a command that a later part waits for (:meth:`wait_background`)."""
        fh = open(self.logs / log_name, "wb")
        fh.write(f"$ {' '.join(map(str, argv))}\n".encode())
        fh.flush()
        self.background[key] = subprocess.Popen([str(a) for a in argv], cwd=self.repo, stdout=fh,
                                                stderr=subprocess.STDOUT, env=dict(self.env, **(env or {})),
                                                start_new_session=True)
        fh.close()  # the child holds its own descriptor

    def wait_background(self, key: str) -> Optional[int]:
        """Return code of a background command (None: killed at the part's limit, or never started)."""
        proc = self.background.pop(key, None)
        if proc is None:
            return None
        return wait_or_kill(proc, self.time_left())

    def kill_background(self) -> None:
        """Ends every background command still running (at the end of the run)."""
        for proc in self.background.values():
            kill_group(proc)
        self.background.clear()


def kill_group(proc: subprocess.Popen) -> None:
    """Kills ``proc`` and everything it started (it leads its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """Waits up to ``timeout`` seconds; on expiry kills the process group and returns None."""
    try:
        return proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return None


def run_parts(ctx: Context, parts: Sequence[Part], only: Sequence[str] = (), skip: Sequence[str] = (),
              echo: Callable[[str], None] = print) -> List[PartResult]:
    """Runs the parts in order within the budget and returns one result per part.

    Args:
        ctx: Shared context (its deadline is the budget).
        parts: The parts, in order.
        only: Run only these (the others are reported as skipped).
        skip: Do not run these.
        echo: Progress lines.
    """
    results = []
    for part in parts:
        left = ctx.deadline - time.monotonic() - REPORT_RESERVE_S
        selected = not (only and part.name not in only) and part.name not in skip
        unready = part.ready(ctx) if selected and part.ready is not None else None
        if not selected:
            result = PartResult(part.name, SKIP, "not selected (--only/--skip)")
        elif unready is not None:
            result = unready
        elif left < part.min_s:
            result = PartResult(part.name, CUT, f"not started: {max(left, 0):.0f} s of the budget left, "
                                                f"it needs at least {part.min_s:.0f} s")
        else:
            ctx.part_limit = min(part.limit_s * ctx.limit_scale, left)
            ctx.part_started = time.monotonic()
            echo(f"[gpu-check] {part.name}: {part.title} (limit {ctx.part_limit:.0f} s)")
            try:
                result = part.run(ctx)
            except Exception as err:  # noqa: BLE001 - a broken driver is that part's failure, not the run's
                result = PartResult(part.name, FAIL, f"driver error: {type(err).__name__}: {err}")
            result.seconds = time.monotonic() - ctx.part_started
            result.limit_s = ctx.part_limit
        result.name = part.name
        echo(f"[gpu-check] {part.name}: {result.status} ({result.seconds:.0f} s) {result.summary}")
        results.append(result)
    ctx.kill_background()
    return results
