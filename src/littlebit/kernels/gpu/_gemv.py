"""Triton GEMV kernels (1-4 tokens): a matrix-vector product over packed sign bits.

At batch 1 the cost is turning bits into signed sums, not moving them, so the inner loop is what
matters. A thread owns one word column and several rows of a tile; for each bit position it needs the
value that meets that bit, the same for all its rows.

Stage 1 builds those values (g*x) itself, once per step from a contiguous tile of x and g that the
compiler hands to one word per lane through shared memory. Stage 2 reads them (t, which stage 1 adds up
with atomics) from a vector laid out *per block of BKW words, bit-major* (value of bit b of word kk of
block n at ``n*32*BKW + b*BKW + kk``), so the loads of a step are contiguous across lanes and their
offsets compile to immediates.

Vector modes:
  0  fp32, one value per bit, any dtype: add the values under set bits (a predicated add per bit), then
     signed sum = 2 * that - total.
  1  (stage 1) int32 fp16x2 pairs, pair i = (value of bit i, value of bit i+16): ``~w << (15 - i)`` puts
     both bits on the two half-word sign positions, one lop3 flips the pair's signs, one add.f16x2
     accumulates: 1.5 instructions per bit (inline PTX; emulated under the interpreter). Sums of 32
     terms are fp16, so it is meant for fp16 activations.
  2  (stage 2) as 1, from fp32 pairs stored side by side (what stage 1's fp32 atomics can build),
     packed to fp16x2 in the loop.
  3  (stage 2) as 1, reading fp16x2 pairs that stage 1 wrote whole (``REDUCE``, row blocks of whole
     words): half the loads of mode 2 and no packing in the loop; the same rounding.

Stage 1 and stage 2 are two launches (``_gemv_v_kernel`` then ``_gemv_u_kernel``). Stage 1
either adds into a ``t`` that is zero whenever no call is running (the last stage-2 program zeroes it
again, ``_release_t``) or, with ``REDUCE``, writes ``t`` whole from per-split partial sums
(``_reduce_partials``), so stage 2 ends with no ticket on one address. The launches share the stage
bodies. With ``QUANT`` (one token) stage 1 ends in the bit planes that the bit-serial stage 2 reads
instead of ``t`` (``_reduce_to_planes``), so that call needs no quantizing launch in between.
"""

from __future__ import annotations

import triton
import triton.language as tl

from littlebit.kernels.gpu._sync import _pdl_launch_next, _pdl_wait


@triton.jit
def _halves(v):
    """int32 fp16x2 -> (low, high) as fp32."""
    lo = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _join_halves(lo, hi):
    """fp32 (low, high) -> int32 fp16x2, each half rounded to nearest."""
    lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo16 | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)


# Each helper has a one-instruction PTX form for the GPU and a plain form with the same results for
# Triton's interpreter, so the tests on CPU check the layouts these modes read.


@triton.jit
def _pack_half2(lo, hi, PTX: tl.constexpr):
    if PTX:
        res = tl.inline_asm_elementwise(
            "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        res = _join_halves(lo, hi)
    return res


@triton.jit
def _signed_add_half2(shifted_not_w, pair, acc2, PTX: tl.constexpr):
    """acc2 + pair with each half negated where bit 15 / bit 31 of ``shifted_not_w`` is set."""
    if PTX:
        res = tl.inline_asm_elementwise(
            "{ .reg .b32 m, v; mov.b32 m, 0x80008000; lop3.b32 v, $1, m, $2, 0x6A; add.rn.f16x2 $0, $3, v; }",
            "=r,r,r,r",
            [shifted_not_w, pair, acc2],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        v_lo, v_hi = _halves((shifted_not_w & -2147450880) ^ pair)
        a_lo, a_hi = _halves(acc2)
        res = _join_halves(a_lo + v_lo, a_hi + v_hi)
    return res


@triton.jit
def _half2_sum(acc2, PTX: tl.constexpr):
    if PTX:
        res = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .f32 a, b; mov.b32 {lo, hi}, $1; "
            "cvt.f32.f16 a, lo; cvt.f32.f16 b, hi; add.f32 $0, a, b; }",
            "=f,r",
            [acc2],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        lo, hi = _halves(acc2)
        res = lo + hi
    return res


@triton.jit
def _pick(t, i: tl.constexpr, LOG: tl.constexpr):
    """``t[:, :, i]`` of a (A, B, 2**LOG) tile by halving the last axis: splits that cost nothing once
    that axis lives in one thread, and that the 16 or 32 calls of a step share."""
    A: tl.constexpr = t.shape[0]
    B: tl.constexpr = t.shape[1]
    s = t
    for lvl in tl.static_range(LOG):
        even, odd = tl.split(tl.reshape(s, (A, B, 1 << (LOG - 1 - lvl), 2)))
        s = odd if (i >> lvl) % 2 == 1 else even
    return tl.reshape(s, (A, B))


@triton.jit
def _gx_tile(x_rows, tok_ok, g_row, d_in, k0, k_hi, BKW: tl.constexpr, MODE: tl.constexpr):
    """g*x for the BKW words from ``k0``, zero past ``k_hi`` and ``d_in``: (TOK, BKW, 32) fp32 values of
    bit b (MODE 0) or (TOK, BKW, 16) fp16x2 pairs (bit i, bit i+16) (MODE 1).

    ``x_rows`` (TOK,): each token's row of x; ``g_row``: g_p. Contiguous loads and one trip through
    shared memory per step cost less than 16-32 strided loads per lane (the same words are needed by
    every warp of the program).
    """
    NB: tl.constexpr = 16 if MODE == 1 else 32
    cols = k0 + tl.arange(0, BKW)
    e = (cols * 32)[None, :, None] + tl.arange(0, NB)[None, None, :]
    col_ok = (cols < k_hi)[None, :, None]
    # With d_in a multiple of 16 (Triton specialises on it) these masks are constant over 16 entries,
    # so the loads vectorise.
    m_lo = col_ok & (e < d_in)
    xp = x_rows[:, None, None] + e
    x_lo = tl.load(xp, mask=tok_ok[:, None, None] & m_lo, other=0.0).to(tl.float32)
    g_lo = tl.load(g_row + e, mask=m_lo, other=0.0).to(tl.float32)
    if MODE == 1:
        m_hi = col_ok & (e + 16 < d_in)
        x_hi = tl.load(xp + 16, mask=tok_ok[:, None, None] & m_hi, other=0.0).to(tl.float32)
        g_hi = tl.load(g_row + e + 16, mask=m_hi, other=0.0).to(tl.float32)
        res = _join_halves(x_lo * g_lo, x_hi * g_hi)  # the fp32 product is exact; rounded once to fp16
    else:
        res = x_lo * g_lo
    return res


@triton.jit
def _rows_dot(
    w_ptrs, row_ok, vec_base, tok_ok, k_lo, k_hi, x_rows, g_row, d_in,
    TOK: tl.constexpr, BR: tl.constexpr, BKW: tl.constexpr, MODE: tl.constexpr, PTX: tl.constexpr,
    GX: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """(TOK, BR) fp32: over words [k_lo, k_hi) (k_lo a multiple of BKW), sum of sign(row, i) * vec(tok, i).

    ``w_ptrs`` (BR, 1): each row's word 0. The vector is g*x, built per step from ``x_rows``, ``g_row``
    and ``d_in`` when ``GX`` (stage 1: modes 0, 1), else read at ``vec_base`` (TOK, 1) (stage 2: modes
    0, 2, 3). With ``PDL`` the first words are requested
    before waiting for the previous grid, which no earlier kernel writes.
    """
    kk = tl.arange(0, BKW)
    acc = tl.zeros((TOK, BR, BKW), tl.float32)
    tot = tl.zeros((TOK, BKW), tl.float32)
    w = tl.load(w_ptrs + (k_lo + kk)[None, :], mask=row_ok[:, None] & ((k_lo + kk) < k_hi)[None, :], other=0)
    _pdl_wait(PDL)
    for k0 in range(k_lo, k_hi, BKW):
        cols = k0 + kk
        vmask = tok_ok[:, None] & (cols < k_hi)[None, :]
        # The next tile is requested before this one is decoded, so a load is always in flight.
        nxt = cols + BKW
        w_next = tl.load(w_ptrs + nxt[None, :], mask=row_ok[:, None] & (nxt < k_hi)[None, :], other=0)
        if GX:
            gx = _gx_tile(x_rows, tok_ok, g_row, d_in, k0, k_hi, BKW, MODE)
        else:
            vp = vec_base + (k0 // BKW) * (32 * BKW) + kk[None, :] * (2 if MODE == 2 else 1)
        if MODE == 0:
            for b in tl.static_range(32):
                if GX:
                    vb = _pick(gx, b, 5)
                else:
                    vb = tl.load(vp + b * BKW, mask=vmask, other=0.0)
                if b == 31:
                    bit = w < 0
                else:
                    bit = (w & (1 << b)) != 0
                acc = tl.where(bit[None, :, :], acc + vb[:, None, :], acc)
                tot += vb
        else:
            nw = ~w
            acc2 = tl.zeros((TOK, BR, BKW), tl.int32)
            for i in tl.static_range(16):
                if MODE == 1:
                    pair = _pick(gx, i, 4)
                elif MODE == 3:
                    pair = tl.load(vp + i * BKW, mask=vmask, other=0)
                else:
                    lo = tl.load(vp + 2 * i * BKW, mask=vmask, other=0.0)
                    hi = tl.load(vp + 2 * i * BKW + 1, mask=vmask, other=0.0)
                    pair = _pack_half2(lo, hi, PTX)
                acc2 = _signed_add_half2((nw << (15 - i))[None, :, :], pair[:, None, :], acc2, PTX)
            # fp16 sums of 32 terms only; words are added in fp32.
            acc += _half2_sum(acc2, PTX)
        w = w_next
    if MODE == 0:
        res = 2.0 * tl.sum(acc, axis=2) - tl.sum(tot, axis=1)[:, None]
    else:
        res = tl.sum(acc, axis=2)
    return res


@triton.jit
def _vec_offsets(j, BKW: tl.constexpr, MODE: tl.constexpr):
    """Offset of entry j of a row-length vector inside one token's and path's block of ``MODE`` layout."""
    k = j // 32
    b = j % 32
    if MODE == 0:
        off = (k // BKW) * (32 * BKW) + b * BKW + k % BKW
    else:
        off = ((k // BKW) * (16 * BKW) + (b % 16) * BKW + k % BKW) * 2 + b // 16
    return off


@triton.jit
def _take_ticket(cnt_ptr, n_programs):
    """Count this program in at ``cnt_ptr``; True for the last of ``n_programs``, which then sees
    every other program's memory operations before the ticket (acq_rel)."""
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == n_programs - 1


@triton.jit
def _release_t(t_ptr, cnt_ptr, n_used, n_programs, ZB: tl.constexpr):
    """Called by every stage-2 program once it has read all of ``t``: the last one zeroes t for the
    next call and resets the ticket counter."""
    # Every warp of this program is past its reads of t before the ticket is taken; the ticket's
    # release (and the last program's acquire) orders them before the zeroing.
    tl.debug_barrier()
    if _take_ticket(cnt_ptr, n_programs):
        for z0 in range(0, n_used, ZB):
            z = z0 + tl.arange(0, ZB)
            tl.store(t_ptr + z, tl.zeros((ZB,), tl.float32), mask=z < n_used)
        tl.store(cnt_ptr, 0)


@triton.jit
def _store_t(
    val, t_row, tp_row, row0, tok_ok, R, W_r, B2: tl.constexpr, MODE2: tl.constexpr, PTX: tl.constexpr
):
    """Write a row block's finished t (TOK, BR), rows from ``row0``, in stage 2's layout: fp32 entries,
    or with ``MODE2`` 3 fp16x2 pairs (bit i, bit i + 16) through ``tp_row`` (the same memory as int32);
    the block is then whole words, and its rows past the rank are written as zeros, which the padding
    bits of the last word must meet."""
    TOK: tl.constexpr = val.shape[0]
    BR: tl.constexpr = val.shape[1]
    if MODE2 == 3:
        # Rows past the rank decoded zero words: their sums can overflow fp16 (times l = 0: NaN).
        val = tl.where(((row0 + tl.arange(0, BR)) < R)[None, :], val, 0.0)
        NW: tl.constexpr = BR // 32
        lo, hi = tl.split(tl.permute(tl.reshape(val, (TOK, NW, 2, 16)), (0, 1, 3, 2)))
        k = row0 // 32 + tl.arange(0, NW)
        off = ((k // B2) * (32 * B2) + k % B2)[:, None] + (tl.arange(0, 16) * B2)[None, :]
        mask = tok_ok[:, None, None] & (k < W_r)[None, :, None]
        tl.store(tp_row[:, :, None] + off[None, :, :], _pack_half2(lo, hi, PTX), mask=mask)
    else:
        rows = row0 + tl.arange(0, BR)
        ok = tok_ok[:, None] & (rows < R)[None, :]
        tl.store(t_row + _vec_offsets(rows, B2, MODE2)[None, :], val, mask=ok)


@triton.jit
def _reduce_partials(
    part, lv, t_row, tp_row, row0, tok_ok, R, W_r, part_ptr, cnt_ptr, ticket_idx, split, n_split, slot, offs,
    B2: tl.constexpr, MODE2: tl.constexpr, PTX: tl.constexpr,
):  # fmt: skip
    """Stage 1 without atomics into ``t`` and without a zero ``t``: each of the ``n_split`` programs of
    a row block stores its partial sums (at ``split * slot + offs``); the last to finish (a ticket per
    row block, ``ticket_idx``) adds them in a fixed order, so the result is deterministic, writes
    ``t`` (``_store_t``) and resets the ticket."""
    if n_split == 1:
        _store_t(part * lv[None, :], t_row, tp_row, row0, tok_ok, R, W_r, B2, MODE2, PTX)
    else:
        ok = tok_ok[:, None] & ((row0 + tl.arange(0, part.shape[1])) < R)[None, :]
        tl.store(part_ptr + split * slot + offs, part, mask=ok)
        # Every warp's partials are written before the ticket; its release (and the last program's
        # acquire) orders them before that program's reads, which go to L2 (.cg), never a stale L1.
        tl.debug_barrier()
        if _take_ticket(cnt_ptr + ticket_idx, n_split):
            acc = tl.zeros(part.shape, tl.float32)
            for sp in range(0, n_split):
                acc += tl.load(part_ptr + sp * slot + offs, mask=ok, other=0.0, cache_modifier=".cg")
            _store_t(acc * lv[None, :], t_row, tp_row, row0, tok_ok, R, W_r, B2, MODE2, PTX)
            tl.store(cnt_ptr + ticket_idx, 0)


@triton.jit
def _round_even(x, PTX: tl.constexpr):
    """fp32 to the nearest integer, ties to even (|x| < 2^22 for the plain form)."""
    if PTX:
        res = tl.inline_asm_elementwise(
            "cvt.rni.f32.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        res = (x + 12582912.0) - 12582912.0  # 1.5 * 2^23: the sum's ulp is 1
    return res


@triton.jit
def _block_planes(v, planes_ptr, scales_ptr, PTX: tl.constexpr):
    """One block of 256 fp32 entries of t to what ``cuda_bitserial.quantize`` writes for it, bit for bit
    (layout: that module's doc): scale s = max|v| / 32767, q = round(v / s) (ties to even), the 16
    two's-complement planes of q in the binary MMA's B order, and (s, s * sum q / 2)."""
    amax = tl.max(tl.abs(v), axis=0)
    qmax = tl.full((), 32767.0, tl.float32)
    # true divisions, as in the CUDA kernel and the reference (Triton's ``/`` is approximate)
    inv = tl.where(amax > 0, tl.math.div_rn(qmax, amax), 0.0)
    q = tl.minimum(tl.maximum(_round_even(v * inv, PTX), -32767.0), 32767.0).to(tl.int32)
    s = tl.math.div_rn(amax, qmax)
    const = 0.5 * s * tl.sum(q, axis=0).to(tl.float32)
    k = tl.arange(0, 16)
    w = tl.arange(0, 8)
    bits = (tl.reshape(q, (8, 32))[:, :, None] >> k[None, None, :]) & 1  # word w, bit j, plane k
    words = tl.sum(bits << tl.arange(0, 32)[None, :, None], axis=1).to(tl.int32)  # disjoint bits: an OR
    # thread (g, q) of the MMA holds planes g and 8 + g of words 2q and 2q + 1, 16 contiguous bytes
    off = ((k[None, :] & 7) * 4 + (w[:, None] >> 1)) * 4 + (k[None, :] >> 3) * 2 + (w[:, None] & 1)
    tl.store(planes_ptr + off, words)
    two = tl.arange(0, 2)
    tl.store(scales_ptr + two, tl.where(two == 0, s, const))


@triton.jit
def _reduce_to_planes(
    part, row0, p, R, n_rb, l_ptr, part_ptr, cnt_ptr, planes_ptr, scales_ptr, split, n_split, slot,
    PTX: tl.constexpr,
):  # fmt: skip
    """``_reduce_partials`` for the bit-serial stage 2 (one token): the ticket is per block of 256 rows
    (a quantization block; a row block lies in one), and its last program adds the partials of all
    256 rows in a fixed order, scales them by l and writes the block's planes and scales
    (``_block_planes``) instead of t. The same sums as ``_reduce_partials``, so the same planes as
    quantizing its t."""
    BR: tl.constexpr = part.shape[1]
    PER: tl.constexpr = 256 // BR
    tl.static_assert(PER * BR == 256, "row blocks must tile the 256-row quantization blocks")
    rows = row0 + tl.arange(0, BR)
    tl.store(part_ptr + split * slot + p * R + rows, tl.reshape(part, (BR,)), mask=rows < R)
    # Every warp's partials are written before the ticket (see ``_reduce_partials``).
    tl.debug_barrier()
    kb = row0 // 256
    n_kb = tl.cdiv(R, 256)
    n_here = tl.minimum(n_rb - kb * PER, PER)  # the last block of a path may hold fewer row blocks
    if _take_ticket(cnt_ptr + p * n_kb + kb, n_split * n_here):
        r2 = kb * 256 + tl.arange(0, 256)
        ok = r2 < R
        acc = tl.zeros((256,), tl.float32)
        for sp in range(0, n_split):
            acc += tl.load(part_ptr + sp * slot + p * R + r2, mask=ok, other=0.0, cache_modifier=".cg")
        lv = tl.load(l_ptr + p * R + r2, mask=ok, other=0.0).to(tl.float32)
        blk = p * n_kb + kb
        _block_planes(acc * lv, planes_ptr + blk * 128, scales_ptr + 2 * blk, PTX)
        tl.store(cnt_ptr + p * n_kb + kb, 0)


@triton.jit
def _gemv_v_body(
    x_ptr, g_ptr, v_ptr, l_ptr, t_ptr, pid0, pid1, M, R, W_in, d_in, stride_xm, n_rb, chunk, t_len,
    P: tl.constexpr, TOK: tl.constexpr, BR: tl.constexpr, B1: tl.constexpr, MODE1: tl.constexpr,
    B2: tl.constexpr, MODE2: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr = False,
    part_ptr=None, cnt_ptr=None, n_split=1, W_r=0, tp_ptr=None, REDUCE: tl.constexpr = False,
    planes_ptr=None, scales_ptr=None, QUANT: tl.constexpr = False,
):  # fmt: skip
    """Stage 1 for program (pid0, pid1): t (+)= l * S_V^T (g*x) over block ``pid0 % n_rb`` of the rows
    of path ``pid0 // n_rb`` and chunk ``pid1`` of d_in, into ``t`` laid out for stage 2 (``B2``,
    ``MODE2``): by fp32 atomics into a zero ``t``, or with ``REDUCE`` by ``_reduce_partials``; with
    ``QUANT`` as bit planes of t by ``_reduce_to_planes``."""
    p = pid0 // n_rb
    rows = (pid0 % n_rb) * BR + tl.arange(0, BR)
    row_ok = rows < R
    toks = tl.arange(0, TOK)
    tok_ok = toks < M
    k_lo = pid1 * chunk
    k_hi = tl.minimum(k_lo + chunk, W_in)
    w_ptrs = v_ptr + (p * R + rows)[:, None] * W_in
    x_rows = x_ptr + toks * stride_xm
    g_row = g_ptr + p * d_in
    part = _rows_dot(
        w_ptrs, row_ok, None, tok_ok, k_lo, k_hi, x_rows, g_row, d_in, TOK, BR, B1, MODE1, PTX, True, PDL,
    )  # fmt: skip
    _pdl_launch_next(PDL)
    if QUANT:
        tl.static_assert(TOK == 1)
        _reduce_to_planes(
            part, (pid0 % n_rb) * BR, p, R, n_rb, l_ptr, part_ptr, cnt_ptr, planes_ptr, scales_ptr, pid1,
            n_split, P * R, PTX,
        )  # fmt: skip
    else:
        lv = tl.load(l_ptr + p * R + rows, mask=row_ok, other=0.0).to(tl.float32)
        t_row = t_ptr + ((toks * P + p) * t_len)[:, None]
        if REDUCE:
            offs = ((toks * P + p) * R)[:, None] + rows[None, :]
            tp_row = tp_ptr + ((toks * P + p) * t_len)[:, None]
            _reduce_partials(
                part, lv, t_row, tp_row, (pid0 % n_rb) * BR, tok_ok, R, W_r, part_ptr, cnt_ptr, pid0, pid1,
                n_split, M * P * R, offs, B2, MODE2, PTX,
            )  # fmt: skip
            if MODE2 != 3 and pid0 % n_rb == n_rb - 1 and pid1 == 0:
                # Stage 2 reads whole words: the bits of the last one past the rank must meet zeros.
                pad = R + tl.arange(0, 32)
                tl.store(
                    t_row + _vec_offsets(pad, B2, MODE2)[None, :],
                    tl.zeros((TOK, 32), tl.float32),
                    mask=tok_ok[:, None] & (pad < 32 * W_r)[None, :],
                )
        else:
            dst = t_row + _vec_offsets(rows, B2, MODE2)[None, :]
            tl.atomic_add(dst, part * lv[None, :], mask=tok_ok[:, None] & row_ok[None, :], sem="relaxed")


@triton.jit
def _gemv_u_body(
    t_ptr, u_ptr, h_ptr, b_ptr, y_ptr, pid, M, d_out, W_r, stride_ym, t_len,
    P: tl.constexpr, TOK: tl.constexpr, BO: tl.constexpr, B2: tl.constexpr, MODE2: tl.constexpr,
    HAS_BIAS: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr = False, GP: tl.constexpr = 0,
):  # fmt: skip
    """Stage 2 for program ``pid``: y = sum_p h_p * S_U,p t_p (+ bias) for one block of output rows.

    ``GP``: paths per token in ``t`` when it holds several layers' paths (grouped calls; 0: ``P``), the
    pointers already moved to this program's layer."""
    rows = pid * BO + tl.arange(0, BO)
    row_ok = rows < d_out
    toks = tl.arange(0, TOK)
    tok_ok = toks < M
    y = tl.zeros((TOK, BO), tl.float32)
    for p in tl.static_range(P):
        w_ptrs = u_ptr + (p * d_out + rows)[:, None] * W_r
        vec_base = t_ptr + ((toks * (GP if GP > 0 else P) + p) * t_len)[:, None]
        s = _rows_dot(
            w_ptrs, row_ok, vec_base, tok_ok, 0, W_r, None, None, None, TOK, BO, B2, MODE2, PTX, False,
            PDL and p == 0,
        )  # fmt: skip
        hv = tl.load(h_ptr + p * d_out + rows, mask=row_ok, other=0.0).to(tl.float32)
        y += s * hv[None, :]
    _pdl_launch_next(PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + toks[:, None] * stride_ym + rows[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=tok_ok[:, None] & row_ok[None, :])


# Row strides and chunk starts unspecialised: when Triton knows they are multiples of 16 it loads 4
# words per lane and then moves every shifted copy of them (16 per step) through shared memory to the
# one-word-per-lane layout of the decoding (sm_90 SASS: ~20 % more instructions per step, 32 barriers);
# plain 4-byte loads are coalesced across lanes already.
@triton.jit(do_not_specialize_on_alignment=["W_in", "chunk"])
def _gemv_v_kernel(
    x_ptr, g_ptr, v_ptr, l_ptr, t_ptr, tp_ptr, part_ptr, cnt_ptr, M, R, W_in, d_in, stride_xm, n_rb, chunk,
    t_len, W_r, P: tl.constexpr, TOK: tl.constexpr, BR: tl.constexpr, B1: tl.constexpr, MODE1: tl.constexpr,
    B2: tl.constexpr, MODE2: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr, REDUCE: tl.constexpr,
    planes_ptr=None, scales_ptr=None, QUANT: tl.constexpr = False,
):  # fmt: skip
    """Stage 1, grid (P * n_rb, n_split)."""
    _gemv_v_body(
        x_ptr, g_ptr, v_ptr, l_ptr, t_ptr, tl.program_id(0), tl.program_id(1), M, R, W_in, d_in, stride_xm,
        n_rb, chunk, t_len, P, TOK, BR, B1, MODE1, B2, MODE2, PTX, PDL,
        part_ptr, cnt_ptr, tl.num_programs(1), W_r, tp_ptr, REDUCE, planes_ptr, scales_ptr, QUANT,
    )  # fmt: skip


@triton.jit(do_not_specialize_on_alignment=["W_r"])  # as stage 1's W_in
def _gemv_u_kernel(
    t_ptr, cnt_ptr, u_ptr, h_ptr, b_ptr, y_ptr, M, d_out, W_r, stride_ym, t_len, n_ob,
    P: tl.constexpr, TOK: tl.constexpr, BO: tl.constexpr, B2: tl.constexpr, MODE2: tl.constexpr,
    HAS_BIAS: tl.constexpr, PTX: tl.constexpr, ZB: tl.constexpr, PDL: tl.constexpr, G: tl.constexpr,
    REDUCE: tl.constexpr,
):  # fmt: skip
    """Stage 2, grid (G * n_ob,): ``n_ob`` blocks of output rows for each of the
    ``G`` layers of a grouped call (their P paths each, stacked; outputs side by side in y); then
    ``_release_t``, unless stage 1 wrote ``t`` whole (``REDUCE``)."""
    pid = tl.program_id(0)
    grp = pid // n_ob
    _gemv_u_body(
        t_ptr + grp * (P * t_len), u_ptr + grp * (P * d_out * W_r), h_ptr + grp * (P * d_out),
        b_ptr + grp * d_out, y_ptr + grp * d_out, pid - grp * n_ob, M, d_out, W_r, stride_ym, t_len,
        P, TOK, BO, B2, MODE2, HAS_BIAS, PTX, PDL, G * P,
    )  # fmt: skip
    if not REDUCE:
        _release_t(t_ptr, cnt_ptr, M * G * P * t_len, tl.num_programs(0), ZB)
