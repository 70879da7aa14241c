"""EF21State: the configuration, the per-parameter state and the statistics of one hook."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ef21.config import Config, _integer


class EF21State:
    r"""State of the EF21 communication hook for one DDP model (one per rank).

    EF21 (Richtárik, Sokolov, Fatkhullin, 2021, arXiv:2106.05203) on each synced step, per
    compression unit (a DDP bucket) and rank ``i`` of ``n``:

    1. ``c_i = C(grad_i - g_i)``: Top-k (or Rand-k) of the difference, the only thing sent;
    2. ``g_i += c_i``;
    3. ``g += (1/n) * sum_j c_j``, every rank applying the same messages in the same order;
    4. ``g`` becomes ``.grad`` and the user's optimizer steps on it.

    The first step is a dense allreduce that sets ``g_i = grad_i`` and ``g = mean(grad)``
    (``init="full"``). ``algorithm`` also offers ``"ef21-sgdm"`` (local momentum
    ``v_i = (1-momentum) v_i + momentum grad_i`` before EF21), classic error feedback ``"ef"``,
    ``"plain"`` compression without feedback and ``"dense"`` allreduce.

    Args:
        process_group: the group to communicate in; ``None`` uses the DDP model's group with
            :func:`ef21.register`, and the default group with ``ef21.hook`` (a hook cannot see
            the model's group: pass it when the model uses a subgroup).
        algorithm: ``"ef21"`` | ``"ef21-sgdm"`` | ``"ef"`` | ``"plain"`` | ``"dense"``.
        compressor: ``"topk"`` | ``"randk"`` (support drawn from ``seed``, the same on every rank,
            so only values travel) | ``"identity"``.
        ratio: fraction of each bucket's elements sent, ``0 < ratio <= 1``.
        k: an exact count per bucket instead of ``ratio``.
        momentum: ``eta`` of ``"ef21-sgdm"``, ``0 < momentum <= 1``.
        init: ``"full"`` | ``"compressed"`` | ``"zero"``, how ``g_i`` and ``g`` start.
        value_dtype: wire dtype of values, ``None`` (float32), ``torch.float32``, ``torch.bfloat16``,
            ``torch.float16`` or ``torch.float64`` (or the names ``"bf16"``, ``"fp16"``, ...).
        seed: seed of Rand-k's shared support.
        grad_scaler: the ``torch.amp.GradScaler`` of the training loop, if any. The state is kept
            in scaled-gradient units and follows the loss scale when the scaler changes it (see
            below).
        check_every: every this many synced steps, check that the shared ``g`` is bitwise
            identical on every rank and raise, naming the step and the ranks, if not; ``0`` never.

    Non-finite gradients never reach the state. A rank whose gradient overflowed sends inf/NaN
    (Top-k selects them first; Rand-k sends NaN), every rank sees it in what it receives, and
    every rank then leaves its state as it was and hands DDP NaN, so every ``GradScaler`` skips the
    step. The state is only updated once every rank's message is known to be finite (the check
    and the update run on the device: no host synchronisation on CUDA).

    With ``grad_scaler``, the core reads the scaler's scale tensor (which the scaler updates in
    place) on the device at each step; when it differs from the scale the state was kept in,
    the state is multiplied by the ratio (a power of two: exact). Checkpoints hold unscaled state.

    Example::
        >>> state = ef21.EF21State(ratio=0.01)
        >>> ef21.register(ddp_model, state)
        >>> # ... train as usual ...
        >>> state.stats()["compression"]
    """

    def __init__(self, process_group=None, algorithm="ef21", compressor="topk", ratio=0.01, k=None,
                 momentum=0.1, init="full", value_dtype=None, seed=0, grad_scaler=None, check_every=0):
        self.config = Config.make(algorithm=algorithm, compressor=compressor, ratio=ratio, k=k,
                                  momentum=momentum, init=init, value_dtype=value_dtype, seed=seed)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, "
                            f"got {type(grad_scaler).__name__}")
        every = _integer(check_every)
        if every is None or every < 0:
            raise ValueError(f"check_every={check_every!r} is not allowed; "
                             "allowed: an integer >= 0 (0: never)")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            hint = ("; it is EF21State's first positional argument: pass the settings by keyword, "
                    f"e.g. EF21State(ratio={process_group!r})") if isinstance(process_group, (int, float)) else ""
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__} {process_group!r}{hint}")
        self.process_group = process_group
        self.grad_scaler = grad_scaler
        self.check_every = every
        self._core = None
        self._scale_attached = False
        self._hook_params: set[int] = set()  # ids of the parameters ef21.hook has seen (one model)
        self._hook_params_complete = False
        self._names: dict[int, str] = {}  # id(param) -> name, set by ef21.register
        self._params: list[torch.Tensor] = []

    def __repr__(self) -> str:
        return f"EF21State({self.config})"

    def _bind(self, process_group=None):
        """The C++ core, created on first use (it needs the process group's size and rank)."""
        if self._core is None:
            from ef21 import _C

            group = self.process_group or process_group
            if group is None:
                if not dist.is_initialized():
                    raise RuntimeError("ef21: torch.distributed is not initialised; call "
                                       "torch.distributed.init_process_group() before training")
                group = dist.distributed_c10d._get_default_group()
            self.process_group = group
            c = self.config
            self._core = _C.Core(group, c.algorithm, c.compressor, c.ratio, c.k or 0, c.momentum, c.init,
                                 c.value_dtype, c.seed)
            self._core.check_every = self.check_every
        return self._core

    def _attach_loss_scale(self, device=None) -> None:
        """Hands the core the GradScaler's scale tensor, once it exists (the scaler makes it at its
        first ``scale()``; given the model's ``device``, this makes it now)."""
        scaler = self.grad_scaler
        if scaler is None or self._scale_attached or not scaler.is_enabled():
            return
        # GradScaler keeps the scale in one tensor that update() and load_state_dict() change in
        # place; _get_scale_async() returns it without a host synchronisation.
        scale = scaler._get_scale_async()
        if scale is None and device is not None:
            scaler.scale(torch.zeros((), device=device))  # its public way to create the scale
            scale = scaler._get_scale_async()
        if scale is not None:
            self._bind().set_loss_scale(scale)
            self._scale_attached = True

    def stats(self) -> dict:
        """Counters since the start (or :meth:`reset_stats`), for this rank.

        ``steps`` synced steps; ``bytes_sent`` bytes this rank sent (ring-algorithm counts: an
        allgather of m bytes sends (n-1)·m, an allreduce of m bytes 2·(n-1)/n·m);
        ``dense_bytes`` what DDP's dense allreduce of the same buckets would have sent;
        ``compression`` their ratio (1.0 while nothing was sent, e.g. with one rank);
        ``sparse_buckets`` / ``dense_buckets`` / ``init_buckets`` how each bucket travelled;
        ``hook_seconds`` wall time spent in the hook and its callbacks.
        """
        if self._core is None:
            return {"steps": 0, "hook_calls": 0, "bytes_sent": 0, "dense_bytes": 0, "compression": 1.0,
                    "sparse_buckets": 0, "dense_buckets": 0, "init_buckets": 0, "hook_seconds": 0.0}
        s = self._core.stats()
        out = {k: (v if k in ("compression", "hook_seconds") else int(v)) for k, v in s.items()}
        if out["bytes_sent"] == 0:  # nothing sent yet, or a world of one rank: nothing was compressed
            out["compression"] = 1.0
        return out

    def reset_stats(self) -> None:
        if self._core is not None:
            self._core.reset_stats()

    def bucket_params(self) -> list[list[torch.Tensor]]:
        """The parameters of each DDP bucket (compression unit) as of the last step, in buffer order."""
        return [] if self._core is None else self._core.bucket_params()

    def _named_params(self, model=None) -> list[tuple[str, torch.Tensor]]:
        if model is not None:
            module = getattr(model, "module", model)
            return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if self._names:
            return [(self._names[id(p)], p) for p in self._params]
        if self._core is not None and self._core.params():
            # Attached with ddp_model.register_comm_hook(state, ef21.hook): the hook sees buckets, not
            # the model, so it knows no names to save the state under or match it by.
            raise RuntimeError("ef21: this state was attached with ddp_model.register_comm_hook(state, ef21.hook) "
                               "and does not know the parameters' names; pass model=ddp_model")
        return []

    def _kept(self) -> tuple[str, ...]:
        """The per-parameter tensors the algorithm keeps."""
        return {"ef21": ("state", "g"), "ef21-sgdm": ("state", "aux", "g"), "ef": ("state",)}.get(
            self.config.algorithm, ())

    def state_dict(self, model=None) -> dict:
        """This rank's state, with the layout it belongs to: save one per rank.

        ``g_i`` differs per rank, so each rank saves its own (``torch.save(state.state_dict(),
        f"ef21-rank{rank}.pt")``). The dict records the world size, the rank, the configuration, the
        step count, each parameter's name and shape with its tensors (in unscaled gradient units,
        zeros for parameters the hook has not seen yet, so the structure depends only on the model
        and the algorithm), and the compression units (parameter names of the DDP buckets as last
        rebuilt), so that a resumed run compresses exactly as the uninterrupted one would.

        With ``torch.distributed.checkpoint``, key it by rank (its planner keeps one copy of equal
        keys): ``dcp.save({f"ef21_rank{rank}": state.state_dict()}, ...)`` and load into the same
        structure from a registered state before calling :meth:`load_state_dict`.
        """
        core = self._core
        named = self._named_params(model)
        known = {id(p) for p in core.params()} if core is not None else set()
        params = []
        for name, p in named:
            entry = {"name": name, "shape": tuple(p.shape)}
            if id(p) in known:
                entry.update(core.param_state(p))
            else:
                entry["initialized"] = False
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            for key in self._kept():
                if key not in entry:
                    entry[key] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
            params.append(entry)
        name_of = {id(p): name for name, p in named}
        units = [] if core is None else [(index, [name_of[id(p)] for p in ps]) for index, ps in core.units()]
        return {
            "config": self.config.to_dict(),
            "world_size": None if core is None else core.world_size,
            "rank": None if core is None else core.rank,
            "steps": 0 if core is None else core.steps,
            "params": params,
            "units": units,
        }

    def load_state_dict(self, state_dict: dict, model=None) -> None:
        """Restores :meth:`state_dict` on the same rank of a job of the same shape.

        Call it on every rank, after :func:`ef21.register` (or pass the DDP ``model`` when the hook
        was registered with ``ddp_model.register_comm_hook(state, ef21.hook)``). Refuses a
        different world size, rank, algorithm, compressor or parameter layout, saying what differs.

        When per-rank state is lost, do not load it: a fresh state (or :meth:`reinitialize`)
        starts with one dense step (``init="full"``), a valid EF21 initialisation.
        """
        required = ("config", "world_size", "rank", "steps", "params")
        if not isinstance(state_dict, dict) or any(key not in state_dict for key in required):
            got = sorted(state_dict)[:5] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"ef21: state_dict is not an EF21State.state_dict() (it needs the keys "
                             f"{list(required)}, got {got})")
        if model is not None and self._names and any(
                id(p) not in self._names for p in model.parameters() if p.requires_grad):
            raise ValueError("ef21: model is not the model this state is registered on")
        # Checked before the core exists, so that a refused load leaves the state free to register.
        named = self._named_params(model)
        if not named:
            raise RuntimeError("ef21: no parameters to load into; call ef21.register(ddp_model, state) first, "
                               "or pass model=ddp_model")
        core = self._bind(getattr(model, "process_group", None))
        mine = self.config.to_dict()
        for key in ("algorithm", "compressor"):
            if state_dict["config"][key] != mine[key]:
                raise ValueError(f"ef21: checkpoint has {key}={state_dict['config'][key]!r}, this state has "
                                 f"{key}={mine[key]!r}")
        changed = [f"{key}={state_dict['config'].get(key)!r} -> {mine[key]!r}"
                   for key in ("ratio", "k", "momentum", "init", "value_dtype", "seed")
                   if state_dict["config"].get(key) != mine[key]]
        if changed:  # g_i stays a valid estimate under another compressor setting: allowed, but said
            warnings.warn(f"ef21: loading a checkpoint saved with other settings ({', '.join(changed)}); "
                          "the run continues from its state with this state's settings", stacklevel=2)
        for key, here in (("world_size", core.world_size), ("rank", core.rank)):
            if state_dict[key] != here:
                raise ValueError(f"ef21: checkpoint was saved with {key}={state_dict[key]}, this process has "
                                 f"{key}={here}; EF21 state is per rank")
        saved = [(e["name"], tuple(e["shape"])) for e in state_dict["params"]]
        here = [(n, tuple(p.shape)) for n, p in named]
        if saved != here:
            missing = [f"{n} {list(s)}" for n, s in saved if (n, s) not in here][:3]
            extra = [f"{n} {list(s)}" for n, s in here if (n, s) not in saved][:3]
            raise ValueError(f"ef21: checkpoint parameter layout differs from the model's ({len(saved)} vs "
                             f"{len(here)} parameters; only in the checkpoint: {missing or 'none'}; "
                             f"only in the model: {extra or 'none'}"
                             f"{'' if missing or extra else '; the order differs'})")
        by_name = dict(named)
        units = state_dict.get("units", [])
        core.set_units([(int(index), [by_name[n] for n in names]) for index, names in units])
        for entry, (_, p) in zip(state_dict["params"], named):
            core.set_param_state(p, entry.get("state"), entry.get("aux"), entry.get("g"),
                                 bool(entry.get("initialized", False)))
        core.steps = int(state_dict["steps"])

    def reinitialize(self) -> None:
        """Forgets ``g_i``, ``v``, ``e`` and ``g`` on this rank: the next synced step starts EF21
        again as ``init`` says (``"full"``: one dense step). Call it on every rank at the same
        step, e.g. when resuming a model without its per-rank EF21 state."""
        if self._core is not None:
            self._core.reinitialize()

    def check_replicas(self) -> None:
        """Raises, naming the ranks, if the shared ``g`` is not bitwise identical on every rank. A
        collective: call it on every rank at the same point (``check_every`` does it in the hook)."""
        core = self._bind()
        params = core.params()
        core.check_replicas(params[0].device if params else torch.device("cpu"))
