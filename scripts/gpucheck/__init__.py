"""gpu-check: one command that builds, tests and benchmarks bnao on a GPU within minutes.

Modules: :mod:`.runner` (parts under time limits), :mod:`.parts` (the list of
parts and their drivers), :mod:`.dali`, :mod:`.onestep` (the compute-sanitizer
workload), :mod:`.measure` (parsing results, the search extrapolation) and
:mod:`.report` (``gpu-check.md`` / ``gpu-check.json``). Entry point:
``scripts/gpu_check.py`` (``scripts/gpu-check.sh``, ``make gpu-check``).
"""
