"""The two ways to attach EF21 to a DDP model; both run the same C++ core."""

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ef21.state import EF21State


def register(ddp_model: DistributedDataParallel, state: EF21State) -> EF21State:
    """Registers EF21 as ``ddp_model``'s communication hook, in C++ on DDP's reducer.

    Call it once. Registering after training has started is fine: the hook's first step
    initialises EF21 as ``init`` says (``"full"``: one dense step), as in a fresh run. Refuses
    sparse gradients (``nn.Embedding(sparse=True)``) and complex parameters, by name. Returns
    ``state``.

    Example::
        >>> model = DistributedDataParallel(net)
        >>> state = ef21.register(model, ef21.EF21State(ratio=0.01))
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, "
                        f"got {type(ddp_model).__name__}")
    if not isinstance(state, EF21State):
        raise TypeError(f"state must be an ef21.EF21State, got {type(state).__name__}")
    if getattr(ddp_model, "mixed_precision", None) is not None:
        raise ValueError("ddp_model was built with DDP's mixed_precision=..., which installs its own comm "
                         "hook; build it without mixed_precision (use torch.autocast) to use ef21")
    if getattr(ddp_model, "skip_all_reduce_unused_params", False):
        raise ValueError("ddp_model was built with skip_all_reduce_unused_params=True, so DDP may skip "
                         "buckets; ef21 hands DDP a step's results once its last bucket is in: build it "
                         "without")
    if getattr(ddp_model, "_use_python_reducer", False):
        raise ValueError("ddp_model uses the Python reducer (compiled autograd DDP); ef21 needs the C++ reducer")
    if getattr(ddp_model, "_ef21_state", None) is not None or getattr(ddp_model, "_comm_hooks", None):
        raise RuntimeError("ddp_model already has a communication hook; DDP allows one per model")
    if state._core is not None:
        raise RuntimeError("state is already in use by another model; create one EF21State per model")
    if state.process_group is not None and state.process_group is not ddp_model.process_group:
        raise ValueError("state.process_group is not the process group of ddp_model; pass process_group=None "
                         "to use the model's group")
    _check_parameters(ddp_model)
    _check_same_settings(ddp_model, state)
    from ef21 import _C

    core = state._bind(ddp_model.process_group)
    try:
        _C.register_comm_hook(ddp_model.reducer, core)
    except RuntimeError as e:  # e.g. a built-in hook registered before: leave the state reusable
        state._core = None
        raise RuntimeError(f"ddp_model already has a communication hook; DDP allows one per model ({e})") from e
    named = [(name, p) for name, p in ddp_model.module.named_parameters() if p.requires_grad]
    state._names = {id(p): name for name, p in named}
    state._params = [p for _, p in named]
    ddp_model._ef21_state = state
    if named:
        state._attach_loss_scale(named[0][1].device)
    if getattr(ddp_model, "logger", None) is not None:
        ddp_model.logger._set_comm_hook_name("ef21")
    return state


def _settings(state: EF21State) -> dict:
    """What every rank must agree on: a rank that differs would send messages of another size or
    run collectives the others do not, and every rank would block until the group's timeout."""
    c = state.config
    settings = {**c.to_dict(), "check_every": state.check_every,
                "grad_scaler": state.grad_scaler is not None}
    if c.compressor != "randk":
        del settings["seed"]  # only Rand-k's shared support uses it
    if c.algorithm != "ef21-sgdm":
        del settings["momentum"]
    return settings


def _check_same_settings(ddp_model: DistributedDataParallel, state: EF21State) -> None:
    """Refuses, on every rank, settings that differ across the model's ranks (one small
    all_gather_object at registration, in place of a hang at the first step)."""
    group = ddp_model.process_group
    world = dist.get_world_size(group)
    if world == 1:
        return
    gathered = [None] * world
    device = next((p.device for p in ddp_model.parameters()), None)
    # NCCL gathers objects on the current CUDA device: make it the model's.
    on_device = torch.cuda.device(device) if device is not None and device.type == "cuda" else nullcontext()
    with on_device:
        dist.all_gather_object(gathered, _settings(state), group=group)
    differ = [key for key in gathered[0] if any(g.get(key) != gathered[0][key] for g in gathered)]
    if differ:
        lines = "; ".join(f"{key}: " + ", ".join(f"rank {r} {g.get(key)!r}" for r, g in enumerate(gathered))
                          for key in differ)
        raise ValueError(f"ef21: the ranks were given different EF21State settings ({lines}); every rank "
                         "must use the same ones")


def hook(state: EF21State, bucket: dist.GradBucket):
    """EF21 as a Python-callable hook: ``ddp_model.register_comm_hook(state, ef21.hook)``.

    The same C++ maths as :func:`register`, for launchers and wrappers that take a hook callable
    (e.g. Lightning's ``DDPStrategy(ddp_comm_hook=...)``). Returns a ``torch.futures.Future``.
    A hook cannot see the model's process group: when the model was built with
    ``process_group=...``, pass the same group to :class:`EF21State`; ``None`` means the default group.
    """
    core = state._bind()
    _check_one_model(state, bucket)
    if not state._scale_attached:
        state._attach_loss_scale()
    # PyTorch's Python hook path takes the result as a Python object, hence the unwrapping step.
    return core.run(bucket).then(_value)


def _check_one_model(state: EF21State, bucket) -> None:
    """Refuses a state shared by two models: their buckets would mix in one state."""
    ids = {id(p) for p in bucket.parameters()}
    if state._hook_params_complete:
        if not ids <= state._hook_params:
            raise RuntimeError("ef21: this EF21State already serves another model; create one EF21State per model")
        return
    state._hook_params |= ids
    state._hook_params_complete = bucket.is_last()


def _check_parameters(ddp_model: DistributedDataParallel) -> None:
    """Refuses, by name, what the hook cannot compress: sparse and complex gradients."""
    for name, module in ddp_model.module.named_modules():
        # The modules DDP itself expects sparse gradients from.
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse and any(
                p.requires_grad for p in module.parameters(recurse=False)):
            kind = type(module).__name__
            raise ValueError(f"module {name or kind!r} ({kind}(sparse=True)) produces sparse gradients; "
                             "ef21 compresses dense gradients: build it with sparse=False")
    for name, p in ddp_model.module.named_parameters():
        if p.requires_grad and p.is_complex():
            raise ValueError(f"parameter {name!r} is complex ({p.dtype}); ef21 compresses real gradients: "
                             "keep it as a real tensor with a last dimension of 2 and view it with "
                             "torch.view_as_complex in forward")


def _value(fut):
    return fut.value()
