"""The packed LittleBit product on the GPU (math and layout: ``littlebit.op``, ``littlebit.core.packing``).

Below ``KernelConfig.gemm_min_tokens`` tokens, signs are read as packed words and decoded in registers;
no unpacked matrix ever reaches memory. Such a call has two stages: stage 1 (t = l * S_V^T (g*x), g*x
built from x and g in the kernel or, on the prefill route, by a launch before it; split over d_in so
small ranks still fill the GPU) and stage 2
(y = sum_p h_p * S_U,p t_p + bias), each a launch, the second a programmatic dependent launch of the
first on sm_90+ (``_sync``). Which kernels run is ``route``'s policy, their tiles ``tiles``' rules,
their scratch memory ``workspace``'s; this module launches them:

- GEMV (``_gemv``, up to ``KernelConfig.gemv_max_tokens`` tokens): Triton stage 1 (fp32 atomics into
  a zero ``t``, or per-split partials summed by the last program of each row block), then the Triton
  stage 2, the fp16 tensor-core stage 2 (``cuda_mma``) or the bit-serial one (``cuda_bitserial``,
  whose stage 1 may be bit-serial too, ``_gemv_bitserial``);
- tensor cores (``_tensor_cores``, a few to 64 tokens): Triton ``tl.dot`` on signs decoded in registers;
- prefill (``prefill``, 65 tokens and more): the same decoding in GEMM-shaped tiles, no atomics;
- GEMMs (``gemm``, 128 tokens and more): the factors expanded per call, then cuBLAS.
"""

from __future__ import annotations

import functools

import torch

from littlebit.core.packing import untile_order
from littlebit.kernels.gpu import cuda_bitserial, cuda_mma
from littlebit.kernels.gpu._gemv import _gemv_u_kernel, _gemv_v_kernel
from littlebit.kernels.gpu._tensorcore import TL_DTYPES, _tc_u_kernel, _tc_v_kernel, sign_ones
from littlebit.kernels.gpu.config import DEFAULT_CONFIG, KernelConfig
from littlebit.kernels.gpu.gemm import gemm
from littlebit.kernels.gpu.prefill import prefill
from littlebit.kernels.gpu.route import (
    _BITSERIAL_RANK_WORDS,
    _BITSERIAL_STAGE1_WORDS,
    _BITSERIAL_WORDS,
    _MMA_WORDS,
    _asm,
    _interpreting,
    _pdl,
    _pdl_args,
    _reduce,
    _stage1_bitserial,
    _takes_tiled,
    _use_bitserial,
    _use_mma,
    kernel_family,
    tile_order_pays,
)
from littlebit.kernels.gpu.tiles import (
    _align4,
    _bit_tile,
    _bit_tile1,
    _mma_tile,
    _pow2_at_least,
    _row_tile,
    _split,
    _stage1_geometry,
    _stage2_tile,
    _tc_tile,
    cdiv,
)
from littlebit.kernels.gpu.workspace import _WORKSPACES, _ZERO_BLOCK, _workspace, _zeroed_on_error
from littlebit.op import group_layer

__all__ = [
    "DEFAULT_CONFIG",
    "KernelConfig",
    "accepts",
    "littlebit_linear_triton",
    "tile_order_pays",
]
# the policy, tile and workspace names tests and benchmarks reach through this module
_REEXPORTED = (
    _BITSERIAL_RANK_WORDS, _BITSERIAL_STAGE1_WORDS, _BITSERIAL_WORDS, _MMA_WORDS, _WORKSPACES, _row_tile,
    _split, _use_bitserial,
)  # fmt: skip


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _stage1_to_planes(x2, v, l, g, cfg: KernelConfig, sms: int) -> torch.Tensor | None:
    """One token: the Triton stage 1 ending in the bit planes of t that the bit-serial stage 2 reads
    (``_gemv._reduce_to_planes``), with no t in between. Returns the workspace slice that holds them
    (``cuda_bitserial.split_workspace``), or None, launching nothing, where its row blocks do not
    tile blocks of 256 rows."""
    P, r, W_in = v.shape
    W_r = cdiv(r, 32)
    b1, br, warps1, n_rb, chunk, n_split = _stage1_geometry(W_in, r, P, cfg, sms)
    if 256 % br:
        return None
    n_part = _align4(n_split * P * r)  # the bit planes after it stay 16-byte aligned
    ws = _workspace(x2.device, n_part + cuda_bitserial.workspace_floats(P, W_r), "reduce", P * n_rb)
    region = ws.t[n_part:]
    planes, scales = cuda_bitserial.split_workspace(region, P, W_r)
    ptx = x2.is_cuda and not _interpreting()
    _gemv_v_kernel[(P * n_rb, n_split)](
        x2, g, v, l, ws.t, ws.t, ws.t, ws.counter, 1, r, W_in, x2.shape[1], x2.stride(0), n_rb, chunk,
        32 * W_r, W_r,
        P=P, TOK=1, BR=br, B1=b1, MODE1=int(_asm(x2, cfg)), B2=1, MODE2=0, PTX=ptx,
        REDUCE=True, planes_ptr=planes, scales_ptr=scales, QUANT=True, num_warps=warps1, **_pdl_args(x2, cfg),
    )  # fmt: skip
    return region


def _gemv_bitserial(
    x2, u, v, h, l, g, bias, y, cfg: KernelConfig, sms: int, groups: int, u_tiled: bool = False
) -> None:
    """Batch 1, both stages bit-serial (``cuda_bitserial``): planes of x * g, t = l * S_V^T (x * g),
    planes of t, y = sum_p h_p * S_U,p t_p. By default stage 1 makes the planes of t itself
    (``cuda_bitserial.SelfQuantizing``): three launches, each a PDL dependent of the one before."""
    d_in = x2.shape[1]
    P, d_out, W_r = u.shape
    r, W_in = v.shape[1:]
    t_len = 32 * W_r
    n_t = _align4(P * t_len)
    n_x = _align4(cuda_bitserial.workspace_floats(P, W_in))
    n_floats = n_t + n_x + cuda_bitserial.workspace_floats(P, W_r)
    fuse = cfg.quantize_in_stage1 is not False
    if fuse:  # its tickets must be zero between calls
        ws = _workspace(x2.device, n_floats, "reduce", cuda_bitserial.counters_needed(P, r))
    else:
        ws = _workspace(x2.device, n_floats, "bits")
    t, x_planes, t_planes = ws.t[:n_t], ws.t[n_t : n_t + n_x], ws.t[n_t + n_x :]
    pdl = _pdl(x2, cfg)
    tile1 = _bit_tile1(cfg)
    t_ws = t_planes if fuse and cuda_bitserial.quantizes_output(tile1) else None
    fused = cuda_bitserial.SelfQuantizing(ws.counter, t_ws) if t_ws is not None else None
    cuda_bitserial.quantize(x2, x_planes, d_in, W_in, P, pdl, 0, g)
    cuda_bitserial.gemv(x_planes, v, l, None, t, W_in, 1, P, tile1, pdl, t_len, fused)
    if t_ws is None:
        cuda_bitserial.quantize(t, t_planes, r, W_r, P, pdl, t_len)
    tile = _bit_tile(d_out, W_r, groups, cfg, sms, u_tiled)
    cuda_bitserial.gemv(t_planes, u, h, bias, y, W_r, P // groups, groups, tile, pdl)


def _check(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor, h, l, g) -> None:
    if u_signs.dtype != torch.int32 or v_signs.dtype != torch.int32:
        raise TypeError("packed signs must be int32")
    P, d_out, r, d_in = u_signs.shape[0], h.shape[-1], l.shape[-1], g.shape[-1]
    if x.shape[-1] != d_in or v_signs.shape != (P, r, cdiv(d_in, 32)):
        raise ValueError(f"v_signs {tuple(v_signs.shape)} does not match d_in={d_in}, r={r}, P={P}")
    if u_signs.shape != (P, d_out, cdiv(r, 32)):
        raise ValueError(f"u_signs {tuple(u_signs.shape)} does not match d_out={d_out}, r={r}, P={P}")


def _gemv(
    x2, u, v, h, l, g, bias, y, cfg: KernelConfig, sms: int, groups: int = 1, u_tiled: bool = False
) -> None:
    M, d_in = x2.shape
    P, d_out, W_r = u.shape  # P: all paths of all ``groups`` layers (two launches only)
    r, W_in = v.shape[1:]
    ptx = x2.is_cuda and not _interpreting()
    asm = _asm(x2, cfg)
    mode1, mode2 = (1, 2) if asm else (0, 0)
    bits = ptx and _use_bitserial(x2, h, bias, cfg, d_out * W_r, W_r)
    stage1 = _stage1_bitserial(cfg, W_in)
    assert bits or not u_tiled, "tile-ordered signs go to the bit-serial stage 2 only"
    if bits and stage1 and g.dtype == h.dtype == l.dtype == x2.dtype:
        _gemv_bitserial(x2, u, v, h, l, g, bias, y, cfg, sms, groups, u_tiled)
        return
    fuse = bits and cfg.quantize_in_stage1 is not False
    planes = _stage1_to_planes(x2, v, l, g, cfg, sms) if fuse else None
    if planes is not None:
        tile = _bit_tile(d_out, W_r, groups, cfg, sms, u_tiled)
        cuda_bitserial.gemv(planes, u, h, bias, y, W_r, P // groups, groups, tile, _pdl(x2, cfg))
        return
    tok = _pow2_at_least(M)
    b1, br, warps1, n_rb, chunk, n_split = _stage1_geometry(W_in, r, P, cfg, sms)
    reduce = _reduce(cfg, W_r)
    b2, bo, warps2 = _stage2_tile(d_out, W_r, groups, cfg, sms, reduce)
    mma = not bits and ptx and _use_mma(x2, h, bias, cfg, asm, br, d_out * W_r)
    if mma:  # stage 1 writes t as the fp16 pairs the tensor-core stage 2 reads, a word's 16 contiguous
        b2, reduce = 1, True
    if bits:  # stage 1 writes t whole in fp32, one entry per bit, for the kernel that quantizes it
        b2, mode2, reduce = 1, 0, True
    t_len = cdiv(W_r, b2) * 32 * b2
    n_t = M * P * t_len
    if reduce:
        n_part = _align4(n_split * M * P * r)  # the bit planes after it stay 16-byte aligned
        n_bits = cuda_bitserial.workspace_floats(P, W_r) if bits else 0
        ws = _workspace(x2.device, n_t + n_part + n_bits, "reduce", P * n_rb)
        part = ws.t[n_t:]
        if mode2 == 2 and br % 32 == 0:  # stage 1 writes whole fp16x2 pairs: no packing in stage 2
            mode2 = 3
    else:
        ws = _workspace(x2.device, n_t)
        part = ws.t
    t_pairs = ws.t.view(torch.int32) if mode2 == 3 else ws.t  # stage 2's t: fp16x2 words or fp32
    pdl = _pdl_args(x2, cfg)
    with _zeroed_on_error(ws):
        _gemv_v_kernel[(P * n_rb, n_split)](
            x2, g, v, l, ws.t, t_pairs, part, ws.counter, M, r, W_in, d_in, x2.stride(0), n_rb, chunk, t_len,
            W_r,
            P=P, TOK=tok, BR=br, B1=b1, MODE1=mode1, B2=b2, MODE2=mode2, PTX=ptx, REDUCE=reduce,
            num_warps=warps1, **pdl,
        )  # fmt: skip
        if bits:
            planes = ws.t[n_t + n_part :]
            cuda_bitserial.quantize(ws.t, planes, r, W_r, P, pdl["PDL"], t_len)
            tile = _bit_tile(d_out, W_r, groups, cfg, sms, u_tiled)
            cuda_bitserial.gemv(planes, u, h, bias, y, W_r, P // groups, groups, tile, pdl["PDL"])
            return
        if mma:
            tile = _mma_tile(d_out, W_r, P // groups, groups, cfg, sms)
            cuda_mma.stage2(t_pairs, u, h, bias, y, W_r, t_len, P // groups, groups, tile, pdl["PDL"])
            return
        n_ob = cdiv(d_out, bo)
        _gemv_u_kernel[(groups * n_ob,)](
            t_pairs, ws.counter, u, h, y if bias is None else bias, y, M, d_out, W_r,
            y.stride(0), t_len, n_ob,
            P=P // groups, TOK=tok, BO=bo, B2=b2, MODE2=mode2, HAS_BIAS=bias is not None, PTX=ptx,
            ZB=_ZERO_BLOCK, G=groups, REDUCE=reduce, num_warps=warps2, **pdl,
        )  # fmt: skip


def _op_dtype(x2: torch.Tensor) -> torch.dtype:
    """The MMA operands' dtype. The interpreter rounds to bf16 by truncation, a bias that piles up over
    a sum; it computes the bf16 products in fp32 instead, which still checks everything but the rounding."""
    return torch.float32 if _interpreting() and x2.dtype == torch.bfloat16 else x2.dtype


def _tensor_cores(x2, u, v, h, l, g, bias, y, cfg: KernelConfig, sms: int, u_tiled: bool = False) -> None:
    M, d_in = x2.shape
    P, d_out, W_r = u.shape
    r, W_in = v.shape[1:]
    bm, n_mb, rows, words, chunk, n_split, bo = _tc_tile(M, r, W_in, d_out, P, cfg, sms)
    Rp = 32 * W_r
    op_dt = TL_DTYPES[_op_dtype(x2)]
    ones = sign_ones(op_dt)
    n_rb = cdiv(r, rows)
    ws = _workspace(x2.device, M * P * Rp)
    pdl = _pdl_args(x2, cfg)
    with _zeroed_on_error(ws):
        _tc_v_kernel[(P * n_rb, n_split, n_mb)](
            x2, g, v, l, ws.t, M, r, W_in, d_in, x2.stride(0), Rp, n_rb, chunk, ones,
            P=P, BR=rows, BKW=words, BM=bm, OP_DT=op_dt, num_warps=cfg.tc_warps, **pdl,
        )  # fmt: skip
        _tc_u_kernel[(cdiv(d_out, bo), n_mb)](
            ws.t, ws.counter, u, h, y if bias is None else bias, y, M, d_out, W_r, Rp, y.stride(0), ones,
            P=P, BO=bo, BKW=words, BM=bm, HAS_BIAS=bias is not None, OP_DT=op_dt,
            ZB=_ZERO_BLOCK, TILED=u_tiled, num_warps=cfg.tc_warps, **pdl,
        )  # fmt: skip


def littlebit_linear_triton(
    x: torch.Tensor,
    u_signs: torch.Tensor,
    v_signs: torch.Tensor,
    h: torch.Tensor,
    l: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    groups: int = 1,
    u_tiled: bool = False,
) -> torch.Tensor:
    """The packed product on the GPU (or on CPU tensors under ``TRITON_INTERPRET=1``); any token count.

    ``u_tiled``: ``u_signs`` in tile order (``packing.tile_order``), which the bit-serial stage 2 and
    the tensor-core path read as it is; the other one-token stage 2s take a transient row-ordered copy.

    ``groups`` > 1: that many layers of one shape on the same input, their tensors stacked along the
    path axis (``op.littlebit_linear``); their outputs come side by side. The GEMV runs them all
    in one pair of launches, the tensor-core and prefill paths one layer after another.
    """
    cfg = config or DEFAULT_CONFIG
    _check(x, u_signs, v_signs, h, l, g)
    if groups < 1 or u_signs.shape[0] % groups:
        raise ValueError(f"{u_signs.shape[0]} stacked paths do not split into {groups} layers")
    d_in, d_out = g.shape[-1], h.shape[-1]
    x2 = x.reshape(-1, d_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], groups * d_out), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        sms = 4 if _interpreting() or not x.is_cuda else _num_sms(x.device.index or 0)
        tensors = [t.contiguous() for t in (u_signs, v_signs, h, l, g)]
        b = bias.contiguous() if bias is not None else None
        family = kernel_family(x2.shape[0], cfg)
        gemv = family == "gemv"
        if u_tiled and gemv and not (x2.shape[0] == 1 and _takes_tiled(x2, tensors[0], tensors[2], b, cfg)):
            tensors[0], u_tiled = untile_order(tensors[0]), False
        if gemv:
            _gemv(x2, *tensors, b, y, cfg, sms, groups, u_tiled)
        else:
            for j in range(groups):  # the kernels write through y's row stride, so a column slice works
                layer, bj = group_layer(tensors, b, groups, j)
                out = y[:, j * d_out : (j + 1) * d_out]
                if family == "gemm":
                    gemm(x2, *layer, bj, out, _op_dtype(x2), u_tiled)
                elif family == "prefill":
                    prefill(x2, *layer, bj, out, cfg, sms, _op_dtype(x2), u_tiled)
                else:
                    _tensor_cores(x2, *layer, bj, out, cfg, sms, u_tiled)
    return y.reshape(*x.shape[:-1], groups * d_out)


def accepts(x: torch.Tensor, u_signs: torch.Tensor, v_signs: torch.Tensor) -> bool:
    """CUDA tensors in fp16/bf16 with int32 words, any number of tokens."""
    return (
        x.is_cuda
        and u_signs.is_cuda
        and v_signs.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and u_signs.dtype == torch.int32
        and v_signs.dtype == torch.int32
        and x.shape[-1] > 0
    )
