"""CPU time of one node's two branch rounds, forward + backward: compiled op vs reference (issue 8).

One node of a normal cell reads the two cell inputs (N=64, C=20, 32x32, float32); round 1, then
round 2 normalised with round 1's statistics, then the backward of a random linear loss of both
rounds' outputs. Prints one line per arch; records nothing.

Usage: python benchmarks/bench_fused_round.py [--batch 64] [--channels 20] [--size 32] [--repeats 5] [--threads 0]
"""

from __future__ import annotations

import argparse

import torch

from _common import cpu_model, timed  # noqa: E402  (benchmarks/ is the script folder)
from bnao.ops.fused.code import cell_code
from bnao.ops.fused.reference import branch_round_reference
from bnao.ops.fused.round import branch_round, has_compiled_branch_round
from bnao.space.ops import op_table

# Node 0 of a "small" normal cell: (input 0, sep conv 3x3, input 1, sep conv 5x5), the heaviest
# pair, and (input 0, max pool, input 1, identity), the lightest.
ARCHS = {
    "sep3+sep5": [0, 0, 1, 1, 2, 2, 0, 3, 1, 4, 2, 0],
    "max+identity": [0, 3, 1, 4, 2, 2, 0, 3, 1, 4, 2, 0],
}


def node_step(round_fn, sources, code, params) -> None:
    """Round 1, round 2 (BN1 prologue with round 1's statistics), backward of a linear loss."""
    dw1, pw1, dw2, pw2, gamma, beta, upstream = params
    pre1, mean1, invstd1 = round_fn(sources, code, 1, dw1, pw1, None)
    pre2, mean2, invstd2 = round_fn([pre1], code, 2, dw2, pw2, (mean1, invstd1, gamma, beta))
    loss = (pre2 * upstream).sum() + mean2.sum() + invstd2.sum()
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not has_compiled_branch_round("cpu"):
        raise SystemExit("bnao._C has no CPU branch_round kernel: build it first (setup.py build_ext --inplace)")
    gen = torch.Generator().manual_seed(0)
    n, c, s = args.batch, args.channels, args.size

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(True)

    sources = [leaf(n, c, s, s), leaf(n, c, s, s)]
    params = (leaf(2, c, 7, 7, scale=0.3), leaf(2, c, c, scale=0.3), leaf(2, c, 7, 7, scale=0.3),
              leaf(2, c, c, scale=0.3), leaf(2, c), leaf(2, c), torch.randn(2, n, c, s, s, generator=gen))

    def reference(src, code, round_index, dw, pw, norm):
        return branch_round_reference(src, code, round_index, dw, pw, norm)

    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, "
          f"N={n} C={c} {s}x{s}, one node: rounds 1+2 forward + backward, median of {args.repeats}")
    for name, arch in ARCHS.items():
        code = cell_code(arch, False, op_table("small"))[0]
        fused = timed(lambda: node_step(branch_round, sources, code, params), args.repeats)
        ref = timed(lambda: node_step(reference, sources, code, params), args.repeats)
        print(f"{name:>14}: compiled {fused * 1e3:8.1f} ms   reference {ref * 1e3:8.1f} ms   "
              f"ratio {ref / fused:5.2f}x")


if __name__ == "__main__":
    main()
