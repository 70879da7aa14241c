"""Configuration and registration errors: each bad input raises at once, with a message naming the
argument, the value given and what is allowed (DESIGN §6)."""

import re

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel.distributed import _MixedPrecision

import ef21
from ef21.config import Config


# ----------------------------------------------------------------------------------------------
# EF21State / Config arguments


def raises_naming(exc, *parts):
    """pytest.raises whose message must contain every part literally."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts))


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.0000001, 2, float("nan"), float("inf"), "0.1", None, True])
def test_bad_ratio(ratio):
    with raises_naming(ValueError, f"ratio={ratio!r}", "allowed", "0 < ratio <= 1"):
        ef21.EF21State(ratio=ratio)


@pytest.mark.parametrize("ratio", [1e-9, 0.01, 0.5, 1, 1.0])
def test_good_ratio(ratio):
    assert ef21.EF21State(ratio=ratio).config.ratio == float(ratio)


@pytest.mark.parametrize("k", [0, -3, 1.5, 2.0, "4", True])
def test_bad_k(k):
    with raises_naming(ValueError, f"k={k!r}", "allowed", "integer >= 1"):
        ef21.EF21State(k=k)


@pytest.mark.parametrize("k", [None, 1, 1000])
def test_good_k(k):
    assert ef21.EF21State(k=k).config.k == k


@pytest.mark.parametrize("algorithm", ["EF21", "ef21_sgdm", "powersgd", "", None])
def test_unknown_algorithm(algorithm):
    with raises_naming(ValueError, f"algorithm={algorithm!r}", "allowed", "'ef21'", "'ef21-sgdm'", "'ef'",
                       "'plain'", "'dense'"):
        ef21.EF21State(algorithm=algorithm)


@pytest.mark.parametrize("compressor", ["top-k", "randomk", "powersgd", None])
def test_unknown_compressor(compressor):
    with raises_naming(ValueError, f"compressor={compressor!r}", "allowed", "'topk'", "'randk'",
                       "'identity'"):
        ef21.EF21State(compressor=compressor)


@pytest.mark.parametrize("init", ["dense", "zeros", None])
def test_unknown_init(init):
    with raises_naming(ValueError, f"init={init!r}", "allowed", "'full'", "'compressed'", "'zero'"):
        ef21.EF21State(init=init)


@pytest.mark.parametrize("value_dtype", [torch.complex64, torch.int32, torch.uint8, "fp8", "float", 16])
def test_bad_value_dtype(value_dtype):
    with raises_naming(ValueError, f"value_dtype={value_dtype!r}", "allowed", "torch.bfloat16",
                       "torch.float16"):
        ef21.EF21State(value_dtype=value_dtype)


@pytest.mark.parametrize(
    "value_dtype, expect",
    [(None, torch.float32), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.float16, torch.float16), ("bf16", torch.bfloat16), ("fp16", torch.float16)],
)
def test_good_value_dtype(value_dtype, expect):
    assert ef21.EF21State(value_dtype=value_dtype).config.value_dtype == expect


@pytest.mark.parametrize("momentum", [0, 0.0, -0.5, 1.01, float("nan"), "0.1", None, True])
def test_momentum_out_of_range(momentum):
    with raises_naming(ValueError, f"momentum={momentum!r}", "allowed", "0 < momentum <= 1"):
        ef21.EF21State(algorithm="ef21-sgdm", momentum=momentum)


@pytest.mark.parametrize("seed", [-1, 0.5, "0", 2**63])
def test_bad_seed(seed):
    with raises_naming(ValueError, f"seed={seed!r}", "allowed"):
        ef21.EF21State(compressor="randk", seed=seed)


@pytest.mark.parametrize("group", ["world", 0, object()])
def test_process_group_of_the_wrong_type(group):
    with raises_naming(TypeError, "process_group must be a torch.distributed.ProcessGroup or None",
                       type(group).__name__):
        ef21.EF21State(process_group=group)


def test_config_make_is_the_one_validation():
    # EF21State validates through Config.make: the same message either way.
    with pytest.raises(ValueError) as direct:
        Config.make(ratio=0)
    with pytest.raises(ValueError) as via_state:
        ef21.EF21State(ratio=0)
    assert str(direct.value) == str(via_state.value)
    c = Config.make(algorithm="ef21-sgdm", compressor="randk", ratio=0.5, k=3, momentum=1, init="zero",
                    value_dtype="bf16", seed=7)
    assert (c.algorithm, c.compressor, c.ratio, c.k, c.momentum, c.init, c.value_dtype, c.seed) == (
        "ef21-sgdm", "randk", 0.5, 3, 1.0, "zero", torch.bfloat16, 7)


# ----------------------------------------------------------------------------------------------
# Registration: needs a process group; one rank of gloo in this process is enough.


# Runs before the module's group exists (tests run in file order).
def test_hook_convention_without_init_process_group_says_so():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this session")
    state = ef21.EF21State()
    with raises_naming(RuntimeError, "torch.distributed is not initialised", "init_process_group"):
        state._bind()


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A 1-rank gloo default group for this module (reused if the session already has one)."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def ddp(**kwargs):
    torch.manual_seed(0)
    return DistributedDataParallel(torch.nn.Linear(4, 3), **kwargs)


def step(model):
    model(torch.randn(2, 4)).sum().backward()


def noop_hook(state, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def test_register_rejects_a_module_that_is_not_ddp(group):
    with raises_naming(TypeError, "ddp_model must be a torch.nn.parallel.DistributedDataParallel",
                       "got Linear"):
        ef21.register(torch.nn.Linear(4, 3), ef21.EF21State())


def test_register_rejects_a_state_that_is_not_ef21state(group):
    with raises_naming(TypeError, "state must be an ef21.EF21State", "got dict"):
        ef21.register(ddp(), {"ratio": 0.1})


def test_register_works_and_returns_the_state(group):
    model = ddp()
    state = ef21.EF21State(ratio=0.5)
    assert ef21.register(model, state) is state
    step(model)
    assert state.stats()["hook_calls"] >= 1


def test_second_registration_on_the_same_model(group):
    model = ddp()
    ef21.register(model, ef21.EF21State())
    with raises_naming(RuntimeError, "already has a communication hook", "one per model"):
        ef21.register(model, ef21.EF21State())


def test_ddp_hook_after_ef21_is_refused_by_ddp(group):
    model = ddp()
    ef21.register(model, ef21.EF21State())
    with pytest.raises(RuntimeError, match="can only be called once"):
        model.register_comm_hook(None, noop_hook)


def test_register_after_a_python_hook(group):
    model = ddp()
    model.register_comm_hook(None, noop_hook)
    state = ef21.EF21State()
    with raises_naming(RuntimeError, "already has a communication hook"):
        ef21.register(model, state)
    assert state._core is None  # refused before anything was bound: the state stays usable
    ef21.register(ddp(), state)


def test_register_after_a_builtin_hook(group):
    # DDP's built-in C++ hooks leave no trace in Python; the reducer itself refuses the second one.
    model = ddp()
    model._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    with pytest.raises(RuntimeError, match="can only be called once"):
        ef21.register(model, ef21.EF21State())


def test_register_after_ef21_hook_via_python_convention(group):
    model = ddp()
    model.register_comm_hook(ef21.EF21State(), ef21.hook)
    with raises_naming(RuntimeError, "already has a communication hook"):
        ef21.register(model, ef21.EF21State())


def test_register_rejects_ddp_mixed_precision(group, monkeypatch):
    if not torch.cuda.is_available():
        # DDP's mixed precision makes a side stream with torch.Stream(), which needs an accelerator;
        # the registration check only looks at the configuration, so any stand-in will do.
        monkeypatch.setattr(torch, "Stream", lambda *args, **kwargs: object())
    model = ddp(mixed_precision=_MixedPrecision(param_dtype=torch.float16))
    monkeypatch.undo()
    with raises_naming(ValueError, "mixed_precision", "torch.autocast"):
        ef21.register(model, ef21.EF21State())


def test_state_reused_for_a_second_model(group):
    state = ef21.EF21State()
    ef21.register(ddp(), state)
    with raises_naming(RuntimeError, "state is already in use by another model", "one EF21State per model"):
        ef21.register(ddp(), state)


def test_process_group_that_does_not_match(group):
    other = dist.new_group(ranks=[0])  # same ranks, yet another group: its collectives would not pair up
    try:
        state = ef21.EF21State(process_group=other)
        with raises_naming(ValueError, "state.process_group is not the process group of ddp_model",
                           "process_group=None"):
            ef21.register(ddp(), state)
        model = ddp(process_group=other)  # the same group on both sides is fine
        ef21.register(model, state)
        step(model)
    finally:
        dist.destroy_process_group(other)


def test_state_without_process_group_binds_the_model_group(group):
    state = ef21.EF21State()
    model = ddp()
    ef21.register(model, state)
    assert state.process_group is model.process_group



def test_state_shared_by_two_models_on_the_hook_path(group):
    state = ef21.EF21State(ratio=0.5)
    first, second = ddp(), ddp()
    first.register_comm_hook(state, ef21.hook)
    second.register_comm_hook(state, ef21.hook)
    step(first)
    step(first)  # the same model again is fine
    with pytest.raises(RuntimeError, match="already serves another model"):
        step(second)


# ----------------------------------------------------------------------------------------------
# Numbers of any type, k_for, stats before any traffic.


def test_numpy_numbers_are_numbers():
    np = pytest.importorskip("numpy")
    c = ef21.EF21State(algorithm="ef21-sgdm", compressor="randk", ratio=np.float32(0.25), k=np.int64(5),
                       momentum=np.float64(0.5), seed=np.int64(3)).config
    assert (c.ratio, c.k, c.momentum, c.seed) == (0.25, 5, 0.5, 3)
    assert all(type(v) in (int, float) for v in (c.ratio, c.k, c.momentum, c.seed))
    assert ef21.EF21State(check_every=np.int64(5)).check_every == 5


def test_a_setting_passed_as_the_process_group_says_so():
    with raises_naming(TypeError, "got float 0.1", "first positional argument", "EF21State(ratio=0.1)"):
        ef21.EF21State(0.1)


@pytest.mark.parametrize("args, named", [((100, 0), "ratio=0"), ((100, "0.1"), "ratio='0.1' is not a number"),
                                         ((100, 0.1, -3), "k=-3"), ((0, 0.5), "numel=0"),
                                         ((2.5, 0.5), "numel=2.5")])
def test_k_for_refuses_bad_arguments(args, named):
    with raises_naming(ValueError, named, "allowed"):
        ef21.k_for(*args)


def test_k_for_is_ceil_and_at_most_numel():
    assert [ef21.k_for(100, 0.1), ef21.k_for(101, 0.1), ef21.k_for(123, 4 / 123), ef21.k_for(100, 0.1, k=7),
            ef21.k_for(100, 0.1, k=1000), ef21.k_for(1, 1e-9)] == [10, 11, 4, 7, 100, 1]


def test_compression_is_one_while_nothing_was_sent(group):
    state = ef21.EF21State(ratio=0.5)
    assert state.stats()["compression"] == 1.0  # before registration
    model = ddp()
    ef21.register(model, state)
    step(model)
    step(model)
    assert state.stats()["bytes_sent"] == 0 and state.stats()["compression"] == 1.0  # one rank sends nothing


# ----------------------------------------------------------------------------------------------
# Checkpoint misuse, in one process (the multi-rank behaviour is in test_checkpoint.py).


def trained(hook="cpp", **kwargs):
    model, state = ddp(), ef21.EF21State(ratio=0.5, **kwargs)
    if hook == "cpp":
        ef21.register(model, state)
    else:
        model.register_comm_hook(state, ef21.hook)
    step(model)
    step(model)
    return model, state


def test_loading_something_else_is_refused_by_name(group):
    model, state = trained()
    with raises_naming(ValueError, "state_dict is not an EF21State.state_dict()", "'config'", "got ['bias', 'weight']"):
        state.load_state_dict(model.module.state_dict())
    with raises_naming(ValueError, "state_dict is not an EF21State.state_dict()", "got list"):
        state.load_state_dict([])


def test_a_refused_load_before_registration_leaves_the_state_free(group):
    _, saved = trained()
    fresh = ef21.EF21State(ratio=0.5)
    with raises_naming(RuntimeError, "no parameters to load into", "ef21.register(ddp_model, state) first"):
        fresh.load_state_dict(saved.state_dict())
    model = ddp()
    ef21.register(model, fresh)  # still free to register
    fresh.load_state_dict(saved.state_dict())


def test_loading_with_another_model_than_the_registered_one_is_refused(group):
    model, state = trained()
    with raises_naming(ValueError, "model is not the model this state is registered on"):
        state.load_state_dict(state.state_dict(), model=ddp())


def test_other_compressor_settings_load_with_a_warning(group):
    _, saved = trained()
    model = ddp()
    state = ef21.register(model, ef21.EF21State(ratio=0.25, value_dtype=torch.float16))
    with pytest.warns(UserWarning, match=r"ratio=0.5 -> 0.25.*value_dtype='torch.float32' -> 'torch.float16'"):
        state.load_state_dict(saved.state_dict())


def test_hook_path_checkpoints_need_the_model(group):
    model, state = trained(hook="python")
    with raises_naming(RuntimeError, "register_comm_hook(state, ef21.hook)", "pass model=ddp_model"):
        state.state_dict()
    sd = state.state_dict(model=model)
    assert [e["name"] for e in sd["params"]] == ["weight", "bias"]
    fresh_model, fresh = ddp(), ef21.EF21State(ratio=0.5)
    fresh_model.register_comm_hook(fresh, ef21.hook)
    fresh.load_state_dict(sd, model=fresh_model)  # before its first step, as on resume
    got = fresh.state_dict(model=fresh_model)
    for a, b in zip(sd["params"], got["params"]):
        assert a["name"] == b["name"] and torch.equal(a["g"], b["g"]) and torch.equal(a["state"], b["state"])
