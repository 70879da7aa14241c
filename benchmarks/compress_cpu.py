"""ef21's CPU compress_ per algorithm, against topk_abs on a materialised array (its floor), and
the hook's finite check: isfinite(t).all() against one aminmax.

One thread, d = 4.35M float32 (the slow-link benchmark's MLP), k = 0.1% of d, random normal data;
medians of 20 calls after one warm-up.

    .venv/bin/python benchmarks/compress_cpu.py
"""

import argparse
import time

import torch

import ef21  # noqa: F401  (registers torch.ops.ef21)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[repeats // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--d", type=int, default=4_350_000, help="elements")
    p.add_argument("--ratio", type=float, default=0.001, help="k / d")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per row")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, k = args.d, max(1, int(args.ratio * args.d))
    grad, state, aux = torch.randn(d), 0.1 * torch.randn(d), torch.randn(d)
    compress = torch.ops.ef21.compress_

    print(f"d = {d}, k = {k}, 1 thread, median ms of {args.repeats}")
    print(f"{'topk_abs (materialised)':34s} {median_ms(lambda: torch.ops.ef21.topk_abs(grad, k), args.repeats):8.2f}")
    for algorithm in ("plain", "ef21", "ef21-sgdm", "ef"):
        for update in (True, False):
            st = state.clone() if algorithm != "plain" else None
            ax = aux.clone() if algorithm == "ef21-sgdm" else None
            ms = median_ms(lambda: compress(grad, st, ax, algorithm, k, 0.1, None, torch.float32, update),
                           args.repeats)
            print(f"{'compress_ ' + algorithm + (' update' if update else ' deferred'):34s} {ms:8.2f}")
    print(f"{'finite check: isfinite(t).all()':34s} {median_ms(lambda: torch.isfinite(grad).all(), args.repeats):8.2f}")
    print(f"{'finite check: aminmax(t)':34s} {median_ms(lambda: torch.aminmax(grad), args.repeats):8.2f}")


if __name__ == "__main__":
    main()
