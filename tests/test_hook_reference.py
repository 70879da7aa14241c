"""The hook against the plain-PyTorch reference, step by step, through both registration paths:
``ef21.register`` (C++ hook on DDP's reducer) and ``ddp.register_comm_hook(state, ef21.hook)``.

3 ranks, ratio 0.1, tiny buckets (one bucket at iteration 0, about one per parameter after DDP's
rebuild), 20 SGD steps on heterogeneous data.

Tolerance 1e-6 on parameters and state: the hook and the reference do the same float32 operations
on a sparse step, but (1) the local gradients of DDP's module and of the simulation's copy can
differ in the last bit (vectorised reductions depend on buffer alignment) and (2) dense
collectives (the init step, the dense fallback) sum in gloo's ring order, not rank order. Each is
about one ulp of an O(1) gradient (1.2e-7); EF21 carries g across steps, so such a difference can
persist and move a parameter by lr * 1.2e-7 per step, at most ~3e-7 over 20 steps at lr 0.1.
A wrong selection or update differs by orders of magnitude more.
"""

import pytest
import torch

from common import run_distributed
from hook_runs import Run, assert_matches, assert_state_matches, simulate, train, units_of

pytestmark = pytest.mark.distributed

WORLD = 3
ATOL = 1e-6
HOOKS = ("cpp", "python")
CONFIGS = {
    "ef21-topk": dict(algorithm="ef21", compressor="topk"),
    "ef21-randk": dict(algorithm="ef21", compressor="randk"),
    "ef21-sgdm-topk": dict(algorithm="ef21-sgdm", compressor="topk", momentum=0.3),
    "ef21-sgdm-randk": dict(algorithm="ef21-sgdm", compressor="randk", momentum=0.3),
    "ef-topk": dict(algorithm="ef", compressor="topk"),
    "ef-randk": dict(algorithm="ef", compressor="randk"),
    "plain-topk": dict(algorithm="plain", compressor="topk"),
    "plain-randk": dict(algorithm="plain", compressor="randk"),
    "dense": dict(algorithm="dense"),
    # k/d = 0.5 > 1/n: every bucket takes the dense fallback (scatter c, allreduce).
    "ef21-topk-fallback": dict(algorithm="ef21", compressor="topk", ratio=0.5),
}
RUNS = [(hook, name, Run(hook=hook, state={"ratio": 0.1, **cfg}))
        for hook in HOOKS for name, cfg in CONFIGS.items()]


@pytest.fixture(scope="module")
def records():
    """records[rank][i] is rank's record of RUNS[i]; all runs share one group of processes."""
    return run_distributed(train, WORLD, [run for _, _, run in RUNS])


def _index(hook, name):
    return next(i for i, (h, n, _) in enumerate(RUNS) if h == hook and n == name)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("hook", HOOKS)
def test_matches_reference(records, hook, name):
    i = _index(hook, name)
    run = RUNS[i][2]
    rec = records[0][i]
    units = units_of(rec)
    if run.state["algorithm"] != "dense":
        # The setting under test: one bucket at iteration 0, several after the rebuild.
        assert len(units[0]) == 1 and all(len(u) >= 2 for u in units[1:]), units[:2]
    sim = simulate(run, WORLD, units)
    assert_matches(rec, sim, atol=ATOL, what=f"{hook} {name}")
    for rank in range(WORLD):
        assert_state_matches(records[rank][i], sim, rank, atol=ATOL, what=f"{hook} {name}")


@pytest.mark.parametrize("name", CONFIGS)
def test_registration_paths_agree(records, name):
    """Both paths run the same C++ core on the same inputs: bitwise the same parameters and stats."""
    a, b = _index("cpp", name), _index("python", name)
    for rank in range(WORLD):
        ra, rb = records[rank][a], records[rank][b]
        for t, (sa, sb) in enumerate(zip(ra["steps"], rb["steps"])):
            for n in sa["params"]:
                assert torch.equal(sa["params"][n], sb["params"][n]), (name, rank, t, n)
            assert sa["units"] == sb["units"]
            drop = {"hook_seconds"}
            assert {k: v for k, v in sa["stats"].items() if k not in drop} == \
                   {k: v for k, v in sb["stats"].items() if k not in drop}, (name, rank, t)


@pytest.mark.parametrize("hook", HOOKS)
def test_paths_taken(records, hook):
    """The configurations above really exercise the sparse, fallback and init paths."""
    stats = {name: records[0][_index(hook, name)]["steps"][-1]["stats"] for name in CONFIGS}
    for name, s in stats.items():
        assert s["steps"] == 20, (name, s)
    assert stats["ef21-topk"]["init_buckets"] == 1 and stats["ef21-topk"]["sparse_buckets"] > 0
    assert stats["ef21-randk"]["sparse_buckets"] > 0
    fallback = stats["ef21-topk-fallback"]
    assert fallback["sparse_buckets"] == 0 and fallback["dense_buckets"] > 0
    assert stats["ef-topk"]["init_buckets"] == 0
    assert stats["dense"]["dense_buckets"] == stats["dense"]["hook_calls"]
