"""The operators behind skipped steps and loss-scale tracking (CPU, no process group):

* ``compress_(..., update_state=False)`` then ``commit_`` equals ``compress_`` bit for bit;
* ``commit_`` and ``aggregate_`` change nothing when ``ok`` is false;
* ``all_finite_`` finds any non-finite value in packed messages (odd k: unaligned values);
* ``rescale_`` multiplies only when the scale changed, and records it.

Everything is compared bitwise: the same elementwise operations run in both orders.
"""

import pytest
import torch

import ef21  # noqa: F401  (registers the operators)
from common import cpu_and_cuda

ops = torch.ops.ef21
ALGORITHMS = ["ef21", "ef21-sgdm", "ef", "plain"]


def tensors(algorithm, d, state_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    state = None if algorithm == "plain" else torch.randn(d, generator=gen).to(state_dtype)
    aux = torch.randn(d, generator=gen).to(state_dtype) if algorithm == "ef21-sgdm" else None
    return state, aux


def clone(t):
    return None if t is None else t.clone()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("grad_dtype, value_dtype", [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16),
                                                     (torch.float16, torch.float32),
                                                     (torch.float64, torch.float64)])
@pytest.mark.parametrize("randk", [False, True])
def test_deferred_commit_equals_compress(device, algorithm, grad_dtype, value_dtype, randk):
    d, k = 1001, 37  # odd k: packed values sit at unaligned addresses
    state_dtype = torch.float64 if grad_dtype == torch.float64 else torch.float32
    grad = torch.randn(d, generator=torch.Generator().manual_seed(1)).to(grad_dtype).to(device)
    state, aux = tensors(algorithm, d, state_dtype, seed=2)
    state, aux = (None if t is None else t.to(device) for t in (state, aux))
    indices = None
    if randk:
        gen = torch.Generator().manual_seed(3)
        indices = torch.randperm(d, generator=gen)[:k].sort().values.int().to(device)

    s1, a1 = clone(state), clone(aux)
    msg1 = ops.compress_(grad, s1, a1, algorithm, k, 0.3, indices, value_dtype)
    s2, a2 = clone(state), clone(aux)
    msg2 = ops.compress_(grad, s2, a2, algorithm, k, 0.3, indices, value_dtype, update_state=False)
    assert torch.equal(msg1, msg2)
    if state is not None:
        assert torch.equal(s2, state) and (aux is None or torch.equal(a2, aux)), "update_state=False wrote"
    ops.commit_(grad, s2, a2, msg2, algorithm, k, 0.3, indices, value_dtype)
    for got, want in ((s2, s1), (a2, a1)):
        if want is not None:
            assert torch.equal(got, want)


@pytest.mark.parametrize("algorithm", ["ef21", "ef21-sgdm", "ef"])
def test_commit_with_ok_false_changes_nothing(algorithm):
    d, k = 300, 7
    grad = torch.randn(d)
    state, aux = tensors(algorithm, d, torch.float32, seed=4)
    msg = ops.compress_(grad, state, aux, algorithm, k, 0.5, None, torch.float32, update_state=False)
    s, a = clone(state), clone(aux)
    ops.commit_(grad, s, a, msg, algorithm, k, 0.5, None, torch.float32, ok=torch.tensor(False))
    assert torch.equal(s, state) and (aux is None or torch.equal(a, aux))
    ops.commit_(grad, s, a, msg, algorithm, k, 0.5, None, torch.float32, ok=torch.tensor(True))
    assert not torch.equal(s, state)


def test_aggregate_with_ok_false_changes_nothing():
    d, k = 50, 3
    msgs = torch.stack([ops.compress_(torch.randn(d), None, None, "plain", k, 0.0, None, torch.float32)
                        for _ in range(2)])
    out = torch.randn(d)
    got = ops.aggregate_(out.clone(), msgs, k, torch.float32, 0.5, None, ok=torch.tensor(False))
    assert torch.equal(got, out)
    got = ops.aggregate_(out.clone(), msgs, k, torch.float32, 0.5, None, ok=torch.tensor(True))
    assert torch.equal(got, ops.aggregate_(out.clone(), msgs, k, torch.float32, 0.5, None))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_all_finite_finds_any_non_finite_value(device, value_dtype, bad):
    d, k = 40, 5
    grads = [torch.randn(d) for _ in range(3)]
    if bad is not None:
        grads[1][17] = bad  # Top-k selects it first
    msgs = torch.stack([ops.compress_(g, None, None, "plain", k, 0.0, None, value_dtype) for g in grads])
    msgs = msgs.to(device)
    ok = torch.ones((), dtype=torch.bool, device=device)
    ops.all_finite_(ok, msgs, k, value_dtype)
    assert bool(ok) == (bad is None)
    ops.all_finite_(ok, msgs[:1], k, value_dtype)  # only ever cleared
    assert bool(ok) == (bad is None)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rescale_follows_the_scale(device, dtype):
    x = torch.randn(1000, dtype=dtype, device=device)
    y = torch.randn(7, dtype=dtype, device=device)
    scale = torch.full((), 2.0 ** 16, device=device)
    seen = scale.clone()
    x0, y0 = x.clone(), y.clone()
    ops.rescale_([x, y], scale, seen)  # unchanged scale: nothing moves
    assert torch.equal(x, x0) and torch.equal(y, y0)
    scale.fill_(2.0 ** 15)
    ops.rescale_([x, y], scale, seen)
    assert torch.equal(x, x0 / 2) and torch.equal(y, y0 / 2)  # powers of two: exact
    assert seen.item() == 2.0 ** 15
    scale.fill_(2.0 ** 17)
    ops.rescale_([x, y], scale, seen)
    assert torch.equal(x, x0 * 2) and seen.item() == 2.0 ** 17


def test_opcheck_schemas():
    d, k = 300, 10
    x = torch.randn(d)
    state, aux = torch.zeros(d), torch.zeros(d)
    msg = ops.compress_(x, state, aux, "ef21-sgdm", k, 0.5, None, torch.float32, update_state=False)
    yes = torch.tensor(True)
    checks = [
        (ops.compress_.default, (x, state, aux, "ef21-sgdm", k, 0.5, None, torch.float32, False)),
        (ops.commit_.default, (x, state, aux, msg, "ef21-sgdm", k, 0.5, None, torch.float32, yes)),
        (ops.aggregate_.default, (torch.zeros(d), msg.view(1, -1), k, torch.float32, 1.0, None, yes)),
        (ops.all_finite_.default, (torch.tensor(True), msg.view(1, -1), k, torch.float32)),
        (ops.rescale_.default, ([torch.ones(5)], torch.tensor(2.0), torch.tensor(1.0))),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema",))


def test_commit_rejects_a_message_of_another_size():
    d, k = 30, 4
    msg = ops.compress_(torch.randn(d), torch.zeros(d), None, "ef21", k, 0.0, None, torch.float32,
                        update_state=False)
    with pytest.raises(RuntimeError, match="packed messages must have 32 bytes per row for k=4"):
        ops.commit_(torch.randn(d), torch.zeros(d), None, msg[:-8], "ef21", k, 0.0, None, torch.float32)
