"""DDP features that change what the hook sees, each checked against the reference, parameters
and per-parameter state: rebuilt multi-parameter buckets, unused parameters, no_sync()
accumulation, frozen parameters, bf16 and float64 models.

3 ranks, EF21 with Top-k at ratio 0.1, 20 steps. Tolerances as in test_hook_reference.py (1e-6 for
float32) unless stated.
"""

import pytest
import torch

from common import run_distributed
from hook_runs import Run, assert_matches, assert_state_matches, simulate, train, units_of

pytestmark = pytest.mark.distributed

WORLD = 3
EF21 = dict(algorithm="ef21", ratio=0.1)
CASES = {
    # ~420-byte buckets: several parameters per bucket after the rebuild.
    "rebuilt-buckets": Run(state=EF21, bucket_cap_mb=4e-4),
    "unused-parameter": Run(state=EF21, find_unused=True, unused_layer=True),
    "no-sync": Run(state=EF21, micro_batches=2),
    "frozen-parameters": Run(state=EF21, frozen_layer=True),
    "bf16-model": Run(state=EF21, dtype=torch.bfloat16),
    "fp64-model": Run(state=EF21, dtype=torch.float64),
    "python-hook-no-sync": Run(hook="python", state=EF21, micro_batches=2),
}
# bf16 parameters (|p| < 1) have 8 significant bits: an ulp-level difference in the float32 g
# (dense sums in ring order) can flip the rounding of one bf16 update, 2^-8 at most per flip.
# float64 runs the same operations in float64: ulp-level differences of 1e-16 stay far below 1e-12.
ATOL = {"bf16-model": 2.0 ** -7, "fp64-model": 1e-12}


@pytest.fixture(scope="module")
def records():
    out = run_distributed(train, WORLD, list(CASES.values()))
    return {name: [out[r][i] for r in range(WORLD)] for i, name in enumerate(CASES)}


@pytest.fixture(scope="module")
def sims(records):
    return {name: simulate(run, WORLD, units_of(records[name][0])) for name, run in CASES.items()}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(records, sims, name):
    atol = ATOL.get(name, 1e-6)
    assert_matches(records[name][0], sims[name], atol=atol, what=name)
    for rank in range(WORLD):
        assert_state_matches(records[name][rank], sims[name], rank, atol=min(atol, 1e-6), what=name)


def test_buckets_rebuilt_with_several_parameters(records):
    units = units_of(records["rebuilt-buckets"][0])
    names = sorted(n for u in units[0] for n in u)
    assert len(units[0]) == 1, "iteration 0 runs with one bucket"
    for later in units[1:]:
        assert len(later) >= 2 and any(len(u) >= 2 for u in later), later
        assert sorted(n for u in later for n in u) == names  # every parameter in exactly one bucket


def test_unused_parameter_untouched(records):
    rec = records["unused-parameter"][0]
    first = rec["steps"][0]["params"]
    for step in rec["steps"]:
        assert "spare.weight" not in step["grads"] and "spare.bias" not in step["grads"]
        assert torch.equal(step["params"]["spare.weight"], first["spare.weight"])
    assert any("spare.weight" in u for u in rec["steps"][-1]["units"])  # it does travel, as zeros


@pytest.mark.parametrize("name", ["no-sync", "python-hook-no-sync"])
def test_no_sync_calls_hook_once_per_synced_step(records, name):
    rec = records[name][0]
    stats = rec["steps"][-1]["stats"]
    assert stats["steps"] == len(rec["steps"])
    assert stats["hook_calls"] == sum(len(s["units"]) for s in rec["steps"])


def test_frozen_parameters_not_in_buckets(records):
    rec = records["frozen-parameters"][0]
    for step in rec["steps"]:
        assert not any(n.startswith("l1.") for u in step["units"] for n in u)
        assert torch.equal(step["params"]["l1.weight"], rec["steps"][0]["params"]["l1.weight"])
    assert not any(n.startswith("l1.") for n in rec["state"])


@pytest.mark.parametrize("name, dtype", [("bf16-model", torch.float32), ("fp64-model", torch.float64),
                                         ("no-sync", torch.float32)])
def test_state_dtype(records, name, dtype):
    rec = records[name][0]
    for n, entry in rec["state"].items():
        assert entry["state"].dtype == dtype and entry["g"].dtype == dtype, (name, n)
    param_dtype = next(iter(rec["steps"][-1]["params"].values())).dtype
    assert next(iter(rec["steps"][-1]["grads"].values())).dtype == param_dtype
