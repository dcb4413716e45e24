"""The fused mixed-cell path: the architecture as device data, one launch sequence for every arch.

Layout and semantics are defined in ``csrc/cell/DESIGN.md``; :mod:`.code` builds the per-cell
branch codes, :mod:`.reference` holds the pure-PyTorch reference of every fused op.
"""
