r"""A plain-PyTorch specification of the ef21 hook, and the oracle its tests compare against.

:class:`Reference` simulates ``n`` ranks in one process. Each step it takes every rank's local
gradient of every parameter and the compression units (the parameters of each DDP bucket, in
buffer order), and returns what the hook hands back to DDP: the aggregated gradient every rank
receives. It uses dense tensor maths and ``torch.sort`` only, none of the extension's kernels
(Rand-k draws its support with ``ef21._C.randk_indices``, the one piece shared by definition).

Per compression unit of ``d`` elements, with ``k = k_for(d)`` (``d`` for ``compressor="identity"``)
and rank ``i`` of ``n``, an ordinary step is:

1. ``p_i`` by algorithm: ``ef21`` ``grad_i - g_i``; ``ef21-sgdm`` ``v_i = (1-eta) v_i + eta grad_i``
   then ``v_i - g_i``; ``ef`` ``grad_i + e_i``; ``plain`` ``grad_i``;
2. the support: Top-k of ``|p_i|`` (ties to the lower index), or Rand-k's support shared by all
   ranks, drawn from ``randk_seed(seed, step, bucket_index)``;
3. ``c_i = p_i`` on the support rounded to ``value_dtype`` (the wire dtype), 0 elsewhere; the
   rounded values are what every rank receives, so the state update uses them too;
4. the state: ``g_i += c_i`` (ef21, ef21-sgdm), ``e_i = p_i - c_i`` (ef);
5. ``out += c_j / n`` for ``j = 0 .. n-1`` in rank order, where ``out`` is the shared ``g``
   (ef21, ef21-sgdm) or zero (ef, plain);
6. return ``out`` in the bucket's dtype.

``dense`` returns the mean gradient. For ef21 and ef21-sgdm, a unit holding a parameter not yet
initialised is (re)initialised as a whole instead of taking an ordinary step:

* ``init="full"``: ``g_i = v_i = grad_i``, ``g = mean_i grad_i``; return ``g``;
* ``init="compressed"``: ``g_i = g = 0``, ``v_i = grad_i``, then an ordinary step (so ``g_i = C(grad_i)``);
* ``init="zero"``: ``g_i = g = v_i = 0``; return zeros.

State is kept per parameter, in float32 (float64 for float64 gradients), so units may change
between steps (DDP rebuilds its buckets after the first iteration). Rounding follows the kernels
(one rounding per elementary operation, no fused multiply-add), so on a sparse step the
reference and the hook agree to the last bit; dense collectives sum in the transport's own order.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import torch

from ef21.config import Config

_MASK64 = (1 << 64) - 1


def _splitmix64(s: int) -> tuple[int, int]:
    """One step of splitmix64 on a 64-bit state: ``(new state, output)``."""
    s = (s + 0x9E3779B97F4A7C15) & _MASK64
    z = s
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return s, z ^ (z >> 31)


def randk_seed(seed: int, step: int, bucket: int) -> int:
    """The Rand-k seed of one (user seed, synced step, bucket index): the same on every rank."""
    s = (seed ^ ((step * 0xD1B54A32D192ED03) & _MASK64) ^ ((bucket * 0xABC98388FB8FAC03) & _MASK64)) & _MASK64
    return _splitmix64(s)[1]


def randk_support(d: int, k: int, seed: int) -> torch.Tensor:
    """Rand-k's support: ``k`` distinct indices in ``[0, d)``, ascending (int64)."""
    from ef21 import _C

    return _C.randk_indices(d, k, seed).long()


def k_for(numel: int, ratio: float, k: int | None = None) -> int:
    """``max(1, ceil(ratio * numel))``, the product snapped to an integer within float rounding of
    it (4/123 of 123 is 4), or the explicit ``k``; at most ``numel``."""
    if k:
        return max(1, min(k, numel))
    x = ratio * numel
    nearest = round(x)
    kk = nearest if abs(x - nearest) <= 1e-9 * max(1.0, x) else math.ceil(x)
    return max(1, min(int(kk), numel))


def topk_support(p: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``|p|``, ties to the lower index, ascending (int64)."""
    order = torch.sort(p.abs(), descending=True, stable=True).indices  # stable: equal |p| keep index order
    return order[:k].sort().values


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype state is kept in for gradients of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Reference:
    """``n`` ranks of the ef21 hook simulated in one process.

    Takes the same arguments as :class:`ef21.EF21State` (less the process group) and the number
    of ranks. :meth:`step` runs one synced step.

    Example::
        >>> ref = Reference(3, ratio=0.1)
        >>> out = ref.step([["w", "b"]], {"w": [w0, w1, w2], "b": [b0, b1, b2]})
        >>> out["w"]  # what every rank's hook hands back for w
    """

    def __init__(self, world_size: int, algorithm="ef21", compressor="topk", ratio=0.01, k=None, momentum=0.1,
                 init="full", value_dtype=None, seed=0):
        self.n = int(world_size)
        self.config = Config.make(algorithm=algorithm, compressor=compressor, ratio=ratio, k=k,
                                  momentum=momentum, init=init, value_dtype=value_dtype, seed=seed)
        self.steps = 0
        # Per parameter key: "g_i", "v_i", "e_i" (lists by rank), "g", "initialized".
        self.state: dict[Hashable, dict] = {}

    def step(self, units: Sequence[Sequence[Hashable]] | Mapping[int, Sequence[Hashable]],
             grads: Mapping[Hashable, Sequence[torch.Tensor]]) -> dict[Hashable, torch.Tensor]:
        """One synced step.

        Args:
            units: the parameter keys of each compression unit, in buffer order: a list (the
                position is the bucket index) or a dict ``{bucket index: keys}``.
            grads: for each key, the ``n`` local gradients (rank order), all of one dtype per unit.

        Returns:
            for each key of ``units``, the aggregated gradient (the grad's shape and dtype).
        """
        items = units.items() if isinstance(units, Mapping) else enumerate(units)
        out: dict[Hashable, torch.Tensor] = {}
        for bucket, keys in items:
            keys = list(keys)
            sizes = [grads[key][0].numel() for key in keys]
            flat = [torch.cat([grads[key][r].reshape(-1) for key in keys]) for r in range(self.n)]
            result = self._unit(int(bucket), keys, sizes, flat)
            offset = 0
            for key in keys:
                like = grads[key][0]
                out[key] = result[offset:offset + like.numel()].view(like.shape).clone()
                offset += like.numel()
        self.steps += 1
        return out

    # -- one compression unit -------------------------------------------------------------------

    def _unit(self, bucket: int, keys: list, sizes: list[int], grads: list[torch.Tensor]) -> torch.Tensor:
        cfg, n = self.config, self.n
        dtype = grads[0].dtype
        sdt = state_dtype(dtype)
        d = grads[0].numel()
        if cfg.algorithm == "dense":
            return (torch.stack([g.double() for g in grads]).sum(0) / n).to(dtype)

        st = {name: self._gather(keys, sizes, name, sdt) for name in ("g_i", "v_i", "e_i")}
        g = self._gather(keys, sizes, "g", sdt, per_rank=False)
        estimate = cfg.algorithm in ("ef21", "ef21-sgdm")
        local = [x.to(sdt) for x in grads]

        if estimate and not all(self.state.get(key, {}).get("initialized", False) for key in keys):
            zero = torch.zeros(d, dtype=sdt)
            if cfg.init == "zero":
                st["g_i"] = [zero.clone() for _ in range(n)]
                st["v_i"] = [zero.clone() for _ in range(n)]
                self._scatter(keys, sizes, st, zero)
                return zero.to(dtype)
            if cfg.init == "full":
                st["g_i"] = [x.clone() for x in local]
                st["v_i"] = [x.clone() for x in local]
                g = torch.stack(local).sum(0) * (1.0 / n)
                self._scatter(keys, sizes, st, g)
                return g.to(dtype)
            st["g_i"] = [zero.clone() for _ in range(n)]  # "compressed": g_i = g = 0, then an ordinary step
            st["v_i"] = [x.clone() for x in local]
            g = zero.clone()

        k = d if cfg.compressor == "identity" else k_for(d, cfg.ratio, cfg.k)
        shared = None
        if cfg.compressor == "randk":
            shared = randk_support(d, k, randk_seed(cfg.seed, self.steps, bucket))
        elif cfg.compressor == "identity":
            shared = torch.arange(d)
        eta = torch.tensor(cfg.momentum, dtype=sdt)
        messages = []
        for r in range(n):
            if cfg.algorithm == "ef21":
                p = local[r] - st["g_i"][r]
            elif cfg.algorithm == "ef21-sgdm":
                st["v_i"][r] = st["v_i"][r] * (1 - eta) + local[r] * eta
                p = st["v_i"][r] - st["g_i"][r]
            elif cfg.algorithm == "ef":
                p = st["e_i"][r] + local[r]
            else:
                p = local[r]
            idx = shared if shared is not None else topk_support(p, k)
            c = torch.zeros(d, dtype=sdt)
            c[idx] = p[idx].to(cfg.value_dtype).to(sdt)
            if estimate:
                st["g_i"][r] = st["g_i"][r] + c
            elif cfg.algorithm == "ef":
                st["e_i"][r] = p - c
            messages.append((idx, c[idx]))

        out = g if estimate else torch.zeros(d, dtype=sdt)
        scale = torch.tensor(1.0 / n, dtype=sdt)
        for idx, values in messages:  # rank order, as every rank applies them
            out[idx] = out[idx] + values * scale
        self._scatter(keys, sizes, st, out if estimate else None)
        return out.to(dtype)

    # -- per-parameter state <-> flat unit --------------------------------------------------------

    def _gather(self, keys, sizes, name, sdt, per_rank=True):
        """The flat ``name`` of a unit: its parameters' slices end to end, zeros where none is kept yet."""
        parts = []
        for key, size in zip(keys, sizes):
            kept = self.state.get(key, {}).get(name)
            if kept is None:
                kept = [torch.zeros(size, dtype=sdt)] * self.n if per_rank else torch.zeros(size, dtype=sdt)
            parts.append(kept)
        if per_rank:
            return [torch.cat([part[r] for part in parts]) for r in range(self.n)]
        return torch.cat(parts)

    def _scatter(self, keys, sizes, st, g):
        """Stores a unit's flat state back per parameter and marks its parameters initialised."""
        offset = 0
        for key, size in zip(keys, sizes):
            entry = self.state.setdefault(key, {})
            for name, flat in st.items():
                entry[name] = [x[offset:offset + size].clone() for x in flat]
            if g is not None:
                entry["g"] = g[offset:offset + size].clone()
            entry["initialized"] = True
            offset += size
