"""CPU Top-k of |x|: ef21's select against torch.topk and std::nth_element.

For each size d and ratio k/d, on one float32 normal sample (fixed seed):

1. the three methods must select the same indices: nth_element exactly as ef21 (both keep the
   lower index among equal |x|), torch.topk up to which of the elements equal to the k-th largest
   it keeps (a normal float32 sample of 1e7 already holds a few equal pairs);
2. each is timed ``--repeats`` times, taking turns, and the median is reported with ef21's
   speed-up over each baseline. ``--timer cpu`` measures process CPU time instead of wall time,
   which is steadier on a machine that other work shares.

The methods:

- ``ef21``: ``torch.ops.ef21.topk_abs(x, k)`` (ascending int32 indices and their values);
- ``torch.topk``: ``torch.topk(x.abs(), k, sorted=False)`` (unsorted is the cheaper form, and ef21
  does not order by value either);
- ``nth_element``: ``benchmarks/nth_element_topk.cpp``, compiled here with the extension's ``-O3``:
  ``std::nth_element`` on a copy of |x|, then one pass to collect the indices (single-threaded).

Usage::

    python benchmarks/topk_cpu.py                 # d = 1e5..1e8, ratios 0.1%, 1%, 10%, one thread
    python benchmarks/topk_cpu.py --quick         # a smoke run on small sizes
    python benchmarks/topk_cpu.py --threads 2 --sizes 1e6,1e7 --ratios 0.01
"""

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils import cpp_extension

import ef21  # noqa: F401  (registers torch.ops.ef21)

HERE = os.path.dirname(os.path.abspath(__file__))
BIG = 50_000_000  # from this size on, repeats are capped to keep the run within minutes


def parse_list(text, cast):
    return [cast(float(s)) for s in text.split(",") if s.strip()]


def load_baseline(build_dir):
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(
        name="ef21_bench_nth_element",
        sources=[os.path.join(HERE, "nth_element_topk.cpp")],
        extra_cflags=["-O3"],
        build_directory=build_dir,
        verbose=False,
    )


def check_same_set(x, ref, got, name, exact_ties):
    """Raises unless ``got`` selects the same k indices as ``ref`` (ef21's).

    With ``exact_ties`` the sets must be equal (both keep the lower index among equal |x|);
    otherwise they may differ only among elements equal to the k-th largest |x|: a float32 normal
    sample of 1e7 already holds a few equal pairs, and torch.topk breaks ties its own way.
    """
    a, ref = x.abs(), torch.sort(ref.long()).values
    got = torch.sort(got.long()).values
    if torch.equal(got, ref):
        return
    if not exact_ties and got.numel() == ref.numel() and got.unique().numel() == got.numel():
        t = a[ref].min()
        if a[got].min() == t and torch.equal(got[a[got] > t], ref[a[ref] > t]):
            return
    raise SystemExit(f"{name} selected a different set than ef21 for d={x.numel()}, k={ref.numel()}")


def fmt_size(d):
    e = len(str(d)) - 1
    return f"1e{e}" if d == 10**e else f"{d:,}"


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_ms(methods, x, k, repeats, clock):
    """Median time of each method in ms. The methods take turns within each repeat, so a change
    in the machine's load during the run weighs on all of them alike."""
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = clock()
            fn(x, k)
            times[name].append(clock() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e5,1e6,1e7,1e8", help="comma-separated d (default: %(default)s)")
    p.add_argument("--ratios", default="0.001,0.01,0.1", help="comma-separated k/d (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per method (default: %(default)s)")
    p.add_argument("--timer", choices=TIMERS, default="wall",
                   help="wall: time.perf_counter; cpu: time.process_time, the CPU time of all the "
                        "process's threads, which leaves out time spent waiting for a core on a busy machine "
                        "(meaningful with --threads 1; default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats, for a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-dir", default=os.path.join("/tmp", "ef21_bench_build"),
                   help="where the nth_element baseline is compiled (default: %(default)s)")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeats = "1e4,1e5", 3
    sizes = parse_list(args.sizes, int)
    ratios = parse_list(args.ratios, float)

    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.build_dir)
    methods = {
        "ef21": lambda x, k: torch.ops.ef21.topk_abs(x, k),
        "torch.topk": lambda x, k: torch.topk(x.abs(), k, sorted=False),
        "nth_element": lambda x, k: baseline.topk_abs(x, k),
    }

    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores (load average {os.getloadavg()[0]:.1f}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (nth_element: 1); float32, "
          f"seed {args.seed}; {args.timer} time, median of {args.repeats} "
          f"(at most 3 for d >= {fmt_size(BIG)})\n")
    print("| d | k | ef21 ms | torch.topk ms | nth_element ms | vs torch.topk | vs nth_element |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for d in sizes:
        x = torch.randn(d, generator=torch.Generator().manual_seed(args.seed))  # same data whatever --sizes
        repeats = min(args.repeats, 3) if d >= BIG else args.repeats
        for ratio in ratios:
            k = max(1, min(d, round(d * ratio)))
            # Same set from all three before any timing (these calls also warm each one up).
            ref = methods["ef21"](x, k)[0]
            check_same_set(x, ref, methods["nth_element"](x, k), "nth_element", exact_ties=True)
            check_same_set(x, ref, methods["torch.topk"](x, k)[1], "torch.topk", exact_ties=False)
            ms = median_ms(methods, x, k, repeats, TIMERS[args.timer])
            cells = [fmt_size(d), f"{k:,}", *(f"{ms[name]:.3f}" for name in methods)]
            cells += [f"{ms[name] / ms['ef21']:.1f}×" for name in ("torch.topk", "nth_element")]
            print("| " + " | ".join(cells) + " |", flush=True)
        del x


if __name__ == "__main__":
    main()
