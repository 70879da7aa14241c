"""Mixed precision: EF21 under torch.amp with a GradScaler (CPU autocast with bf16, and a bf16 model).

2 ranks, EF21 Top-k at ratio 0.1 over multi-parameter buckets, 16 steps. At three steps one rank's
gradient is made non-finite: NaN everywhere (step 0, the dense initialisation; step 7), or inf in
the first layer's input, which leaves that layer's weight gradient NaN and every other bucket
finite (step 6). The scaler starts at 2^10 and doubles after 3 good steps, so the scale halves and
doubles along the way.

What must hold, on every rank:
* a step with a non-finite gradient on any rank, in any bucket, is skipped by every rank's scaler
  (the parameters do not move) and leaves the EF21 state exactly as it was;
* the run equals, to 1e-6, the same run without a scaler in which those steps never happened:
  the state is kept in scaled-gradient units and follows each change of scale (by powers of two,
  so the scaled run is the unscaled one times the scale, exactly);
* bf16 buckets keep float32 state.
"""

from dataclasses import dataclass

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import ef21
from common import run_distributed
from hook_runs import Run, batch, loss_fn, make_net

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 16
BUCKET_MB = 4e-4  # several parameters per bucket after the rebuild
NAN, INF = float("nan"), float("inf")
INJECT = {0: (1, NAN, "all"), 6: (0, INF, "first"), 7: (1, NAN, "all")}  # step: (rank, value, where)
EF21 = dict(algorithm="ef21", ratio=0.1)


@dataclass
class Case:
    state: dict
    dtype: torch.dtype = torch.float32  # the model's
    autocast: bool = True
    hook: str = "cpp"


CASES = {
    "autocast-bf16": Case(EF21),
    "bf16-model": Case(EF21, dtype=torch.bfloat16, autocast=False),
    "sgdm-python-hook": Case(dict(algorithm="ef21-sgdm", ratio=0.1, momentum=0.5), hook="python"),
}


def snapshot(state):
    core = state._core
    return {i: core.param_state(p) for i, p in enumerate(core.params())}


def same_state(a, b):
    return a.keys() == b.keys() and all(
        a[i]["initialized"] == b[i]["initialized"]
        and all(torch.equal(a[i][key], b[i][key]) for key in ("state", "aux", "g") if key in a[i])
        for i in a)


def train(rank, case, scaled):
    net = make_net(Run(dtype=case.dtype))
    ddp = DistributedDataParallel(net, bucket_cap_mb=BUCKET_MB)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3) if scaled else None
    state = ef21.EF21State(**case.state, grad_scaler=scaler)
    if case.hook == "cpp":
        ef21.register(ddp, state)
    else:
        ddp.register_comm_hook(state, ef21.hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = {"skipped_ok": [], "scales": []}
    for t in range(STEPS):
        if t in INJECT and not scaled:
            continue  # the reference: the step never happened
        x, y = batch(rank, t, 0, case.dtype)
        injected = t in INJECT
        if injected:
            who, value, where = INJECT[t]
            if who == rank:
                x = x.clone()
                if where == "all":
                    x.fill_(value)
                else:
                    x[0, 0] = value
            before = (snapshot(state) if t > 0 else None,
                      {n: p.detach().clone() for n, p in net.named_parameters()})
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.autocast):
            loss = loss_fn(ddp(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            out["scales"].append(scaler.get_scale())
        if injected:
            unmoved = all(torch.equal(p, before[1][n]) for n, p in net.named_parameters())
            untouched = before[0] is None or same_state(before[0], snapshot(state))
            out["skipped_ok"].append((t, unmoved, untouched))
    out["params"] = {n: p.detach().clone() for n, p in net.named_parameters()}
    out["state"] = snapshot(state)
    return out


def runs(rank, world):
    return {name: (train(rank, case, True), train(rank, case, False)) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(runs, WORLD)


@pytest.mark.parametrize("name", CASES)
def test_non_finite_step_is_skipped_everywhere_and_leaves_the_state(results, name):
    for rank in range(WORLD):
        scaled, _ = results[rank][name]
        assert [t for t, _, _ in scaled["skipped_ok"]] == sorted(INJECT)
        for t, unmoved, untouched in scaled["skipped_ok"]:
            assert unmoved, f"rank {rank} stepped at step {t}"
            assert untouched, f"rank {rank}: step {t} changed the EF21 state"


@pytest.mark.parametrize("name", CASES)
def test_scale_halves_and_doubles_and_the_run_equals_the_unscaled_one(results, name):
    scales = results[0][name][0]["scales"]
    assert scales == results[1][name][0]["scales"]
    assert min(scales) < 2.0 ** 10 and any(b == 2 * a for a, b in zip(scales, scales[1:]))
    for rank in range(WORLD):
        scaled, plain = results[rank][name]
        for n in plain["params"]:
            torch.testing.assert_close(scaled["params"][n], plain["params"][n], atol=1e-6, rtol=0,
                                       msg=lambda m, n=n: f"{name} rank {rank} {n}: {m}")
        # State comes back in unscaled units: the same as the unscaled run's.
        for i, entry in plain["state"].items():
            for key in ("state", "aux", "g"):
                if key in entry:
                    torch.testing.assert_close(scaled["state"][i][key], entry[key], atol=1e-6, rtol=0)


def test_bf16_buckets_keep_float32_state(results):
    for entry in results[0]["bf16-model"][0]["state"].values():
        assert entry["state"].dtype == torch.float32 and entry["g"].dtype == torch.float32
