"""Configuration of an EF21 hook: validated once, here, with errors that name the argument."""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch

ALGORITHMS = ("ef21", "ef21-sgdm", "ef", "plain", "dense")
COMPRESSORS = ("topk", "randk", "identity")
INITS = ("full", "compressed", "zero")
VALUE_DTYPES = {None: torch.float32, torch.float32: torch.float32, torch.bfloat16: torch.bfloat16,
                torch.float16: torch.float16, "fp32": torch.float32, "float32": torch.float32,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, torch.float64: torch.float64, "fp64": torch.float64,
                "float64": torch.float64}


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


def _integer(x) -> int | None:
    """x as an int if it is an integer of any type (numpy's too), else None; bool is not one."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _check_fraction(name: str, x) -> None:
    """0 < x <= 1, for any real number type (numpy's too); bool is not a number here."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name}={x!r} is not a number; allowed: a number with 0 < {name} <= 1")
    if not (0 < x <= 1):
        raise ValueError(f"{name}={x!r} is out of range; allowed: a number with 0 < {name} <= 1")


@dataclass(frozen=True)
class Config:
    algorithm: str = "ef21"
    compressor: str = "topk"
    ratio: float = 0.01
    k: int | None = None
    momentum: float = 0.1
    init: str = "full"
    value_dtype: torch.dtype = torch.float32
    seed: int = 0

    def to_dict(self) -> dict:
        """The settings as plain values (the dtype by name), as checkpoints record them."""
        return {**self.__dict__, "value_dtype": str(self.value_dtype)}

    @staticmethod
    def make(algorithm="ef21", compressor="topk", ratio=0.01, k=None, momentum=0.1, init="full",
             value_dtype=None, seed=0) -> "Config":
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r} is not supported; allowed: {_allowed(ALGORITHMS)}")
        if compressor not in COMPRESSORS:
            raise ValueError(f"compressor={compressor!r} is not supported; allowed: {_allowed(COMPRESSORS)}")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not supported; allowed: {_allowed(INITS)}")
        _check_fraction("ratio", ratio)
        if k is not None:
            k_int = _integer(k)
            if k_int is None or k_int < 1:
                raise ValueError(f"k={k!r} is not allowed; allowed: None or an integer >= 1")
            k = k_int
        _check_fraction("momentum", momentum)
        try:
            vdtype = VALUE_DTYPES[value_dtype]
        except (KeyError, TypeError):
            raise ValueError(
                f"value_dtype={value_dtype!r} is not supported; allowed: None (float32), torch.float32, "
                "torch.bfloat16, torch.float16, torch.float64") from None
        seed_int = _integer(seed)
        if seed_int is None or not (0 <= seed_int < 2**63):
            raise ValueError(f"seed={seed!r} is not allowed; allowed: an integer with 0 <= seed < 2**63")
        return Config(algorithm, compressor, float(ratio), k, float(momentum), init, vdtype, seed_int)


def k_for(numel: int, ratio: float, k: int | None = None) -> int:
    """Elements sent per compression unit of ``numel`` elements: ``max(1, ceil(ratio * numel))``, or
    the explicit ``k``, at most ``numel``. The product is snapped to the nearest integer when it is
    within float rounding of it, so ratio = 4/123 on 123 elements gives 4, not 5."""
    from ef21 import _C

    numel_int = _integer(numel)
    if numel_int is None or numel_int < 1:
        raise ValueError(f"numel={numel!r} is not allowed; allowed: an integer >= 1")
    _check_fraction("ratio", ratio)
    k_int = 0 if k is None else _integer(k)
    if k_int is None or (k is not None and k_int < 1):
        raise ValueError(f"k={k!r} is not allowed; allowed: None or an integer >= 1")
    return _C.k_for(numel_int, float(ratio), k_int)
