"""Operation sets of the NAO cell space (SPEC section 2).

The index of an operation in its tuple is the integer stored in an arch.
Every module that maps an op index to a computation (the stand-alone network
builder, the closed-form size count, the supernet) reads these tuples, so an
op set is defined in exactly one place.
"""

from __future__ import annotations

from typing import Dict, Tuple

OP_SETS: Dict[str, Tuple[str, ...]] = {
    "small": ("sep_conv_3x3", "sep_conv_5x5", "avg_pool_3x3", "max_pool_3x3", "identity"),
    "middle": (
        "zero",
        "identity",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "sep_conv_7x7",
        "dil_sep_conv_3x3",
        "dil_sep_conv_5x5",
        "dil_sep_conv_7x7",
        "avg_pool_3x3",
        "max_pool_3x3",
    ),
}

# Op kinds with integer codes shared with the C++ size kernel (csrc/size/model_size.h).
KIND_ZERO, KIND_IDENTITY, KIND_SEP_CONV, KIND_DIL_SEP_CONV, KIND_AVG_POOL, KIND_MAX_POOL = range(6)


def op_kind(name: str) -> Tuple[int, int]:
    """Returns ``(kind, kernel_size)`` of an op name (kernel 0 when it has none)."""
    if name == "zero":
        return KIND_ZERO, 0
    if name == "identity":
        return KIND_IDENTITY, 0
    if name.startswith("sep_conv_"):
        return KIND_SEP_CONV, int(name[len("sep_conv_")])
    if name.startswith("dil_sep_conv_"):
        return KIND_DIL_SEP_CONV, int(name[len("dil_sep_conv_")])
    if name == "avg_pool_3x3":
        return KIND_AVG_POOL, 3
    if name == "max_pool_3x3":
        return KIND_MAX_POOL, 3
    raise ValueError(f"unknown operation {name!r}")


def op_table(op_set: str) -> Tuple[Tuple[int, int], ...]:
    """``(kind, kernel)`` per op index of ``op_set``."""
    if op_set not in OP_SETS:
        raise ValueError(f"unknown op set {op_set!r}; choose one of {sorted(OP_SETS)}")
    return tuple(op_kind(name) for name in OP_SETS[op_set])
