"""What this ef21 build contains: ``python -m ef21.info``.

Prints the torch and CUDA versions, whether the extension was compiled with its CUDA kernels, and,
asking torch's dispatcher, which ef21 operators have a CPU and a CUDA kernel registered.
"""

from __future__ import annotations

import platform

import torch

OPS = ("topk_abs", "compress_", "commit_", "aggregate_", "all_finite_", "rescale_")
KEYS = ("CPU", "CUDA")


def kernels() -> dict[str, dict[str, bool]]:
    """``{op: {dispatch key: has a kernel}}`` for every ef21 operator."""
    import ef21  # noqa: F401  (loading the extension registers the operators)

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {op: {key: has(f"ef21::{op}", key) for key in KEYS} for op in OPS}


def summary() -> str:
    import ef21

    lines = [
        f"ef21             {ef21.__version__} ({ef21._C.__file__})",
        f"python           {platform.python_version()}",
        f"torch            {torch.__version__}",
        f"torch CUDA       {torch.version.cuda or 'none (CPU build)'}",
        f"CUDA available   {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        f"built with CUDA  {ef21._C.built_with_cuda()}",
        (f"backends         gloo={torch.distributed.is_gloo_available()} "
         f"nccl={torch.distributed.is_nccl_available()}"),
        "",
        f"{'operator':<20}" + "".join(f"{key:<6}" for key in KEYS),
    ]
    for op, row in kernels().items():
        lines.append(f"{'ef21::' + op:<20}" + "".join(f"{'yes' if row[key] else '-':<6}" for key in KEYS))
    return "\n".join(line.rstrip() for line in lines)


if __name__ == "__main__":
    print(summary())
