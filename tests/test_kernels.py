"""The ef21 operators against plain-PyTorch references (CPU, no process group).

The references are written here, independently of the kernels: Top-k by a stable sort of |x|
(ties to the lower index), state updates by dense tensor maths. The kernels promise the exact
selected set and IEEE-exact element-wise updates, so everything is compared bitwise
(``assert_close(..., rtol=0, atol=0)``) unless a test says otherwise.
"""

import pytest
import torch

import ef21

ops = torch.ops.ef21

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ALGORITHMS = ["ef21", "ef21-sgdm", "ef", "plain"]
EXACT = dict(rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# References


def ref_topk_indices(p: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the k largest |p|, ties to the lower index.

    A stable descending sort keeps equal keys in index order, which is the tie rule. |p| is
    exact in float64 for every input dtype, so the sort key loses nothing."""
    order = torch.sort(p.abs().double(), descending=True, stable=True).indices[:k]
    return order.sort().values


def work_dtype(grad_dtype, state):
    """The kernel's arithmetic dtype: the state's, or float64/float32 by the gradient without state."""
    if state is not None:
        return state.dtype
    return torch.float64 if grad_dtype == torch.float64 else torch.float32


def ref_compress(grad, state, aux, algorithm, k, momentum, indices, value_dtype):
    """Dense-maths reference of ``compress_``: returns (indices int64, values in value_dtype,
    new state, new aux); the inputs are not modified."""
    s_dtype = work_dtype(grad.dtype, state)
    g = grad.to(s_dtype)
    state = None if state is None else state.clone()
    aux = None if aux is None else aux.clone()
    if algorithm == "ef21":
        p = g - state
    elif algorithm == "ef21-sgdm":
        # (1 - eta) is formed in the state dtype, as a kernel working in that dtype does.
        eta = torch.tensor(momentum, dtype=s_dtype)
        aux = (1 - eta) * aux + eta * g
        p = aux - state
    elif algorithm == "ef":
        p = state + g
    else:
        p = g
    idx = ref_topk_indices(p, k) if indices is None else indices.long()
    values = p[idx].to(value_dtype)
    c = values.to(s_dtype)  # the state tracks what the other ranks receive: the rounded value
    if algorithm in ("ef21", "ef21-sgdm"):
        state[idx] += c
    elif algorithm == "ef":
        state = p.clone()
        state[idx] -= c
    return idx, values, state, aux


def unpack(msg: torch.Tensor, k: int, value_dtype):
    """Splits a packed message: [k int32 indices | k values] as raw bytes. (The values are
    copied out first: for odd k, 8-byte values start at an offset a view may not take.)"""
    assert msg.dtype == torch.uint8 and msg.dim() == 1
    nbytes = torch.empty((), dtype=value_dtype).element_size()
    assert msg.numel() == k * (4 + nbytes)
    return msg[: 4 * k].view(torch.int32), msg[4 * k:].clone().view(value_dtype)


def pack(idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.cat([idx.to(torch.int32).view(torch.uint8), values.contiguous().view(torch.uint8)])


def ref_aggregate(out, rows, scale):
    """Sequential index_add of each (indices, values) row in row order, in the kernel's
    accumulation dtype (float64 for float64 ``out``, float32 otherwise), rounding ``out`` back to
    its dtype after each row."""
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    out = out.clone()
    for idx, values in rows:
        acc = out.to(acc_dtype)
        acc.index_add_(0, idx.long(), values.to(acc_dtype) * scale)
        out = acc.to(out.dtype)
    return out


def random_grad(d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=gen, dtype=torch.float64).to(dtype)


def make_state(algorithm, d, s_dtype, seed):
    """Non-zero state and aux, so the updates are seen acting on real values."""
    gen = torch.Generator().manual_seed(seed)
    state = None if algorithm == "plain" else torch.randn(d, generator=gen, dtype=torch.float64).to(s_dtype)
    aux = torch.randn(d, generator=gen, dtype=torch.float64).to(s_dtype) if algorithm == "ef21-sgdm" else None
    return state, aux


# ----------------------------------------------------------------------------------------------
# topk_abs


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 7, 1000, 70_001])
def test_topk_abs_matches_sorted_reference(dtype, d):
    x = random_grad(d, dtype, seed=d)
    for k in sorted({1, max(1, d // 3), max(1, d - 1), d}):
        idx, values = ops.topk_abs(x, k)
        assert idx.dtype == torch.int32 and values.dtype == dtype
        expect = ref_topk_indices(x, k)
        torch.testing.assert_close(idx.long(), expect, **EXACT)
        torch.testing.assert_close(values, x[expect], **EXACT)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "data",
    ["integers", "all_equal", "plus_minus", "zeros", "two_levels"],
)
def test_topk_abs_ties_go_to_lower_index(dtype, data):
    d = 70_003  # above one chunk per thread, so ties straddle chunk boundaries
    gen = torch.Generator().manual_seed(1)
    if data == "integers":
        x = torch.randint(-4, 5, (d,), generator=gen).to(dtype)
    elif data == "all_equal":
        x = torch.full((d,), 0.75, dtype=dtype)
    elif data == "plus_minus":  # +c and -c tie on |x|
        x = torch.where(torch.rand(d, generator=gen) < 0.5, 2.0, -2.0).to(dtype)
    elif data == "zeros":  # +0 and -0 tie too
        x = torch.where(torch.rand(d, generator=gen) < 0.5, 0.0, -0.0).to(dtype)
    else:
        x = torch.where(torch.rand(d, generator=gen) < 0.01, 3.0, 1.0).to(dtype)
    for k in [1, 2, 17, 5000, d - 1, d]:
        idx, _ = ops.topk_abs(x, k)
        torch.testing.assert_close(idx.long(), ref_topk_indices(x, k), **EXACT)
    if data == "all_equal":
        torch.testing.assert_close(ops.topk_abs(x, 5000)[0].long(), torch.arange(5000), **EXACT)


@pytest.mark.parametrize("data", ["ascending", "descending", "spikes_at_sample_points", "ninety_percent_zeros"])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_topk_abs_exact_when_the_sampled_band_misses(data, ratio):
    """The CPU select guesses a band around the k-th largest from a strided sample and falls back to
    an exact histogram pass when the guess misses; these inputs defeat the sample."""
    d = 200_003
    g = torch.Generator().manual_seed(7)
    if data == "ascending":
        x = torch.arange(d, dtype=torch.float32)
    elif data == "descending":
        x = -torch.arange(d, dtype=torch.float32)
    elif data == "spikes_at_sample_points":  # small everywhere but on a regular stride
        x = torch.rand(d, generator=g) * 1e-3
        x[::64] = 1.0 + torch.rand(x[::64].shape, generator=g)
    else:
        x = torch.zeros(d)
        x[torch.randperm(d, generator=g)[: d // 10]] = torch.randn(d // 10, generator=g)
    k = max(1, int(ratio * d))
    idx, vals = torch.ops.ef21.topk_abs(x, k)
    assert torch.equal(idx.long(), ref_topk_indices(x, k))
    assert torch.equal(vals, x[idx.long()])


def test_topk_abs_negative_values_rank_by_magnitude():
    x = torch.tensor([0.5, -4.0, 3.0, -3.0, 1.0, -0.25])
    idx, values = ops.topk_abs(x, 3)
    assert idx.tolist() == [1, 2, 3]  # |-4| > |3| = |-3|: both 3s kept, in index order
    assert values.tolist() == [-4.0, 3.0, -3.0]
    idx, values = ops.topk_abs(x, 2)
    assert idx.tolist() == [1, 2]  # the tie between x[2] and x[3] goes to the lower index
    assert values.tolist() == [-4.0, 3.0]


def test_topk_abs_nan_and_inf_rank_above_finite():
    # As in torch.topk: NaN above inf, inf above every finite value.
    x = torch.tensor([1.0, float("-inf"), 5.0, float("nan"), -7.0, float("inf")])
    assert ops.topk_abs(x, 1)[0].tolist() == [3]
    assert ops.topk_abs(x, 3)[0].tolist() == [1, 3, 5]
    assert ops.topk_abs(x, 4)[0].tolist() == [1, 3, 4, 5]


def test_topk_abs_accepts_non_contiguous_input():
    base = random_grad(2000, torch.float32, seed=3)
    x = base[::2]
    idx, values = ops.topk_abs(x, 50)
    torch.testing.assert_close(idx.long(), ref_topk_indices(x, 50), **EXACT)
    torch.testing.assert_close(values, x[idx.long()], **EXACT)


# ----------------------------------------------------------------------------------------------
# Indices above 2^24 (not representable in float32): one large case, with the answer planted.


def test_indices_above_2_pow_24():
    d = (1 << 24) + 7
    gen = torch.Generator().manual_seed(0)
    grad = torch.rand(d, generator=gen) * 2 - 1  # |grad| < 1 everywhere ...
    planted = torch.tensor([5, (1 << 24) - 1, 1 << 24, (1 << 24) + 1, (1 << 24) + 3, d - 1])
    grad[planted] = torch.tensor([-2.0, 3.0, -4.0, 5.0, -6.0, 7.0])  # ... except at these
    k = planted.numel()

    idx, values = ops.topk_abs(grad, k)
    assert idx.tolist() == planted.tolist()
    torch.testing.assert_close(values, grad[planted], **EXACT)

    state = torch.zeros(d)
    msg = ops.compress_(grad, state, None, "ef21", k, 0.0, None, torch.float32)
    msg_idx, msg_values = unpack(msg, k, torch.float32)
    assert msg_idx.tolist() == planted.tolist()
    torch.testing.assert_close(state[planted], grad[planted], **EXACT)
    assert int(torch.count_nonzero(state)) == k

    out = torch.zeros(d)
    ops.aggregate_(out, torch.stack([msg, msg]), k, torch.float32, 0.5, None)
    torch.testing.assert_close(out[planted], grad[planted], **EXACT)
    assert int(torch.count_nonzero(out)) == k


# ----------------------------------------------------------------------------------------------
# compress_


@pytest.mark.parametrize("given_indices", [False, True], ids=["topk", "given"])
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_compress_matches_dense_reference(algorithm, grad_dtype, value_dtype, given_indices):
    d, k, momentum = 1531, 97, 0.3
    s_dtype = torch.float64 if grad_dtype == torch.float64 else torch.float32  # as the hook keeps it
    state, aux = make_state(algorithm, d, s_dtype, seed=11)
    # Two steps, so the second one starts from a state the kernel itself wrote.
    for step in range(2):
        grad = random_grad(d, grad_dtype, seed=100 + step)
        indices = ef21._C.randk_indices(d, k, step) if given_indices else None
        expect_idx, expect_values, expect_state, expect_aux = ref_compress(
            grad, state, aux, algorithm, k, momentum, indices, value_dtype)

        msg = ops.compress_(grad, state, aux, algorithm, k, momentum, indices, value_dtype)

        if given_indices:  # Rand-k: the values alone, in value_dtype
            assert msg.dtype == value_dtype and msg.shape == (k,)
            values = msg
        else:
            idx, values = unpack(msg, k, value_dtype)
            torch.testing.assert_close(idx.long(), expect_idx, **EXACT)
        torch.testing.assert_close(values, expect_values, **EXACT)
        if state is not None:
            torch.testing.assert_close(state, expect_state, **EXACT)
        if aux is not None:
            torch.testing.assert_close(aux, expect_aux, **EXACT)


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("algorithm", ["ef21", "ef"])
def test_compress_state_tracks_the_rounded_value(algorithm, value_dtype):
    d, k = 4096, 300
    grad = random_grad(d, torch.float32, seed=5) * 1.2345
    state = torch.zeros(d)
    msg = ops.compress_(grad, state, None, algorithm, k, 0.0, None, value_dtype)
    idx, values = unpack(msg, k, value_dtype)
    idx = idx.long()
    rounded = grad[idx].to(value_dtype).float()
    assert not torch.equal(rounded, grad[idx])  # the rounding is visible, so the test has teeth
    torch.testing.assert_close(values.float(), rounded, **EXACT)
    if algorithm == "ef21":  # g_i moves by exactly what the other ranks add
        torch.testing.assert_close(state[idx], rounded, **EXACT)
    else:  # e keeps the rounding error at the sent places and everything elsewhere
        torch.testing.assert_close(state[idx], grad[idx] - rounded, **EXACT)
    mask = torch.ones(d, dtype=torch.bool)
    mask[idx] = False
    expect_rest = torch.zeros(int(mask.sum())) if algorithm == "ef21" else grad[mask]
    torch.testing.assert_close(state[mask], expect_rest, **EXACT)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_compress_k_equals_d_sends_everything(algorithm):
    d = 257
    grad = random_grad(d, torch.float32, seed=9)
    state, aux = make_state(algorithm, d, torch.float32, seed=10)
    expect = ref_compress(grad, state, aux, algorithm, d, 0.5, None, torch.float32)
    scale = max(float(grad.abs().max()), float(state.abs().max())) if state is not None else 0.0
    msg = ops.compress_(grad, state, aux, algorithm, d, 0.5, None, torch.float32)
    idx, values = unpack(msg, d, torch.float32)
    torch.testing.assert_close(idx.long(), torch.arange(d), **EXACT)
    torch.testing.assert_close(values, expect[1], **EXACT)
    if algorithm in ("ef21", "ef21-sgdm"):  # nothing left behind: g_i reaches its target
        target = grad if algorithm == "ef21" else aux
        # g_i + (target - g_i) rounds twice, by at most half an ulp of twice the magnitude each.
        torch.testing.assert_close(state, target, rtol=0, atol=4 * scale * 2**-24)
    if algorithm == "ef":
        torch.testing.assert_close(state, torch.zeros(d), **EXACT)


def test_compress_single_element():
    grad = torch.tensor([-3.5])
    state = torch.tensor([1.0])
    msg = ops.compress_(grad, state, None, "ef21", 1, 0.0, None, torch.float32)
    idx, values = unpack(msg, 1, torch.float32)
    assert idx.tolist() == [0] and values.tolist() == [-4.5]
    assert state.tolist() == [-3.5]


def test_compress_sgdm_with_momentum_one_is_ef21():
    d, k = 999, 33
    grad = random_grad(d, torch.float32, seed=21)
    state_a = random_grad(d, torch.float32, seed=22)
    state_b = state_a.clone()
    aux = torch.zeros(d)
    msg_a = ops.compress_(grad, state_a, aux, "ef21-sgdm", k, 1.0, None, torch.float32)
    msg_b = ops.compress_(grad, state_b, None, "ef21", k, 1.0, None, torch.float32)
    assert torch.equal(msg_a, msg_b)
    torch.testing.assert_close(state_a, state_b, **EXACT)
    torch.testing.assert_close(aux, grad, **EXACT)


def test_compress_plain_leaves_no_state_and_ignores_momentum():
    d, k = 500, 20
    grad = random_grad(d, torch.float32, seed=4)
    a = ops.compress_(grad, None, None, "plain", k, 0.1, None, torch.float32)
    b = ops.compress_(grad, None, None, "plain", k, 0.9, None, torch.float32)
    assert torch.equal(a, b)
    idx, values = unpack(a, k, torch.float32)
    torch.testing.assert_close(idx.long(), ref_topk_indices(grad, k), **EXACT)


def test_packed_message_layout_is_indices_then_values():
    # Bytes, not tensors: the wire format other ranks (and other devices) parse.
    grad = torch.tensor([0.0, 2.0, 0.0, -8.0, 1.0], dtype=torch.float32)
    msg = ops.compress_(grad, None, None, "plain", 2, 0.0, None, torch.float32)
    expect = torch.tensor([1, 3], dtype=torch.int32).numpy().tobytes() + \
        torch.tensor([2.0, -8.0], dtype=torch.float32).numpy().tobytes()
    assert msg.numpy().tobytes() == expect
    msg16 = ops.compress_(grad, None, None, "plain", 2, 0.0, None, torch.float16)
    assert msg16.numel() == 2 * (4 + 2)
    assert msg16.numpy().tobytes() == (
        torch.tensor([1, 3], dtype=torch.int32).numpy().tobytes()
        + torch.tensor([2.0, -8.0], dtype=torch.float16).numpy().tobytes())


# ----------------------------------------------------------------------------------------------
# aggregate_


def random_rows(n, d, k, value_dtype, seed):
    """n messages with overlapping supports (sorted distinct indices) and random values."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        idx = torch.randperm(d, generator=gen)[:k].sort().values.to(torch.int32)
        values = torch.randn(k, generator=gen, dtype=torch.float64).to(value_dtype)
        rows.append((idx, values))
    return rows


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n, k", [(1, 700), (3, 700), (8, 700), (5, 1), (5, 333)])
def test_aggregate_packed_matches_sequential_index_add(n, k, out_dtype, value_dtype):
    # k/d large, so rows overlap a lot; odd k puts 2-byte rows' indices and 8-byte values at
    # unaligned offsets of the batch, which the kernel must read all the same.
    d, scale = 3000, 1.0 / 3.0
    rows = random_rows(n, d, k, value_dtype, seed=n)
    out = random_grad(d, out_dtype, seed=7)
    expect = ref_aggregate(out, rows, scale)
    messages = torch.stack([pack(i, v) for i, v in rows])
    result = ops.aggregate_(out, messages, k, value_dtype, scale, None)
    assert result.data_ptr() == out.data_ptr()  # in place, returns out
    torch.testing.assert_close(out, expect, **EXACT)


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
def test_aggregate_shared_indices_matches_sequential_index_add(out_dtype, value_dtype):
    d, k, n, scale = 2000, 150, 4, 0.25
    indices = ef21._C.randk_indices(d, k, 123)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(n, k, generator=gen, dtype=torch.float64).to(value_dtype)
    out = random_grad(d, out_dtype, seed=1)
    expect = ref_aggregate(out, [(indices, values[r]) for r in range(n)], scale)
    ops.aggregate_(out, values, k, value_dtype, scale, indices)
    torch.testing.assert_close(out, expect, **EXACT)


def test_aggregate_applies_rows_in_row_order():
    # In float32, 1e8 + 1 rounds back to 1e8, so the order of the three rows decides the sum.
    idx = torch.tensor([0], dtype=torch.int32)
    big, one = torch.tensor([1e8]), torch.tensor([1.0])
    rows = [(idx, big), (idx, -big), (idx, one)]
    out = torch.zeros(2)
    ops.aggregate_(out, torch.stack([pack(i, v) for i, v in rows]), 1, torch.float32, 1.0, None)
    assert out.tolist() == [1.0, 0.0]
    out = torch.zeros(2)
    rows = [rows[2], rows[0], rows[1]]
    ops.aggregate_(out, torch.stack([pack(i, v) for i, v in rows]), 1, torch.float32, 1.0, None)
    assert out.tolist() == [0.0, 0.0]


def test_aggregate_of_compressed_messages_is_the_mean_of_c():
    # The hook's sparse path end to end: n ranks compress, all apply the gathered messages.
    d, k, n = 4000, 64, 5
    target = torch.zeros(d)
    msgs = []
    dense_sum, abs_sum = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for r in range(n):
        grad = random_grad(d, torch.float32, seed=200 + r)
        msgs.append(ops.compress_(grad, None, None, "plain", k, 0.0, None, torch.float32))
        idx = ref_topk_indices(grad, k)
        dense_sum[idx] += grad[idx].double()
        abs_sum[idx] += grad[idx].double().abs()
    ops.aggregate_(target, torch.stack(msgs), k, torch.float32, 1.0 / n, None)
    # A float32 sum of n scaled terms against the float64 mean: each of the n products and n sums
    # rounds once, so the error is at most 2n half-ulps of the sum of magnitudes.
    err = (target.double() - dense_sum / n).abs()
    assert (err <= 2 * n * 2**-24 * abs_sum / n).all()
    assert int(torch.count_nonzero(target)) > k  # the supports differ, so the rows really add up


def test_aggregate_with_no_messages_leaves_out_unchanged():
    out = random_grad(100, torch.float32, seed=0)
    before = out.clone()
    ops.aggregate_(out, torch.empty(0, 8 * 3, dtype=torch.uint8), 3, torch.float32, 1.0, None)
    torch.testing.assert_close(out, before, **EXACT)


# ----------------------------------------------------------------------------------------------
# Thread-count invariance: the kernels split work by thread, the results must not depend on it.


def test_outputs_do_not_depend_on_thread_count():
    d, k, n = 300_007, 3001, 4
    gen = torch.Generator().manual_seed(0)
    # Integer-valued data: many ties at the threshold, spread over every chunk.
    grad = torch.randint(-50, 51, (d,), generator=gen).float() / 7
    state0 = torch.randint(-50, 51, (d,), generator=gen).float() / 11
    rows = random_rows(n, d, k, torch.float32, seed=3)
    messages = torch.stack([pack(i, v) for i, v in rows])

    def run_all():
        idx, values = ops.topk_abs(grad, k)
        state = state0.clone()
        msg = ops.compress_(grad, state, None, "ef21", k, 0.0, None, torch.float32)
        out = state0.clone()
        ops.aggregate_(out, messages, k, torch.float32, 1.0 / n, None)
        return idx, values, msg, state, out

    saved = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = run_all()
    finally:
        torch.set_num_threads(saved)
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert torch.equal(a, b), f"differs between 1 and {threads} threads"
    torch.testing.assert_close(results[1][0].long(), ref_topk_indices(grad, k), **EXACT)


# ----------------------------------------------------------------------------------------------
# opcheck: the schemas match what the kernels do (mutation, aliasing).


def test_opcheck_schemas():
    x = random_grad(300, torch.float32, seed=0)
    torch.library.opcheck(ops.topk_abs.default, (x, 10), test_utils=("test_schema",))
    state, aux = torch.zeros(300), torch.zeros(300)
    torch.library.opcheck(ops.compress_.default, (x, state, aux, "ef21-sgdm", 10, 0.5, None, torch.float32),
                          test_utils=("test_schema",))
    msg = ops.compress_(x, None, None, "plain", 10, 0.0, None, torch.float32)
    torch.library.opcheck(ops.aggregate_.default,
                          (torch.zeros(300), msg.view(1, -1), 10, torch.float32, 1.0, None),
                          test_utils=("test_schema",))


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors that say what was wrong.


def test_topk_abs_rejects_bad_input():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match=r"x must be 1-D, got 2-D"):
        ops.topk_abs(x.view(2, 5), 2)
    with pytest.raises(RuntimeError, match=r"k=0 is out of range; allowed: 1 <= k <= 10"):
        ops.topk_abs(x, 0)
    with pytest.raises(RuntimeError, match=r"k=11 is out of range; allowed: 1 <= k <= 10"):
        ops.topk_abs(x, 11)
    with pytest.raises(RuntimeError, match=r"x must be floating point, got Int"):
        ops.topk_abs(torch.arange(10, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match=r"k=1 is out of range; allowed: 1 <= k <= 0"):
        ops.topk_abs(torch.empty(0), 1)


ASCENDING = r"indices must be strictly ascending in \[0, 10\)"


def compress(grad=None, state=None, aux=None, algorithm="ef21", k=2, momentum=0.1, indices=None,
             value_dtype=torch.float32, **_):
    grad = torch.randn(10) if grad is None else grad
    if state is None and algorithm != "plain":
        state = torch.zeros(grad.numel())
    return ops.compress_(grad, state, aux, algorithm, k, momentum, indices, value_dtype)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grad=torch.randn(2, 5)), r"grad must be 1-D, got 2-D"),
        (dict(grad=torch.randn(20)[::2]), r"grad must be contiguous"),
        (dict(grad=torch.arange(10)), r"grad must be floating point, got Long"),
        (dict(k=0), r"k=0 is out of range; allowed: 1 <= k <= 10"),
        (dict(k=11), r"k=11 is out of range; allowed: 1 <= k <= 10"),
        (dict(algorithm="topk"), r"algorithm='topk' is not supported; allowed: 'ef21', 'ef21-sgdm'"),
        (dict(algorithm="dense"), r"nothing to do for algorithm='dense'"),
        (dict(value_dtype=torch.int32), r"value_dtype=Int is not supported; allowed: Float, BFloat16, Half"),
        (dict(state=torch.zeros(10, dtype=torch.float16)), r"state must be float32 or float64, got Half"),
        (dict(state=torch.zeros(9)), r"state has 9 elements, grad has 10"),
        (dict(state=torch.zeros(2, 5)), r"state must be 1-D, got 2-D"),
        (dict(algorithm="ef21-sgdm"), r"algorithm='ef21-sgdm' needs an aux \(momentum\) tensor"),
        (dict(algorithm="ef21-sgdm", aux=torch.zeros(10, dtype=torch.float64)),
         r"aux must have the state's dtype Float, got Double"),
        (dict(algorithm="ef21-sgdm", aux=torch.zeros(11)), r"aux has 11 elements, grad has 10"),
        (dict(indices=torch.tensor([1, 2])), r"indices must be int32, got Long"),
        (dict(indices=torch.tensor([1, 2, 3], dtype=torch.int32)), r"indices has 3 elements, expected k=2"),
        (dict(indices=torch.tensor([3, 1], dtype=torch.int32)), ASCENDING),
        (dict(indices=torch.tensor([2, 2], dtype=torch.int32)), ASCENDING),
        (dict(indices=torch.tensor([1, 10], dtype=torch.int32)), ASCENDING),
        (dict(indices=torch.tensor([-1, 3], dtype=torch.int32)), ASCENDING),
    ],
    ids=lambda v: None if isinstance(v, str) else ",".join(v),
)
def test_compress_rejects_bad_input(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        compress(**kwargs)


def test_compress_needs_state_except_for_plain():
    grad = torch.randn(10)
    for algorithm in ("ef21", "ef21-sgdm", "ef"):
        with pytest.raises(RuntimeError, match=f"algorithm='{algorithm}' needs a state tensor"):
            ops.compress_(grad, None, torch.zeros(10), algorithm, 2, 0.1, None, torch.float32)


def test_compress_rejects_bad_indices_without_touching_state():
    grad, state = torch.randn(10), torch.zeros(10)
    with pytest.raises(RuntimeError, match="strictly ascending"):
        ops.compress_(grad, state, None, "ef21", 2, 0.1, torch.tensor([0, 1 << 30], dtype=torch.int32),
                      torch.float32)
    assert torch.count_nonzero(state) == 0


def aggregate(out=None, messages=None, k=2, value_dtype=torch.float32, indices=None, **_):
    out = torch.zeros(10) if out is None else out
    if messages is None:
        messages = torch.stack([pack(torch.tensor([1, 4]), torch.tensor([1.0, 2.0]))])
    return ops.aggregate_(out, messages, k, value_dtype, 1.0, indices)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(out=torch.zeros(2, 5)), r"out must be 1-D, got 2-D"),
        (dict(messages=torch.zeros(16, dtype=torch.uint8)), r"messages must be a contiguous 2-D tensor"),
        (dict(messages=torch.zeros(1, 4)), r"packed messages must be uint8, got Float"),
        (dict(messages=torch.zeros(1, 15, dtype=torch.uint8)),
         r"packed messages must have 16 bytes per row for k=2 and value_dtype=Float, got 15"),
        (dict(k=0), r"k=0 is out of range; allowed: k >= 1"),
        (dict(value_dtype=torch.int32), r"value_dtype=Int is not supported; allowed: Float, BFloat16, Half"),
        (dict(messages=torch.stack([pack(torch.tensor([4, 1]), torch.ones(2))])),
         r"not strictly ascending in \[0, 10\)"),
        (dict(messages=torch.stack([pack(torch.tensor([3, 3]), torch.ones(2))])),
         r"not strictly ascending in \[0, 10\)"),
        (dict(messages=torch.stack([pack(torch.tensor([1, 10]), torch.ones(2))])),
         r"not strictly ascending in \[0, 10\)"),
        (dict(messages=torch.stack([pack(torch.tensor([-5, 1]), torch.ones(2))])),
         r"not strictly ascending in \[0, 10\)"),
        # A bad row after good ones is found too.
        (dict(messages=torch.stack([pack(torch.tensor([1, 2]), torch.ones(2)),
                                    pack(torch.tensor([2, 99]), torch.ones(2))])),
         r"not strictly ascending in \[0, 10\)"),
        (dict(messages=torch.ones(3, 2), indices=torch.tensor([1, 2])),
         r"indices must be int32 with k=2 elements"),
        (dict(messages=torch.ones(3, 2), indices=torch.tensor([1, 2, 3], dtype=torch.int32)),
         r"indices must be int32 with k=2 elements"),
        (dict(messages=torch.ones(3, 3), indices=torch.tensor([1, 2], dtype=torch.int32)),
         r"messages must be \[n, k\] of value_dtype when indices are given"),
        (dict(messages=torch.ones(3, 2, dtype=torch.float64),
              indices=torch.tensor([1, 2], dtype=torch.int32)),
         r"messages must be \[n, k\] of value_dtype when indices are given"),
        (dict(messages=torch.ones(3, 2), indices=torch.tensor([2, 1], dtype=torch.int32)),
         r"not strictly ascending in \[0, 10\)"),
    ],
    ids=lambda v: None if isinstance(v, str) else ",".join(v),
)
def test_aggregate_rejects_bad_input(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        aggregate(**kwargs)


def test_aggregate_rejects_bad_messages_without_touching_out():
    out = torch.zeros(10)
    good = pack(torch.tensor([1, 2]), torch.ones(2))
    bad = pack(torch.tensor([2, 1]), torch.ones(2))
    with pytest.raises(RuntimeError, match="not strictly ascending"):
        ops.aggregate_(out, torch.stack([good, bad]), 2, torch.float32, 1.0, None)
    assert torch.count_nonzero(out) == 0


# ----------------------------------------------------------------------------------------------
# Rand-k support and k_for


@pytest.mark.parametrize("d, k", [(1, 1), (10, 1), (10, 3), (10, 10), (1000, 999), (100_000, 1000)])
def test_randk_indices_sorted_distinct_in_range(d, k):
    for seed in range(5):
        idx = ef21._C.randk_indices(d, k, seed)
        assert idx.dtype == torch.int32 and idx.shape == (k,)
        assert int(idx[0]) >= 0 and int(idx[-1]) < d
        assert bool((idx[1:] > idx[:-1]).all())  # ascending and distinct
    if k == d:
        torch.testing.assert_close(idx, torch.arange(d, dtype=torch.int32), **EXACT)


def _floyd_reference(d: int, k: int, seed: int) -> list[int]:
    """splitmix64 draws and Floyd's sampling, in plain Python (the definition of the support)."""
    mask = (1 << 64) - 1
    s, picked = seed, set()
    for j in range(d - k, d):
        s = (s + 0x9E3779B97F4A7C15) & mask
        z = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        t = (z ^ (z >> 31)) % (j + 1)
        picked.add(j if t in picked else t)
    return sorted(picked)


# The core keeps a bitmap when k is at least d/2048 and a hash set below: both are covered.
@pytest.mark.parametrize("d, k", [(10, 3), (10_000, 100), (10_000, 9_999), (1_000_000, 10), (300_000, 146)])
def test_randk_indices_are_floyds_sample(d, k):
    for seed in (0, 7, 2**64 - 1):
        assert ef21._C.randk_indices(d, k, seed).tolist() == _floyd_reference(d, k, seed)


def test_randk_indices_deterministic_per_seed():
    a = ef21._C.randk_indices(10_000, 100, 42)
    assert torch.equal(a, ef21._C.randk_indices(10_000, 100, 42))
    assert not torch.equal(a, ef21._C.randk_indices(10_000, 100, 43))
    big = ef21._C.randk_indices(10_000, 100, 2**64 - 1)  # the whole uint64 seed range is accepted
    assert big.shape == (100,)


def test_randk_indices_cover_all_positions_evenly():
    # 4000 draws of 3 out of 10: each position expects 1200 hits, with a binomial standard
    # deviation of about 29; 150 is over 5 of them. Fixed seeds, so this cannot flake.
    counts = torch.zeros(10)
    for seed in range(4000):
        counts[ef21._C.randk_indices(10, 3, seed).long()] += 1
    assert ((counts - 1200).abs() < 150).all(), counts


def test_randk_indices_rejects_bad_k():
    with pytest.raises(RuntimeError, match=r"k=0 is out of range; allowed: 1 <= k <= 10"):
        ef21._C.randk_indices(10, 0, 0)
    with pytest.raises(RuntimeError, match=r"k=11 is out of range; allowed: 1 <= k <= 10"):
        ef21._C.randk_indices(10, 11, 0)


@pytest.mark.parametrize(
    "numel, ratio, k, expect",
    [
        (123, 4 / 123, None, 4),  # 4/123 * 123 is 4.000000000000001 in float64: not 5
        (123, 1.0, None, 123),
        (1000, 0.01, None, 10),
        (1000, 0.011, None, 11),  # 11.000000000000002
        (1000, 0.0101, None, 11),  # 10.1 rounds up
        (1000, 1e-9, None, 1),  # never zero
        (1, 0.01, None, 1),
        (1000, 0.01, 7, 7),  # an explicit k wins over ratio
        (10, 0.5, 50, 10),  # and is clamped to numel
        (10, 0.5, 10, 10),
    ],
)
def test_k_for_closed_form(numel, ratio, k, expect):
    assert ef21.k_for(numel, ratio, k) == expect


def test_k_for_round_trips_every_fraction():
    # k_for(d, k/d) == k for every k <= d: float rounding never adds one.
    for d in range(1, 400):
        for k in range(1, d + 1):
            assert ef21.k_for(d, k / d) == k, (d, k)
