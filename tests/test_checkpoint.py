"""Checkpoint and resume (DESIGN §6): per-rank EF21 state with the model and the optimizer.

2 ranks, EF21 Top-k at ratio 0.1 over multi-parameter buckets. A run trains 30 steps, saves
every rank's model, optimizer and EF21 state with torch.save, and its processes exit; fresh
processes load them and train 30 more. Their parameters must equal those of an uninterrupted
60-step run to 1e-6 (float32; the same operations on the same values, so in practice bitwise).

The resumed processes' DDP runs its first iteration with one big bucket, not the buckets the
uninterrupted run has by then; the state remembers its compression units (the buckets as last
rebuilt), so the resumed run selects over the same units. A checkpoint stripped of its units
must therefore not match (the test sees the difference it guards against).
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ef21
from common import Refusals, run_distributed
from hook_runs import Run, batch, loss_fn, make_net

pytestmark = pytest.mark.distributed

WORLD = 2
HALF = 30
BUCKET_MB = 4e-4  # ~420-byte buckets: several parameters per bucket after the rebuild
CONFIGS = {"ef21": dict(algorithm="ef21", ratio=0.1),
           "ef21-sgdm": dict(algorithm="ef21-sgdm", ratio=0.1, momentum=0.5)}


def build(cfg, rank):
    net = make_net(Run())
    ddp = DistributedDataParallel(net, bucket_cap_mb=BUCKET_MB)
    state = ef21.register(ddp, ef21.EF21State(**cfg))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return net, ddp, state, opt


def train(net, ddp, opt, rank, start, stop):
    for t in range(start, stop):
        opt.zero_grad(set_to_none=True)
        x, y = batch(rank, t, 0, torch.float32)
        loss_fn(ddp(x), y).backward()
        opt.step()


def params_of(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def uninterrupted(rank, world, cfg):
    net, ddp, state, opt = build(cfg, rank)
    train(net, ddp, opt, rank, 0, 2 * HALF)
    return params_of(net)


def first_half(rank, world, cfg, path):
    net, ddp, state, opt = build(cfg, rank)
    train(net, ddp, opt, rank, 0, HALF)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "ef21": state.state_dict()},
               f"{path}/rank{rank}.pt")


def second_half(rank, world, cfg, path, strip_units=False):
    net, ddp, state, opt = build(cfg, rank)
    ck = torch.load(f"{path}/rank{rank}.pt", weights_only=False)
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if strip_units:
        ck["ef21"]["units"] = []
    state.load_state_dict(ck["ef21"])
    train(net, ddp, opt, rank, HALF, 2 * HALF)
    return params_of(net)


def before(rank, world, path):
    """The first processes: every uninterrupted run, and every first half, saved."""
    out = {}
    for name, cfg in CONFIGS.items():
        out[name] = uninterrupted(rank, world, cfg)
        first_half(rank, world, cfg, f"{path}/{name}")
    out["dcp"] = through_dcp(rank, world, f"{path}/dcp")
    return out


def after(rank, world, path):
    """Fresh processes: everything that starts from the saved checkpoints."""
    out = {}
    for name, cfg in CONFIGS.items():
        out[name] = second_half(rank, world, cfg, f"{path}/{name}")
        out[name + "-stripped"] = second_half(rank, world, cfg, f"{path}/{name}", strip_units=True)
    out["refusals"] = refusals(rank, world, f"{path}/ef21")
    out["lost"] = resume_without_ef21_state(rank, world, f"{path}/ef21")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    for name in CONFIGS:
        (path / name).mkdir()
    # Two sets of processes: the first ones exit after saving, as if the job had been stopped.
    return run_distributed(before, WORLD, str(path)), run_distributed(after, WORLD, str(path))


@pytest.mark.parametrize("name", CONFIGS)
def test_resumed_run_matches_the_uninterrupted_one(runs, name):
    first, second = runs
    want = first[0][name]
    for rank in range(WORLD):
        for n in want:
            torch.testing.assert_close(second[rank][name][n], want[n], atol=1e-6, rtol=0,
                                       msg=lambda m, n=n, rank=rank: f"{name} rank {rank} {n}: {m}")
    stripped = second[0][name + "-stripped"]
    assert any((stripped[n] - want[n]).abs().max() > 1e-6 for n in want), \
        "without its compression units the resumed run should differ: the test would not see the problem"


# ----------------------------------------------------------------------------------------------
# What a checkpoint records, and what loading refuses.


def refusals(rank, world, path):
    ck = [torch.load(f"{path}/rank{r}.pt", weights_only=False)["ef21"] for r in range(world)]
    errors = Refusals()
    attempt = errors.attempt

    net, ddp, state, opt = build(CONFIGS["ef21"], rank)
    attempt("rank", lambda: state.load_state_dict(ck[1 - rank]))
    attempt("world_size", lambda: state.load_state_dict({**ck[rank], "world_size": 3}))
    _, _, other, _ = build(dict(CONFIGS["ef21"], algorithm="ef"), rank)
    attempt("algorithm", lambda: other.load_state_dict(ck[rank]))

    class Wider(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_net(Run())
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.body(x))

    wider = ef21.register(DistributedDataParallel(Wider()), ef21.EF21State(**CONFIGS["ef21"]))
    attempt("layout", lambda: wider.load_state_dict(ck[rank]))
    sd = ck[rank]
    return errors, {k: sd[k] for k in ("world_size", "rank", "steps", "units")}, sd["config"]["algorithm"]


def test_checkpoint_records_rank_layout_and_units(runs):
    names = {n for n, _ in make_net(Run()).named_parameters()}
    for rank in range(WORLD):
        errors, meta, algorithm = runs[1][rank]["refusals"]
        assert meta["world_size"] == WORLD and meta["rank"] == rank and meta["steps"] == HALF
        assert algorithm == "ef21"
        units = [names_ for _, names_ in meta["units"]]
        assert len(units) >= 2 and sorted(n for u in units for n in u) == sorted(names)
        assert f"rank={1 - rank}" in errors["rank"] and f"rank={rank}" in errors["rank"]
        assert "world_size=3" in errors["world_size"] and f"world_size={WORLD}" in errors["world_size"]
        assert "algorithm='ef21'" in errors["algorithm"] and "algorithm='ef'" in errors["algorithm"]
        assert "only in the checkpoint: ['l1.weight [12, 6]'" in errors["layout"]
        assert "only in the model: ['body.l1.weight [12, 6]'" in errors["layout"]


# ----------------------------------------------------------------------------------------------
# Lost per-rank state: one dense step re-initialises EF21.


def dense_init_step(net, ddp, opt, state, rank, t):
    """Runs step t and checks it was EF21's dense initialisation: g_i = the local gradient and
    .grad = g = the mean gradient of the ranks."""
    local = copy.deepcopy(net)
    x, y = batch(rank, t, 0, torch.float32)
    loss_fn(local(x), y).backward()
    before = state.stats()["init_buckets"]
    opt.zero_grad(set_to_none=True)
    loss_fn(ddp(x), y).backward()
    problems = []
    if state.stats()["init_buckets"] == before:
        problems.append(f"step {t} was not an initialisation step")
    for (n, p), q in zip(net.named_parameters(), local.parameters()):
        mean = q.grad.clone()
        dist.all_reduce(mean)
        mean.mul_(1.0 / dist.get_world_size())
        if not torch.allclose(p.grad, mean, atol=1e-7, rtol=0):
            problems.append(f"step {t}: .grad of {n} is not the mean gradient")
        if not torch.equal(state._core.param_state(p)["state"], q.grad.reshape(-1)):
            problems.append(f"step {t}: g_i of {n} is not the local gradient")
    opt.step()
    return problems


def resume_without_ef21_state(rank, world, path):
    net, ddp, state, opt = build(CONFIGS["ef21"], rank)
    ck = torch.load(f"{path}/rank{rank}.pt", weights_only=False)
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    problems = dense_init_step(net, ddp, opt, state, rank, HALF)  # nothing loaded: a fresh start
    train(net, ddp, opt, rank, HALF + 1, HALF + 5)
    state.reinitialize()  # the explicit way, e.g. after loading a model from elsewhere
    problems += dense_init_step(net, ddp, opt, state, rank, HALF + 5)
    train(net, ddp, opt, rank, HALF + 6, HALF + 8)
    return problems, state.stats()["sparse_buckets"]


def test_lost_state_reinitialises_with_one_dense_step(runs):
    for rank in range(WORLD):
        problems, sparse = runs[1][rank]["lost"]
        assert problems == []
        assert sparse > 0  # and EF21 went on as usual


# ----------------------------------------------------------------------------------------------
# torch.distributed.checkpoint: per-rank keys.


def through_dcp(rank, world, dcp_dir):
    net, ddp, state, opt = build(CONFIGS["ef21-sgdm"], rank)
    train(net, ddp, opt, rank, 0, 5)
    key = f"ef21_rank{rank}"  # DCP keeps one copy of equal keys: EF21 state differs per rank
    dcp.save({key: state.state_dict()}, checkpoint_id=dcp_dir)
    _, _, fresh, _ = build(CONFIGS["ef21-sgdm"], rank)
    template = {key: fresh.state_dict()}
    dcp.load(template, checkpoint_id=dcp_dir)
    fresh.load_state_dict(template[key])
    return state.state_dict(), fresh.state_dict()


def test_distributed_checkpoint_round_trip(runs):
    for rank in range(WORLD):
        saved, loaded = runs[0][rank]["dcp"]
        assert loaded["units"] == saved["units"] and loaded["steps"] == saved["steps"] == 5
        assert loaded["rank"] == rank
        for a, b in zip(saved["params"], loaded["params"]):
            assert a["name"] == b["name"] and a["initialized"] == b["initialized"]
            for key in ("state", "aux", "g"):
                assert torch.equal(a[key], b[key]), (rank, a["name"], key)
