"""Bytes on the wire per step equal what the wire format predicts, bucket by bucket.

Ring-algorithm counts per rank (n ranks): an allgather of m bytes sends (n-1)*m, an allreduce of
m bytes 2*(n-1)*m // n. Per bucket of d elements, b-byte values on the wire and s-byte state
(4, or 8 for float64 buckets), k = k_for(d):
  * Top-k: one packed message of k*(4+b) bytes, allgathered while n*k*(4+b) < 2*d*s; otherwise
    the dense fallback allreduces the scattered c in the state dtype (d*s bytes);
  * Rand-k: the k values, allreduced in the state dtype (k*s bytes), or allgathered as they are
    (k*b bytes) when narrower values make that cheaper;
  * the "full" init step allreduces the gradient in the state dtype; "zero" sends nothing;
  * "dense" allreduces the bucket in its own dtype, which is also the baseline (dense_bytes).
compression = dense_bytes / bytes_sent.
"""

import math

import pytest
import torch

from common import run_distributed
from ef21.reference import k_for
from hook_runs import Run, train

pytestmark = pytest.mark.distributed

WORLD = 3
STEPS = 4
CASES = {
    "ef21-topk": Run(state=dict(ratio=0.1)),
    "ef21-topk-fallback": Run(state=dict(ratio=0.5)),
    "ef21-topk-bf16-wire": Run(state=dict(ratio=0.1, value_dtype=torch.bfloat16)),
    "ef21-randk": Run(state=dict(compressor="randk", ratio=0.1)),
    "ef21-randk-bf16-wire": Run(state=dict(compressor="randk", ratio=0.1, value_dtype=torch.bfloat16)),
    "ef21-identity": Run(state=dict(compressor="identity")),
    "ef21-init-zero": Run(state=dict(ratio=0.1, init="zero")),
    "ef-topk-explicit-k": Run(state=dict(algorithm="ef", k=3)),
    "dense": Run(state=dict(algorithm="dense")),
    "ef21-topk-bf16-model": Run(state=dict(ratio=0.1), dtype=torch.bfloat16),
    "ef21-topk-fp64-model": Run(state=dict(ratio=0.1), dtype=torch.float64),
    "ef21-topk-big-bucket": Run(state=dict(ratio=0.01), bucket_cap_mb=25),
}


def allgather(n, m):
    return (n - 1) * m


def allreduce(n, m):
    return 2 * (n - 1) * m // n


def predicted(run: Run, sizes: list[int], first: bool, n: int) -> dict:
    """Bytes and paths of one step with buckets of ``sizes`` elements."""
    cfg = {"algorithm": "ef21", "compressor": "topk", "ratio": 0.01, "k": None, "init": "full",
           "value_dtype": None, **run.state}
    eb = torch.empty(0, dtype=run.dtype).element_size()
    sb = 8 if run.dtype == torch.float64 else 4
    vb = 2 if cfg["value_dtype"] in (torch.bfloat16, torch.float16) else 4
    out = {"bytes_sent": 0, "dense_bytes": 0, "sparse_buckets": 0, "dense_buckets": 0, "init_buckets": 0}
    for d in sizes:
        out["dense_bytes"] += allreduce(n, d * eb)
        if cfg["algorithm"] == "dense":
            out["bytes_sent"] += allreduce(n, d * eb)
            out["dense_buckets"] += 1
            continue
        if first and cfg["algorithm"] in ("ef21", "ef21-sgdm") and cfg["init"] != "compressed":
            out["bytes_sent"] += allreduce(n, d * sb) if cfg["init"] == "full" else 0
            out["init_buckets"] += 1
            continue
        k = d if cfg["compressor"] == "identity" else k_for(d, cfg["ratio"], cfg["k"])
        if cfg["compressor"] == "randk":
            reduce, gather = allreduce(n, k * sb), allgather(n, k * vb)
            out["bytes_sent"] += reduce if vb == sb or reduce <= gather else gather
            out["sparse_buckets"] += 1
        elif n * k * (4 + vb) < 2 * d * sb:
            out["bytes_sent"] += allgather(n, k * (4 + vb))
            out["sparse_buckets"] += 1
        else:
            out["bytes_sent"] += allreduce(n, d * sb)
            out["dense_buckets"] += 1
    return out


@pytest.fixture(scope="module")
def records():
    runs = [Run(**{**run.__dict__, "steps": STEPS, "keep_state": False}) for run in CASES.values()]
    out = run_distributed(train, WORLD, runs)
    return {name: [out[r][i] for r in range(WORLD)] for i, name in enumerate(CASES)}


@pytest.mark.parametrize("name", [n for n, run in CASES.items() if run.state.get("algorithm") != "dense"])
def test_bytes_per_step_match_the_wire_format(records, name):
    run = CASES[name]
    for rank in range(WORLD):
        rec = records[name][rank]
        numel = {n: p.numel() for n, p in rec["steps"][0]["params"].items()}
        before = dict.fromkeys(predicted(run, [], True, WORLD), 0)
        for t, step in enumerate(rec["steps"]):
            want = predicted(run, [sum(numel[n] for n in u) for u in step["units"]], t == 0, WORLD)
            got = {key: step["stats"][key] - before[key] for key in want}
            assert got == want, (name, rank, t)
            before = {key: step["stats"][key] for key in want}
            assert step["stats"]["steps"] == t + 1
        stats = rec["steps"][-1]["stats"]
        if stats["bytes_sent"]:
            assert math.isclose(stats["compression"], stats["dense_bytes"] / stats["bytes_sent"],
                                rel_tol=1e-12)


def test_dense_sends_what_ddp_sends(records):
    """"dense" keeps no per-parameter layout, so only totals: it sends exactly the baseline."""
    stats = records["dense"][0]["steps"][-1]["stats"]
    assert stats["bytes_sent"] == stats["dense_bytes"] > 0
    assert stats["compression"] == 1.0
    assert stats["dense_buckets"] == stats["hook_calls"] and stats["sparse_buckets"] == 0


def test_sparse_steps_compress(records):
    """Top-k at ratio 0.01 on one bucket: each sparse step sends ~(n-1)*8k bytes for a
    2*(n-1)/n*4d dense allreduce, a factor near d/(3k)."""
    rec = records["ef21-topk-big-bucket"][0]
    first, last = rec["steps"][0]["stats"], rec["steps"][-1]["stats"]
    d = sum(p.numel() for p in rec["steps"][0]["params"].values())
    k = k_for(d, 0.01)
    sent = last["bytes_sent"] - first["bytes_sent"]
    dense = last["dense_bytes"] - first["dense_bytes"]
    assert sent == (STEPS - 1) * allgather(WORLD, 8 * k)
    assert dense / sent == pytest.approx(allreduce(WORLD, 4 * d) / allgather(WORLD, 8 * k))
    assert dense / sent > 3
