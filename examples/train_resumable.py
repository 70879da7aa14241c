"""EF21 training that survives a crashed rank: checkpoints every N steps, resumes from the last one.

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 examples/train_resumable.py --ckpt-dir runs/ckpt

An MLP (64-64-10) on scikit-learn's bundled digits, DistributedDataParallel on CPU/gloo (NCCL when
CUDA is available), EF21 Top-k. Every ``--checkpoint-every`` steps each rank saves its own model,
optimizer and EF21 state (EF21's ``g_i`` differs per rank); a checkpoint counts once every rank
has written its file, when rank 0 records its step in ``<ckpt-dir>/latest``. When a rank dies,
torchrun stops the others and (within ``--max-restarts``) starts them all again: they load the
latest complete checkpoint and go on. Batches are a function of (rank, step) and the EF21 state
comes back with its compression units, so the result is the one an uninterrupted run gives.

``--crash-at STEP`` makes rank ``--crash-rank`` exit at that step, once (a marker file in the
checkpoint directory remembers that it did), to try it. ``--timeout`` bounds every collective, so
no rank waits longer than that on a peer that is gone. Rank 0 saves the final parameters to
``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ef21


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: 50)")
    p.add_argument("--ckpt-dir", default="runs/ckpt", help="checkpoint directory (default: runs/ckpt)")
    p.add_argument("--out", default=None, help="where rank 0 saves the final parameters (default: none)")
    p.add_argument("--ratio", type=float, default=0.05, help="Top-k ratio per bucket (default: 0.05)")
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size (default: 32)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default: 0.05)")
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout in seconds (default: 60)")
    p.add_argument("--crash-at", type=int, default=None, help="exit at this step, once (to try a restart)")
    p.add_argument("--crash-rank", type=int, default=1, help="the rank that exits (default: 1)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.checkpoint_every < 1 or args.batch_size < 1:
        p.error("--steps, --checkpoint-every and --batch-size must be >= 1")
    return args


def load_digits():
    """Every fourth image is held out for testing; pixels (0..16) scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    x, y = sk_load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    test = torch.arange(len(y)) % 4 == 0
    return x[~test], y[~test], x[test], y[test]


def batch(x, y, rank: int, world: int, step: int, size: int):
    """Rank ``rank``'s batch at ``step``: drawn from its shard by a generator seeded with both, so a
    restarted run sees exactly the batches the lost one would have."""
    shard = torch.arange(rank, len(y), world)
    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    pick = shard[torch.randint(len(shard), (size,), generator=gen)]
    return x[pick], y[pick]


def latest_step(ckpt_dir: str) -> int:
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            return int(f.read())
    except FileNotFoundError:
        return 0


def save(ckpt_dir: str, step: int, rank: int, model, opt, state) -> None:
    """This rank's checkpoint of ``step``; rank 0 marks the step complete once every rank wrote."""
    folder = os.path.join(ckpt_dir, f"step-{step:07d}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{rank}.pt")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "ef21": state.state_dict()}, path + ".tmp")
    os.replace(path + ".tmp", path)  # a file is whole or absent
    dist.barrier()
    if rank == 0:
        with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
            f.write(str(step))
        os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))


def init_process_group(backend: str, timeout: timedelta) -> None:
    """``init_process_group`` on a store private to this launch attempt. torchrun keeps its store
    across restarts (pytorch/pytorch#135712), so without a prefix a restarted rank can read the
    address its predecessor published and fail to connect."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}/", store), rank=rank,
                            world_size=world, timeout=timeout)


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    init_process_group("nccl" if cuda else "gloo", timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.makedirs(args.ckpt_dir, exist_ok=True)

    x_tr, y_tr, x_te, y_te = load_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None, bucket_cap_mb=0.01)
    state = ef21.register(ddp, ef21.EF21State(ratio=args.ratio))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    start = latest_step(args.ckpt_dir)
    if start > 0:  # every rank loads its own file of the same step
        path = os.path.join(args.ckpt_dir, f"step-{start:07d}", f"rank{rank}.pt")
        ck = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state.load_state_dict(ck["ef21"])
        if rank == 0:
            print(f"resumed from step {start}", flush=True)

    marker = os.path.join(args.ckpt_dir, "crashed")
    for step in range(start, args.steps):
        xb, yb = batch(x_tr, y_tr, rank, world, step, args.batch_size)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(xb.to(device)), yb.to(device))
        if step == args.crash_at and rank == args.crash_rank and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # dies mid-step: the other ranks are left waiting in this step's collectives
        loss.backward()
        opt.step()
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save(args.ckpt_dir, step + 1, rank, model, opt, state)

    if rank == 0:
        with torch.no_grad():
            acc = (model(x_te.to(device)).argmax(1).cpu() == y_te).float().mean().item()
        stats = state.stats()
        print(f"step {args.steps}: test accuracy {100 * acc:.2f}%, compression {stats['compression']:.1f}x "
              f"(since the last start)", flush=True)
        if args.out:
            torch.save({n: p.detach().cpu() for n, p in model.named_parameters()}, args.out)
    dist.barrier()  # leave together: no rank closes its connections while rank 0 still writes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch's gloo teardown at interpreter exit sometimes aborts ("terminate called without an active
    # exception"; plain DDP without ef21 too, about 1 run in 20 here) once all work is done: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
