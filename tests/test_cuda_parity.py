"""CUDA kernels equal the CPU kernels exactly: same indices, same values, same state.

Both backends compute p, round it to the wire dtype and update the state with the same float
operations (no FMA on either side), so equality is bitwise, not approximate. Runs wherever a GPU
exists; skipped elsewhere (the ``gpu`` marker, see conftest.py).
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

SIZES = [1, 2, 7, 1000, 65_537, 1_000_003]
ALGORITHMS = ["ef21", "ef21-sgdm", "ef", "plain"]


def _data(d, kind, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(d, generator=g, dtype=torch.float64)
    elif kind == "ties":  # few distinct magnitudes: ties decided by index
        x = torch.randint(-3, 4, (d,), generator=g).double()
    else:  # all equal
        x = torch.full((d,), -0.5, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 1.0])
@pytest.mark.parametrize("kind", ["normal", "ties", "equal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_topk_abs_matches_cpu(d, ratio, kind, dtype):
    import ef21

    x = _data(d, kind, dtype)
    k = ef21.k_for(d, ratio)
    i_cpu, v_cpu = torch.ops.ef21.topk_abs(x, k)
    i_gpu, v_gpu = torch.ops.ef21.topk_abs(x.cuda(), k)
    assert torch.equal(i_gpu.cpu(), i_cpu)
    assert torch.equal(v_gpu.cpu(), v_cpu)


def test_topk_abs_non_contiguous_and_side_stream():
    x = _data(200_001, "ties", torch.float32)
    view = x.cuda()[::2]
    expected = torch.ops.ef21.topk_abs(x[::2].contiguous(), 1000)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = torch.ops.ef21.topk_abs(view, 1000)
    stream.synchronize()
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("d", [1, 999, 300_017])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("randk", [False, True])
def test_compress_matches_cpu(algorithm, d, grad_dtype, value_dtype, randk):
    import ef21

    sdt = torch.float64 if grad_dtype == torch.float64 else torch.float32
    k = ef21.k_for(d, 0.01)
    grad = _data(d, "normal", grad_dtype, seed=1)
    state = None if algorithm == "plain" else _data(d, "normal", sdt, seed=2)
    aux = _data(d, "normal", sdt, seed=3) if algorithm == "ef21-sgdm" else None
    idx = ef21._C.randk_indices(d, k, 5) if randk else None

    def run(device):
        s = None if state is None else state.clone().to(device)
        a = None if aux is None else aux.clone().to(device)
        i = None if idx is None else idx.to(device)
        msg = torch.ops.ef21.compress_(grad.to(device), s, a, algorithm, k, 0.1, i, value_dtype)
        return [t.cpu() if t is not None else None for t in (msg, s, a)]

    for c, g in zip(run("cpu"), run("cuda")):
        assert (c is None and g is None) or torch.equal(c, g)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
def test_aggregate_matches_cpu(n, value_dtype):
    d, k = 100_003, 1000
    msgs = []
    for r in range(n):
        grad = _data(d, "normal", torch.float32, seed=10 + r)
        msgs.append(torch.ops.ef21.compress_(grad, None, None, "plain", k, 0.1, None, value_dtype))
    messages = torch.stack(msgs)
    out = _data(d, "normal", torch.float32, seed=99)
    expected = torch.ops.ef21.aggregate_(out.clone(), messages, k, value_dtype, 1.0 / n, None)
    got = torch.ops.ef21.aggregate_(out.cuda(), messages.cuda(), k, value_dtype, 1.0 / n, None)
    assert torch.equal(got.cpu(), expected)
