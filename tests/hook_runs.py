"""Small DDP training runs through the hook, recorded step by step, and the same runs simulated
with :class:`ef21.reference.Reference` (the test oracle)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ef21
from ef21.reference import Reference

TINY_BUCKETS_MB = 1e-5  # about one parameter per bucket once DDP rebuilds its buckets


@dataclass
class Run:
    """One training run: the hook (``"cpp"`` = :func:`ef21.register`, ``"python"`` = the
    Python-callable :func:`ef21.hook`, ``"none"`` = ordinary DDP), its :class:`ef21.EF21State`
    arguments, and the model and DDP options."""

    hook: str = "cpp"
    state: dict = field(default_factory=dict)
    steps: int = 20
    lr: float = 0.1
    dtype: torch.dtype = torch.float32
    bucket_cap_mb: float = TINY_BUCKETS_MB
    find_unused: bool = False
    unused_layer: bool = False  # a layer the forward never uses
    frozen_layer: bool = False  # the first layer has requires_grad=False
    micro_batches: int = 1  # > 1: the first ones run under no_sync()
    keep_state: bool = True  # return the hook's per-parameter state at the end


class Net(nn.Module):
    def __init__(self, unused_layer=False, frozen_layer=False):
        super().__init__()
        self.l1 = nn.Linear(6, 12)
        self.l2 = nn.Linear(12, 10)
        self.l3 = nn.Linear(10, 3)
        if unused_layer:
            self.spare = nn.Linear(4, 5)
        if frozen_layer:
            self.l1.requires_grad_(False)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def make_net(run: Run) -> Net:
    torch.manual_seed(1234)
    return Net(run.unused_layer, run.frozen_layer).to(run.dtype)


def batch(rank: int, step: int, micro: int, dtype: torch.dtype):
    """Each rank's own data: the local gradients differ across ranks."""
    gen = torch.Generator().manual_seed(1_000_003 * step + 1009 * rank + micro)
    x = torch.randn(8, 6, generator=gen) + 0.5 * rank
    y = torch.randn(8, 3, generator=gen) + rank
    return x.to(dtype), y.to(dtype)


def loss_fn(out, y):
    return F.mse_loss(out.float(), y.float())


def train(rank: int, world_size: int, runs: list[Run]) -> list[dict]:
    """Worker for :func:`common.run_distributed`: trains each run and records every step."""
    return [_train(rank, run) for run in runs]


def _train(rank: int, run: Run) -> dict:
    net = make_net(run)
    ddp = DistributedDataParallel(net, bucket_cap_mb=run.bucket_cap_mb,
                                  find_unused_parameters=run.find_unused)
    state = None
    if run.hook == "cpp":
        state = ef21.register(ddp, ef21.EF21State(**run.state))
    elif run.hook == "python":
        state = ef21.EF21State(**run.state)
        ddp.register_comm_hook(state, ef21.hook)
    opt = torch.optim.SGD(net.parameters(), lr=run.lr)
    names = {p.data_ptr(): name for name, p in net.named_parameters()}

    steps = []
    for t in range(run.steps):
        opt.zero_grad(set_to_none=True)
        for m in range(run.micro_batches):
            sync = m == run.micro_batches - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                x, y = batch(rank, t, m, run.dtype)
                (loss_fn(ddp(x), y) / run.micro_batches).backward()
        grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
        opt.step()
        steps.append({
            "params": {n: p.detach().clone() for n, p in net.named_parameters()},
            "grads": grads,
            "units": None if state is None else [[names[p.data_ptr()] for p in b]
                                                 for b in state.bucket_params()],
            "stats": None if state is None else state.stats(),
        })
    out = {"steps": steps}
    if state is not None and run.keep_state:
        core = state._bind()  # the hook's own per-parameter view, whatever the checkpoint format
        out["state"] = {names[p.data_ptr()]: core.param_state(p) for p in core.params()}
    return out


@contextlib.contextmanager
def single_thread():
    """The workers run on one thread; the simulation does too, so the local gradients match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def simulate(run: Run, world_size: int, units_per_step: list | None = None) -> dict:
    """The same run on ``world_size`` simulated ranks through the reference.

    ``units_per_step[t]`` are the compression units (parameter names by bucket) the hook used at
    step ``t``; ``None`` (or an empty list) means one unit of every trainable parameter.
    Returns ``{"steps": [{"params", "grads"}], "reference": Reference}``.
    """
    with single_thread():
        net = make_net(run)
        kwargs = run.state if run.hook != "none" else {"algorithm": "dense"}
        ref = Reference(world_size, **kwargs)
        opt = torch.optim.SGD(net.parameters(), lr=run.lr)
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        params = dict(net.named_parameters())
        steps = []
        for t in range(run.steps):
            local = {n: [] for n in trainable}
            used = set()
            for r in range(world_size):
                net.zero_grad(set_to_none=True)
                for m in range(run.micro_batches):
                    x, y = batch(r, t, m, run.dtype)
                    (loss_fn(net(x), y) / run.micro_batches).backward()
                for n in trainable:
                    g = params[n].grad
                    if g is not None:
                        used.add(n)
                    # DDP hands the hook zeros for a parameter unused in this step.
                    local[n].append(g.detach().clone() if g is not None else torch.zeros_like(params[n]))
            units = (units_per_step[t] if units_per_step else None) or [trainable]
            agg = ref.step(units, local)
            for n, p in params.items():
                # DDP leaves .grad alone for parameters no rank used.
                p.grad = agg[n] if n in used else None
            opt.step()
            steps.append({"params": {n: p.detach().clone() for n, p in params.items()},
                          "grads": {n: params[n].grad.clone() for n in used}})
        return {"steps": steps, "reference": ref}


def units_of(record: dict) -> list:
    """The compression units the hook used at each step of a recorded run."""
    return [s["units"] for s in record["steps"]]


def assert_matches(record: dict, sim: dict, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """The recorded run's parameters equal the simulation's after every step."""
    for t, (got, want) in enumerate(zip(record["steps"], sim["steps"])):
        for n in want["params"]:
            torch.testing.assert_close(got["params"][n], want["params"][n], atol=atol, rtol=rtol,
                                       msg=lambda m, t=t, n=n: f"{what} step {t}, parameter {n}: {m}")


def assert_state_matches(record: dict, sim: dict, rank: int, atol: float, what: str = "") -> None:
    """The hook's per-parameter state on ``rank`` equals the reference's for that rank."""
    ref_state = sim["reference"].state
    algorithm = sim["reference"].config.algorithm
    names = {"ef21": ("g_i", "g"), "ef21-sgdm": ("g_i", "g", "v_i"), "ef": ("e_i",)}.get(algorithm, ())
    hook_name = {"g_i": "state", "e_i": "state", "v_i": "aux", "g": "g"}
    assert set(record["state"]) == set(ref_state), (what, sorted(record["state"]), sorted(ref_state))
    for n, entry in record["state"].items():
        assert entry["initialized"] == ref_state[n]["initialized"], (what, n)
        for name in names:
            want = ref_state[n][name]
            want = want if name == "g" else want[rank]
            torch.testing.assert_close(
                entry[hook_name[name]], want, atol=atol, rtol=0.0,
                msg=lambda m, n=n, name=name: f"{what} {name} of {n} on rank {rank}: {m}")
