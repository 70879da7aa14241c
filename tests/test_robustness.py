"""Production hazards, each in real gloo processes (2 ranks, EF21 Top-k at ratio 0.1):

* uneven inputs under ``ddp_model.join()``: the rank that runs out of batches neither hangs nor
  corrupts its state; the run equals the reference in which a joined rank's gradient is zero;
* replica drift: ``check_every`` raises on every rank, naming the step and the rank that differs;
* bad input, never silent: sparse gradients, complex parameters and a process group other than
  the model's are refused by name (at registration, or at the first step through ``ef21.hook``),
  and so are ranks given different settings (at registration, naming each rank's value);
  registering after training started is handled: the first hooked step initialises EF21, as the
  reference does.

Parameters are compared with the reference to 1e-6 (as in test_hook_reference.py: sparse steps
agree bitwise, dense sums of two ranks are exact).
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ef21
from common import Refusals, run_distributed
from ef21.reference import Reference
from hook_runs import Run, batch, loss_fn, make_net, single_thread

pytestmark = pytest.mark.distributed

WORLD = 2
BUCKET_MB = 4e-4  # several parameters per bucket after the rebuild
EF21 = dict(algorithm="ef21", ratio=0.1)
BATCHES = {0: 12, 1: 7}  # uneven inputs: rank 1 joins after 7 steps
LATE = 3  # dense steps before the hook is registered
LATE_STEPS = 9


def model(state_kwargs=None, hook="cpp"):
    net = make_net(Run())
    ddp = DistributedDataParallel(net, bucket_cap_mb=BUCKET_MB)
    state = None
    if state_kwargs is not None:
        state = ef21.EF21State(**state_kwargs)
        if hook == "cpp":
            ef21.register(ddp, state)
        else:
            ddp.register_comm_hook(state, ef21.hook)
    return net, ddp, state, torch.optim.SGD(net.parameters(), lr=0.1)


def step(net, ddp, opt, rank, t):
    opt.zero_grad(set_to_none=True)
    x, y = batch(rank, t, 0, torch.float32)
    loss_fn(ddp(x), y).backward()
    opt.step()


def units_of(net, state):
    names = {id(p): n for n, p in net.named_parameters()}
    return [[names[id(p)] for p in b] for b in state.bucket_params()]


def final(net, state):
    names = {id(p): n for n, p in net.named_parameters()}
    core = state._core
    return {"params": {n: p.detach().clone() for n, p in net.named_parameters()},
            "state": {names[id(p)]: core.param_state(p) for p in core.params()},
            "steps": state.stats()["steps"]}


# ----------------------------------------------------------------------------------------------
# The workers: one set of processes runs every scenario.


def uneven(rank):
    net, ddp, state, opt = model(EF21)
    units = []
    with ddp.join():
        for t in range(BATCHES[rank]):
            step(net, ddp, opt, rank, t)
            units.append(units_of(net, state))
    return {**final(net, state), "units": units}


def drift(rank):
    net, ddp, state, opt = model(dict(EF21, check_every=4))
    out = {}
    for t in range(6):  # checked before step 4: all equal
        step(net, ddp, opt, rank, t)
    state.check_replicas()  # the same check, on demand
    if rank == 1:  # this rank's g drifts, through the public state API
        sd = state.state_dict()
        sd["params"][0]["g"] += 1e-3
        state.load_state_dict(sd)
    try:
        for t in range(6, 10):
            step(net, ddp, opt, rank, t)
    except RuntimeError as e:
        out["error"] = str(e)
    try:
        state.check_replicas()
    except RuntimeError as e:
        out["on_demand"] = str(e)
    return out


def refused(rank, world):
    errors = Refusals()
    attempt = errors.attempt

    class Sparse(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3, sparse=True)
            self.out = nn.Linear(3, 2)

        def forward(self, i):
            return self.out(self.emb(i))

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out((x.to(torch.complex64) @ self.w).abs())

    def backward_through_python_hook(module, x):
        torch.manual_seed(0)
        ddp = DistributedDataParallel(module)
        ddp.register_comm_hook(ef21.EF21State(**EF21), ef21.hook)
        ddp(x).sum().backward()

    torch.manual_seed(0)
    attempt("sparse", lambda: ef21.register(DistributedDataParallel(Sparse()), ef21.EF21State(**EF21)))
    attempt("sparse-hook", lambda: backward_through_python_hook(Sparse(), torch.tensor([1, 2, 3])))
    attempt("complex", lambda: ef21.register(DistributedDataParallel(Complex()), ef21.EF21State(**EF21)))
    attempt("complex-hook", lambda: backward_through_python_hook(Complex(), torch.randn(5, 4)))
    other = dist.new_group(list(range(world)))  # the same ranks, another group
    attempt("group", lambda: ef21.register(DistributedDataParallel(make_net(Run())),
                                           ef21.EF21State(process_group=other, **EF21)))
    attempt("skip-unused", lambda: ef21.register(
        DistributedDataParallel(make_net(Run()), find_unused_parameters=True,
                                skip_all_reduce_unused_params=True),
        ef21.EF21State(**EF21)))
    attempt("settings", lambda: ef21.register(DistributedDataParallel(make_net(Run())),
                                              ef21.EF21State(algorithm="ef21", ratio=0.1 if rank == 0 else 0.5)))
    attempt("seed", lambda: ef21.register(DistributedDataParallel(make_net(Run())),
                                          ef21.EF21State(compressor="randk", ratio=0.1, seed=rank)))
    return errors


def late(rank):
    net, ddp, _, opt = model()
    for t in range(LATE):  # plain DDP
        step(net, ddp, opt, rank, t)
    state = ef21.register(ddp, ef21.EF21State(**EF21))
    units = [None] * LATE
    for t in range(LATE, LATE_STEPS):
        step(net, ddp, opt, rank, t)
        units.append(units_of(net, state))
    return {**final(net, state), "units": units, "stats": state.stats()}


def scenarios(rank, world):
    return {"uneven": uneven(rank), "drift": drift(rank), "refused": refused(rank, world), "late": late(rank)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(scenarios, WORLD)


# ----------------------------------------------------------------------------------------------
# The reference: the same steps simulated with ef21.reference.Reference.


def simulate(steps, units, active, reference_for):
    """``units[t]``: compression units at step t; ``active(r, t)``: whether rank r has data (a
    joined rank's gradient is zero); ``reference_for(t)``: the Reference that runs step t."""
    with single_thread():
        net = make_net(Run())
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        params = dict(net.named_parameters())
        for t in range(steps):
            local = {n: [] for n in params}
            for r in range(WORLD):
                net.zero_grad(set_to_none=True)
                if active(r, t):
                    x, y = batch(r, t, 0, torch.float32)
                    loss_fn(net(x), y).backward()
                for n, p in params.items():
                    local[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            ref = reference_for(t)
            agg = ref.step(units[t] or [list(params)], local)
            for n, p in params.items():
                p.grad = agg[n]
            opt.step()
        return {n: p.detach().clone() for n, p in params.items()}, ref


def assert_run_matches(rec, params, ref, rank, what):
    for n, want in params.items():
        torch.testing.assert_close(rec["params"][n], want, atol=1e-6, rtol=0,
                                   msg=lambda m, n=n: f"{what} rank {rank} {n}: {m}")
    for n, entry in rec["state"].items():
        for key, name in (("state", "g_i"), ("g", "g")):
            want = ref.state[n][name]
            want = want if name == "g" else want[rank]
            torch.testing.assert_close(
                entry[key], want, atol=1e-6, rtol=0,
                msg=lambda m, n=n, name=name: f"{what} {name} of {n} on rank {rank}: {m}")


def test_uneven_inputs_join_matches_zero_gradient_reference(results):
    steps = max(BATCHES.values())
    ref = Reference(WORLD, **EF21)
    params, ref = simulate(steps, results[0]["uneven"]["units"], lambda r, t: t < BATCHES[r], lambda t: ref)
    for rank in range(WORLD):
        rec = results[rank]["uneven"]
        assert rec["steps"] == steps  # the joined rank kept stepping its state with zeros
        assert_run_matches(rec, params, ref, rank, "join")


def test_replica_drift_is_detected_naming_step_and_rank(results):
    for rank in range(WORLD):
        out = results[rank]["drift"]
        assert "replicas differ before step 8" in out["error"], out
        assert "rank(s) [1] differ from rank 0" in out["error"]
        assert "rank(s) [1] differ from rank 0" in out["on_demand"]


def test_bad_input_is_refused_by_name(results):
    for rank in range(WORLD):
        errors = results[rank]["refused"]
        assert "module 'emb' (Embedding(sparse=True)) produces sparse gradients" in errors["sparse"]
        assert "holds sparse gradients" in errors["sparse-hook"] and "sparse=False" in errors["sparse-hook"]
        assert "parameter 'w' is complex (torch.complex64)" in errors["complex"]
        assert "is complex (ComplexFloat)" in errors["complex-hook"]
        assert "state.process_group is not the process group of ddp_model" in errors["group"]
        assert "skip_all_reduce_unused_params" in errors["skip-unused"]
        # Without the check, these ranks would block in mismatched collectives until the timeout.
        assert "different EF21State settings (ratio: rank 0 0.1, rank 1 0.5)" in errors["settings"]
        assert "(seed: rank 0 0, rank 1 1)" in errors["seed"]


def test_registration_after_training_started_initialises_on_the_first_hooked_step(results):
    rec0 = results[0]["late"]
    assert rec0["stats"]["steps"] == LATE_STEPS - LATE and rec0["stats"]["init_buckets"] >= 1
    ef21_ref = Reference(WORLD, **EF21)
    dense = Reference(WORLD, algorithm="dense")
    params, ref = simulate(LATE_STEPS, rec0["units"], lambda r, t: True,
                           lambda t: dense if t < LATE else ef21_ref)
    for rank in range(WORLD):
        assert_run_matches(results[rank]["late"], params, ref, rank, "late registration")
