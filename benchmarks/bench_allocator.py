"""imaml_ext's meta-gradients under the exact-fit CPU allocator and under PyTorch's.

One process, the malloc settings of ``imaml_ext.cpu_malloc`` applied, the
allocator switched (``cpu_malloc.exact_fit_allocator``) before every
meta-batch, the two settings alternated round by round (their order swapped
every other round); prints the median seconds of each after a warm-up round
and PyTorch's / exact-fit.  The problems are ``compare_peers.py``'s (real
Omniglot, 5-way 1-shot, 15 queries per class).

    python benchmarks/bench_allocator.py --models omniglot conv4 --threads 2 --rounds 7
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_peers as cp  # noqa: E402



def main(argv=None) -> int:
    ap = cp.ab_parser(__doc__, ["omniglot"], rounds=7)
    args = ap.parse_args(argv)
    import torch
    from imaml_ext import cpu_malloc
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (cpu_malloc.reuse_freed_memory() and cpu_malloc.exact_fit_allocator()):
        print("the exact-fit allocator is not available here (not glibc, IMAML_EXT_SYSTEM_MALLOC "
              "set, or no compiled CPU ops)", file=sys.stderr)
        return 1
    problem = cp.parse(["--models", *args.models, "--tasks", str(args.tasks)])
    print(f"{cp.machine(problem)}; T = {args.tasks}; medians of {args.rounds} rounds after a warm-up")
    cp.ab_table(cpu_malloc.exact_fit_allocator, problem, args, "exact-fit", "PyTorch's")
    cpu_malloc.exact_fit_allocator(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
