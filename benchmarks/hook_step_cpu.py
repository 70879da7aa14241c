"""Where a hooked DDP step spends its CPU time: each ef21 operator and the rest of the hook.

One gloo rank (no peers, so no waiting on the network) trains an MLP of about 4.35M parameters as
one DDP bucket with the ef21 hook; torch.profiler attributes the hook's time to the ef21
operators (they go through the dispatcher) and to the aten operators the hook calls around them.
The baseline is the same step with DDP's own allreduce.

    .venv/bin/python benchmarks/hook_step_cpu.py --algorithm ef21-sgdm --ratio 0.001
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile

import ef21


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def step_times(model, steps: int) -> list[float]:
    x, y = torch.randn(32, 64), torch.randint(10, (32,))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algorithm", default="ef21-sgdm", help="EF21State algorithm of the hooked model")
    p.add_argument("--ratio", type=float, default=0.001, help="fraction of the bucket's elements sent")
    p.add_argument("--compressor", default="topk", help="EF21State compressor")
    p.add_argument("--hidden", type=int, default=2048, help="width of the MLP's two hidden layers")
    p.add_argument("--steps", type=int, default=30, help="timed and profiled steps per model")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29581")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)

    big = 1 << 30  # one bucket for the whole model, as in the slow-link benchmark
    dense = DistributedDataParallel(make_model(args.hidden), bucket_cap_mb=big)
    hooked = DistributedDataParallel(make_model(args.hidden), bucket_cap_mb=big)
    state = ef21.register(hooked, ef21.EF21State(algorithm=args.algorithm, ratio=args.ratio,
                                                          compressor=args.compressor))
    d = sum(q.numel() for q in hooked.parameters())

    hooked_name = f"ef21 hook ({args.algorithm}, {args.compressor} {args.ratio})"
    for name, model in (("dense allreduce", dense), (hooked_name, hooked)):
        step_times(model, 5)  # warm up; the hook's first step is its dense initialisation
        t = sorted(step_times(model, args.steps))
        print(f"{name:40s} median step {1e3 * t[len(t) // 2]:7.2f} ms  (d = {d / 1e6:.2f}M, {args.threads} thread)")

    state.reset_stats()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_times(hooked, args.steps)
    hook_ms = 1e3 * state.stats()["hook_seconds"] / args.steps
    print(f"\nthe hook's own time (compress, exchange set-up, aggregate, commit, result): {hook_ms:.2f} ms/step")
    print(f"per step, the hooked model ({args.steps} steps profiled; operators the hook runs in the"
          " collective's callback are not seen by the profiler):")
    rows = [e for e in prof.key_averages() if e.key.startswith("ef21::") or e.key.startswith("aten::")]
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    print(f"{'operator':32s} {'calls/step':>10s} {'self ms/step':>12s}")
    for e in rows[:15]:
        print(f"{e.key:32s} {e.count / args.steps:10.1f} {e.self_cpu_time_total / 1e3 / args.steps:12.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
