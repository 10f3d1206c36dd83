"""Fast backends for :func:`littlebit.op.littlebit_linear`, registered per device by ``register()``.

- ``triton`` (``triton_littlebit``): CUDA tensors in fp16/bf16, any number of tokens, where Triton and a
  GPU are present. The kernel module is only imported then, so machines without either never touch it.
- ``cpu-lut`` (``cpu_lut``): CPU tensors with up to 16 tokens (decoding).
- ``cpu-gemm`` (``cpu_gemm``): CPU tensors with more tokens (prompts, evaluation): factors expanded per
  call with the scales folded in, two GEMMs.
"""

from __future__ import annotations

import importlib.util

import torch

from littlebit.kernels.cpu import gemm as cpu_gemm
from littlebit.kernels.cpu import lut as cpu_lut
from littlebit.op import register_backend


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def tile_order_pays(u_signs: torch.Tensor, dtype: torch.dtype) -> bool:
    """The GPU kernels read these S_U words faster in tile order (``packing.tile_order``) at batch 1."""
    if not (u_signs.is_cuda and triton_available()):
        return False
    from littlebit.kernels.gpu import triton_littlebit

    return triton_littlebit.tile_order_pays(u_signs, dtype)


def register() -> list[str]:
    """Register every backend usable here; returns their names. Safe to call again."""
    names = []
    if triton_available():
        from littlebit.kernels.gpu import triton_littlebit

        register_backend(
            "triton",
            "cuda",
            triton_littlebit.littlebit_linear_triton,
            triton_littlebit.accepts,
            grouped=True,
            tiled=True,
        )
        names.append("triton")
    register_backend("cpu-lut", "cpu", cpu_lut.littlebit_linear_cpu_lut, cpu_lut.accepts)
    names.append("cpu-lut")
    register_backend("cpu-gemm", "cpu", cpu_gemm.littlebit_linear_cpu_gemm, cpu_gemm.accepts)
    names.append("cpu-gemm")
    return names
