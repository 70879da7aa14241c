"""EF21State: the configuration, the per-parameter state and the statistics of one hook."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ef21.config import Config


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
        value_dtype: wire dtype of values, ``None`` (float32), ``torch.bfloat16`` or ``torch.float16``.
        seed: seed of Rand-k's shared support.

    Example::
        >>> state = ef21.EF21State(ratio=0.01)
        >>> ef21.register(ddp_model, state)
        >>> # ... train as usual ...
        >>> state.stats()["compression"]
    """

    def __init__(self, process_group=None, algorithm="ef21", compressor="topk", ratio=0.01, k=None,
                 momentum=0.1, init="full", value_dtype=None, seed=0):
        self.config = Config.make(algorithm=algorithm, compressor=compressor, ratio=ratio, k=k,
                                  momentum=momentum, init=init, value_dtype=value_dtype, seed=seed)
        self.process_group = process_group
        self._core = None
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
        return self._core

    def stats(self) -> dict:
        """Counters since the start (or :meth:`reset_stats`), for this rank.

        ``steps`` synced steps; ``bytes_sent`` bytes this rank sent (ring-algorithm counts: an
        allgather of m bytes sends (n-1)·m, an allreduce of m bytes 2·(n-1)/n·m);
        ``dense_bytes`` what DDP's dense allreduce of the same buckets would have sent;
        ``compression`` their ratio; ``sparse_buckets`` / ``dense_buckets`` / ``init_buckets`` how
        each bucket travelled; ``hook_seconds`` wall time spent in the hook and its callbacks.
        """
        if self._core is None:
            return {"steps": 0, "hook_calls": 0, "bytes_sent": 0, "dense_bytes": 0, "compression": 0.0,
                    "sparse_buckets": 0, "dense_buckets": 0, "init_buckets": 0, "hook_seconds": 0.0}
        s = self._core.stats()
        return {k: (v if k in ("compression", "hook_seconds") else int(v)) for k, v in s.items()}

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
        core = self._core
        return [] if core is None else [(f"param{i}", p) for i, p in enumerate(core.params())]

    def state_dict(self) -> dict:
        """This rank's state (``g_i`` differs per rank, so save one per rank), with the layout it
        belongs to: world size, rank, configuration, and each parameter's name and shape."""
        core = self._core
        params = []
        for name, p in self._named_params():
            entry = {"name": name, "shape": tuple(p.shape)}
            if core is not None and any(q is p for q in core.params()):
                entry.update(core.param_state(p))
            else:
                entry["initialized"] = False
            params.append(entry)
        return {
            "config": {**self.config.__dict__, "value_dtype": str(self.config.value_dtype)},
            "world_size": None if core is None else core.world_size,
            "rank": None if core is None else core.rank,
            "steps": 0 if core is None else core.steps,
            "params": params,
        }

    def load_state_dict(self, state_dict: dict, model=None) -> None:
        """Restores :meth:`state_dict` on the same rank of a job of the same shape.

        Call it after :func:`ef21.register` (or pass the DDP ``model`` when the hook was registered
        with ``ddp_model.register_comm_hook(state, ef21.hook)``). Refuses a different world size,
        rank, algorithm or parameter layout, saying what differs. When per-rank state is lost, skip
        loading instead: the next step re-initialises EF21 with one dense step (``init="full"``).
        """
        core = self._bind()
        mine = {**self.config.__dict__, "value_dtype": str(self.config.value_dtype)}
        for key in ("algorithm", "compressor"):
            if state_dict["config"][key] != mine[key]:
                raise ValueError(f"ef21: checkpoint has {key}={state_dict['config'][key]!r}, this state has "
                                 f"{key}={mine[key]!r}")
        for key, here in (("world_size", core.world_size), ("rank", core.rank)):
            if state_dict[key] != here:
                raise ValueError(f"ef21: checkpoint was saved with {key}={state_dict[key]}, this process has "
                                 f"{key}={here}; EF21 state is per rank")
        named = self._named_params(model)
        if not named:
            raise RuntimeError("ef21: no parameters to load into; call ef21.register(ddp_model, state) first, "
                               "or pass model=ddp_model")
        saved = [(e["name"], tuple(e["shape"])) for e in state_dict["params"]]
        here = [(n, tuple(p.shape)) for n, p in named]
        if saved != here:
            diff = sorted(set(saved) ^ set(here))[:5]
            raise ValueError(f"ef21: checkpoint parameter layout differs from the model's "
                             f"({len(saved)} vs {len(here)} parameters; first differences: {diff})")
        for entry, (_, p) in zip(state_dict["params"], named):
            core.set_param_state(p, entry.get("state"), entry.get("aux"), entry.get("g"),
                                 bool(entry.get("initialized", False)))
        core.steps = int(state_dict["steps"])
