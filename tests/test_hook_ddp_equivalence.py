"""With nothing compressed (ratio 1 or compressor "identity") every algorithm is ordinary DDP.

EF21 then keeps g_i = grad_i and g = mean grad; EF keeps e = 0; Top-k of everything is the
identity. 2 ranks, tiny buckets, 20 steps, compared with DDP without a hook after every step.

Tolerance 1e-6: the hook forms the mean as g + (sum_j c_j)/n with c_j = grad_j - g_j (and
allreduces c, not the gradient), DDP as (sum_j grad_j)/n; the two differ by a few float32 ulps of
O(1) gradients (1.2e-7 each), which move parameters by lr times that per step.
"""

import pytest

from common import run_distributed
from hook_runs import Run, assert_matches, train

pytestmark = pytest.mark.distributed

WORLD = 2
ATOL = 1e-6
BASELINE = Run(hook="none")
CASES = {
    "ef21-identity": Run(state=dict(algorithm="ef21", compressor="identity")),
    "ef21-topk-ratio1": Run(state=dict(algorithm="ef21", compressor="topk", ratio=1.0)),
    "ef21-compressed-init-ratio1": Run(state=dict(algorithm="ef21", ratio=1.0, init="compressed")),
    "ef21-sgdm-momentum1-identity": Run(state=dict(algorithm="ef21-sgdm", compressor="identity",
                                                   momentum=1.0)),
    "ef-identity": Run(state=dict(algorithm="ef", compressor="identity")),
    "ef-topk-ratio1": Run(state=dict(algorithm="ef", ratio=1.0)),
    "plain-identity": Run(state=dict(algorithm="plain", compressor="identity")),
    "plain-randk-ratio1": Run(state=dict(algorithm="plain", compressor="randk", ratio=1.0)),
    "dense": Run(state=dict(algorithm="dense")),
    "python-hook-ef21-identity": Run(hook="python", state=dict(algorithm="ef21", compressor="identity")),
}


@pytest.fixture(scope="module")
def records():
    out = run_distributed(train, WORLD, [BASELINE, *CASES.values()])
    return {name: out[0][i + 1] for i, name in enumerate(CASES)} | {"baseline": out[0][0]}


@pytest.mark.parametrize("name", CASES)
def test_equals_ddp_without_hook(records, name):
    assert_matches(records[name], records["baseline"], atol=ATOL, what=name)
