"""Wall-clock time to a target test accuracy, per gradient-communication method, on one link.

Launched by ``benchmarks/slowlink/run.sh`` as one torchrun node per network namespace, the links
shaped with ``tc``; it also runs anywhere torchrun does (``--standalone``, no shaping) to try it::

    torchrun --standalone --nproc-per-node 4 benchmarks/slowlink/train.py --methods dense,ef21-top1

The workload: an MLP 64-2048-2048-10 (4.35M parameters, 17.4 MB of fp32 gradients) on
scikit-learn's bundled digits, 4 ranks each on its shard of the training set, batch 32 per rank.
One step's forward and backward cost a few tens of milliseconds on a core, while a dense ring
allreduce moves 2(n-1)/n * 17.4 MB = 26 MB per rank: 2.1 s at 100 Mbit/s. Communication
dominates dense training, which is the regime where gradient compression is meant to pay off.

Every method starts from the same weights and sees the same batches. After every
``--eval-every`` steps all ranks evaluate the test set (the replicas are identical) and the run
stops at ``--target`` accuracy, or after ``--max-steps`` steps or ``--max-seconds`` of training,
or when the loss is no longer finite (diverged).
The clock counts training steps only: evaluation is outside it. Per method it records

- the training time to the target and the accuracy curve against it;
- the median step time, split into compute (forward and backward measured under ``no_sync()``,
  plus the optimizer step) and the rest, communication (with any compression work);
- the bytes each rank put on the wire, read from the interface counters of ``/proc/net/dev``
  (TCP/IP headers included), and for ef21 methods the hook's own payload counter.

Methods (``--methods``, comma-separated):

- ``dense``: DDP's built-in allreduce (no hook);
- ``fp16``: PyTorch's ``fp16_compress_hook``;
- ``powersgd-rR``: PyTorch's ``powerSGD_hook`` with rank ``R``, its error feedback and warm start,
  PowerSGD from step 2 (the earliest it allows with error feedback; steps 0 and 1 are dense);
- ``{ef,ef21,ef21-sgdm}-{top,rand}P``: the ef21 hook with that algorithm, Top-k or Rand-k,
  ratio ``P`` percent per bucket (``ef21-top1`` = EF21 with Top-k 1%); EF21 starts with one
  dense step (``init="full"``).

``ef21-sgdm`` carries its own momentum (``eta = --momentum``), so it runs with plain SGD at
``lr / (1 - 0.9)``, the same effective step as heavy-ball momentum 0.9 at ``lr``.

Rank 0 writes ``--out/results-<label>.json``; ``report.py`` turns those into a table and a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ef21

EF21_METHOD = re.compile(r"^(ef|ef21|ef21-sgdm)-(top|rand)(\d+(?:\.\d+)?)$")
POWERSGD_METHOD = re.compile(r"^powersgd-r(\d+)$")
ALL_METHODS = ("dense,fp16,powersgd-r1,powersgd-r4,ef-top1,ef-top0.1,ef21-top1,ef21-top0.1,"
               "ef21-sgdm-top1,ef21-sgdm-top0.1,ef21-rand1")
HEAVY_BALL = 0.9
ONE_BUCKET_MB = 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=ALL_METHODS, help=f"comma-separated (default: {ALL_METHODS})")
    p.add_argument("--target", type=float, default=0.97, help="test accuracy to reach (default: 0.97)")
    p.add_argument("--max-steps", type=int, default=400, help="step limit per method (default: 400)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="training-time limit per method (default: 600)")
    p.add_argument("--eval-every", type=int, default=5, help="steps between evaluations (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size (default: 32)")
    p.add_argument("--hidden", type=int, default=2048, help="width of the two hidden layers (default: 2048)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default: 0.05)")
    p.add_argument("--momentum", type=float, default=0.1, help="eta of ef21-sgdm (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the batches")
    p.add_argument("--link", default="local", help="label of the link, for the results (default: local)")
    p.add_argument("--rate-mbit", type=float, default=0.0,
                   help="the shaped rate per link direction; > 0 runs the link check first (default: 0)")
    p.add_argument("--delay", default="0", help="the links' added delay, for the results (default: 0)")
    p.add_argument("--check-mb", type=float, default=8.0, help="size of the link check's allreduce (default: 8)")
    p.add_argument("--out", default="runs/slowlink", help="output directory (default: runs/slowlink)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ("dense", "fp16") and not EF21_METHOD.match(m)
           and not POWERSGD_METHOD.match(m)]
    if bad or not args.methods:
        p.error(f"--methods: unknown {bad}; allowed: dense, fp16, powersgd-rR, "
                "{ef,ef21,ef21-sgdm}-{top,rand}P (P in percent)")
    return args


def load_digits(seed: int):
    """Stratified train/test split of the digits (1347/450 images), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731  (pixels are 0..16)
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


class WireCounter:
    """Bytes this rank's network namespace has sent on the interface gloo uses.

    ``/proc/net/dev`` shows the reading process's network namespace, so inside a namespace of its
    own it counts exactly this rank's traffic. Without ``GLOO_SOCKET_IFNAME`` (a local run over
    loopback, shared by all ranks) there is nothing meaningful to read, and it reports None.
    """

    def __init__(self):
        self.iface = os.environ.get("GLOO_SOCKET_IFNAME")

    def read(self) -> int | None:
        if not self.iface:
            return None
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, fields = line.partition(":")
                if name.strip() == self.iface:
                    return int(fields.split()[8])  # 8 receive fields, then transmitted bytes
        raise RuntimeError(f"interface {self.iface!r} (GLOO_SOCKET_IFNAME) not in /proc/net/dev")


def link_check(rate_mbit: float, megabytes: float, wire: WireCounter, rank: int, world: int) -> dict:
    """Times a gloo allreduce: the effective rate per rank must not exceed the shaped rate.

    A ring allreduce of m bytes sends 2(n-1)/n * m per rank, each rank sending and receiving at
    once, so at a per-direction link rate R it cannot take less than 2(n-1)/n * m * 8 / R seconds.
    Finishing much faster means the shaping does not hold, and the run stops.
    """
    x = torch.ones(int(megabytes * 1e6 / 4))
    dist.all_reduce(x)  # connect every pair before timing
    best = float("inf")
    sent = 0
    for _ in range(3):
        dist.barrier()
        w0, t0 = wire.read(), time.perf_counter()
        dist.all_reduce(x)
        t = time.perf_counter() - t0
        w1 = wire.read()
        if t < best:
            best, sent = t, (w1 - w0 if w0 is not None else 0)
    ideal = 2 * (world - 1) / world * x.numel() * 4 * 8 / (rate_mbit * 1e6)
    t_all = torch.tensor([best])
    dist.all_reduce(t_all, op=dist.ReduceOp.MAX)
    best = float(t_all)
    effective = sent * 8 / best / 1e6 if sent else 2 * (world - 1) / world * x.numel() * 32 / best / 1e6
    result = {"megabytes": megabytes, "seconds": best, "ideal_seconds": ideal,
              "effective_mbit": effective, "rate_mbit": rate_mbit}
    if rank == 0:
        print(f"link check: allreduce of {megabytes:g} MB over {world} ranks took {best:.3f} s "
              f"(>= {ideal:.3f} s at {rate_mbit:g} Mbit/s), {effective:.1f} Mbit/s on the wire per rank",
              flush=True)
    if effective > 1.15 * rate_mbit:
        raise SystemExit(f"link check failed: {effective:.1f} Mbit/s per rank exceeds the shaped "
                         f"{rate_mbit:g} Mbit/s; the shaping does not hold")
    return result


def attach(method: str, model: DistributedDataParallel, args):
    """Registers the method's communication hook; returns (ef21 state or None, optimizer)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    state, lr, momentum = None, args.lr, HEAVY_BALL
    if method == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif m := POWERSGD_METHOD.match(method):
        ps = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=int(m.group(1)),
                                         start_powerSGD_iter=2, use_error_feedback=True, warm_start=True,
                                         random_seed=args.seed)
        model.register_comm_hook(ps, powerSGD_hook.powerSGD_hook)
    elif m := EF21_METHOD.match(method):
        algorithm, compressor, percent = m.group(1), m.group(2) + "k", float(m.group(3))
        state = ef21.register(model, ef21.EF21State(algorithm=algorithm, compressor=compressor,
                                                    ratio=percent / 100, momentum=args.momentum,
                                                    seed=args.seed))
        if algorithm == "ef21-sgdm":
            lr, momentum = args.lr / (1 - HEAVY_BALL), 0.0
    return state, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(method: str, args, data, wire: WireCounter, rank: int, world: int) -> dict:
    x_tr, y_tr, x_te, y_te = data
    shard = torch.arange(rank, len(x_tr), world)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for every method
    # One bucket for the whole model, for every method: PyTorch's PowerSGD hook waits on a collective
    # inside a future callback, and gloo runs callbacks on its two worker threads, so two buckets in
    # flight at once deadlock (each callback holds a thread the other's allreduce needs).
    model = DistributedDataParallel(make_model(args.hidden), bucket_cap_mb=ONE_BUCKET_MB)
    state, opt = attach(method, model, args)
    batches = torch.Generator().manual_seed(args.seed * 1000 + rank)  # the same batches for every method
    loss_fn = nn.CrossEntropyLoss()

    curve = [(0, 0.0, 0, accuracy(model.module, x_te, y_te))]  # (step, train seconds, wire bytes, acc)
    step_s, opt_s = [], []
    clock, sent, reached, step = 0.0, 0, None, 0
    dist.barrier()
    while True:
        idx = shard[torch.randint(len(shard), (args.batch_size,), generator=batches)]
        w0, t0 = wire.read(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x_tr[idx]), y_tr[idx])
        loss.backward()  # the hook's communication completes in here
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        w1 = wire.read()
        step += 1
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        clock += t2 - t0
        sent += 0 if w0 is None else w1 - w0
        if step % args.eval_every and step < args.max_steps:
            continue
        acc = accuracy(model.module, x_te, y_te)
        curve.append((step, clock, sent, acc))
        diverged = not math.isfinite(loss.item())
        # Rank 0 decides for all (the clocks differ per rank), so that every rank stops at the same step.
        flags = torch.tensor([float(acc >= args.target),
                              float(step >= args.max_steps or clock >= args.max_seconds or diverged)])
        dist.broadcast(flags, 0)
        if flags[0]:
            reached = {"step": step, "seconds": clock, "wire_bytes": sent}
            if rank == 0:
                print(f"  {method:<16} reached {100 * acc:.1f}% at step {step}, {clock:.1f} s", flush=True)
            break
        if flags[1]:
            break
    if reached is None and rank == 0:
        print(f"  {method:<16} did not reach {100 * args.target:.0f}% in {step} steps, {clock:.1f} s "
              f"(last {100 * curve[-1][3]:.1f}%{', diverged' if diverged else ''})", flush=True)

    # Compute alone: forward and backward with the gradient sync switched off, plus the optimizer.
    compute = []
    for _ in range(5):
        idx = shard[torch.randint(len(shard), (args.batch_size,), generator=batches)]
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        with model.no_sync():
            loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
        compute.append(time.perf_counter() - t0)
    compute_s = statistics.median(compute) + statistics.median(opt_s)
    step_med = statistics.median(step_s)

    ef_stats = state.stats() if state is not None else None
    # Averages over ranks of what each rank measured.
    per_rank = torch.tensor([sent, step_med, compute_s, ef_stats["hook_seconds"] / step if ef_stats else 0.0],
                            dtype=torch.float64)
    dist.all_reduce(per_rank)
    per_rank /= world
    return {
        "method": method, "steps": step, "seconds": clock, "reached": reached, "accuracy": curve[-1][3],
        "diverged": diverged,
        "step_seconds": float(per_rank[1]), "compute_seconds": float(per_rank[2]),
        "comm_seconds": float(per_rank[1] - per_rank[2]), "hook_seconds_per_step": float(per_rank[3]),
        "wire_bytes": float(per_rank[0]) if wire.iface else None,
        "payload_bytes": ef_stats["bytes_sent"] if ef_stats else None,
        "compression": ef_stats["compression"] if ef_stats else None,
        "curve": curve,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the ranks share a few cores; one thread each keeps compute comparable
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    wire = WireCounter()
    check = link_check(args.rate_mbit, args.check_mb, wire, rank, world) if args.rate_mbit > 0 else None
    data = load_digits(args.seed)
    params = sum(p.numel() for p in make_model(args.hidden).parameters())
    if rank == 0:
        print(f"{args.link}: MLP 64-{args.hidden}-{args.hidden}-10 ({params / 1e6:.2f}M parameters), "
              f"{world} ranks, target {100 * args.target:.0f}%", flush=True)
    results = [train(m, args, data, wire, rank, world) for m in args.methods]
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"results-{args.link}.json")
        with open(path, "w") as f:
            json.dump({"args": vars(args), "world_size": world, "parameters": params, "link_check": check,
                       "load_average": os.getloadavg(), "results": results}, f, indent=1)
        print(f"saved {path}", flush=True)
    dist.barrier()  # leave together: no rank closes its connections while rank 0 still writes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch's gloo teardown at interpreter exit sometimes aborts ("terminate called without an active
    # exception"; plain DDP without ef21 too, about 1 run in 20 here) once all work is done: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
