"""The Triton kernels of `ops.qkv_rope_lora` (the op, its plain-torch reference and its launchers live there).
Imported lazily by that module: this one needs triton at import, and Triton's interpreter (the CPU tests) resolves a
kernel's helpers only among module globals.

One launch for q, k and v; a program owns one head (head_dim columns, split in the two halves RoPE rotates against
each other) and a block of BM token rows (the kernels branch on which projection the head belongs to). The LoRA-B
product of a tile is one `tl.dot` per half of inner size BR (the rank, padded with zeros to >= 16), from
xa [M, r_q + r_k + r_v] and the head's rows of B. With HALF, cos/sin rows hold the one half of the angles that
both halves share (`surogate/models/qwen3.py`: `rope_cos_sin`): half the loads, and two fewer tiles in registers.

With TMA the backward reads and writes its [BM, D2] tiles (the output gradients, y, cos/sin, dy) through TMA
descriptors (the launcher makes them where it can): 13% faster on Qwen3 1.7B-14B shapes on an H100
(benchmarks/NOTES.md), as in `ops/swiglu_lora_kernels.py`.
"""

import triton
import triton.language as tl

from ops._triton_lora import _dot, _load_xa


@triton.jit
def _load_b(b_ptr, xa_ptr, brow, rank, stride_b, D2: tl.constexpr, BR: tl.constexpr):
    """One head's rows of B as two [D2, BR] halves (zero past the rank), in xa's dtype: B may come in its fp32
    master dtype (compile_passes/lora_master_dtype.py), and this is the graph's cast it replaces."""
    rr = tl.arange(0, BR)
    d = tl.arange(0, D2)
    rank_ok = rr[None, :] < rank
    b1 = tl.load(b_ptr + (brow + d)[:, None] * stride_b + rr[None, :], mask=rank_ok, other=0.0)
    b2 = tl.load(b_ptr + (brow + D2 + d)[:, None] * stride_b + rr[None, :], mask=rank_ok, other=0.0)
    return b1.to(xa_ptr.dtype.element_ty), b2.to(xa_ptr.dtype.element_ty)


@triton.jit
def _load_half(src, m0, rm, M, stride_m, col, D2: tl.constexpr, TMA: tl.constexpr):
    """The fp32 [BM, D2] tile at rows rm (m0 the first) and columns col .. col + D2 of a row-major source: a TMA
    descriptor, or a pointer with row stride `stride_m`. Zero past M."""
    if TMA:  # an if/else, not an early return: Triton 3.6 compiles what follows a constexpr branch's return
        tile = src.load([m0, col])
    else:
        d = tl.arange(0, D2)
        tile = tl.load(src + rm[:, None] * stride_m + col + d[None, :], mask=rm[:, None] < M, other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _store_half(dst, value, m0, rm, M, stride_m, col, D2: tl.constexpr, TMA: tl.constexpr):
    """`_load_half`'s store: nothing written past M."""
    if TMA:
        dst.store([m0, col], value)
    else:
        d = tl.arange(0, D2)
        tl.store(dst + rm[:, None] * stride_m + col + d[None, :], value, mask=rm[:, None] < M)


@triton.jit
def _preactivation(
    y_src, xa, b1, b2, m0, rm, M, col, stride_ym, scale, D2: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr
):  # fmt: skip
    """The two fp32 [BM, D2] halves of y + s xa B^T for one head (columns col .. col + 2 D2 of y)."""
    p1 = _load_half(y_src, m0, rm, M, stride_ym, col, D2, TMA) + scale * _dot(xa, tl.trans(b1), IEEE)
    p2 = _load_half(y_src, m0, rm, M, stride_ym, col + D2, D2, TMA) + scale * _dot(xa, tl.trans(b2), IEEE)
    return p1, p2


@triton.jit
def _load_rotation(
    cos_src, sin_src, m0, rm, M, stride_cm, D2: tl.constexpr, HALF: tl.constexpr, TMA: tl.constexpr
):  # fmt: skip
    """(c1, c2, s1, s2): the two halves of the rows' cos and sin; with HALF the rows hold one half, both halves'."""
    c1 = _load_half(cos_src, m0, rm, M, stride_cm, 0, D2, TMA)
    s1 = _load_half(sin_src, m0, rm, M, stride_cm, 0, D2, TMA)
    if HALF:
        c2, s2 = c1, s1
    else:
        c2 = _load_half(cos_src, m0, rm, M, stride_cm, D2, D2, TMA)
        s2 = _load_half(sin_src, m0, rm, M, stride_cm, D2, D2, TMA)
    return c1, c2, s1, s2


@triton.jit
def _rms_stats(p1, p2, eps, D2: tl.constexpr):
    """Per row: 1 / sqrt(mean(p^2) + eps) over the head's 2 D2 values."""
    return tl.rsqrt((tl.sum(p1 * p1, 1) + tl.sum(p2 * p2, 1)) / (2 * D2) + eps)


@triton.jit
def _fwd_head(
    y_ptr, xa_ptr, b_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rm, M, head, col0, xcol, rank, stride_ym, stride_xm,
    stride_b, stride_cm, stride_om, scale, eps,
    D2: tl.constexpr, BR: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """out[rm, head] = rope(norm(y[rm, col0 + head] + s xa B^T)): y read once, out written once."""
    d = tl.arange(0, D2)
    xa = _load_xa(xa_ptr, rm, M, xcol, rank, stride_xm, BR)
    b1, b2 = _load_b(b_ptr, xa_ptr, head * 2 * D2, rank, stride_b, D2, BR)
    # pointer tiles (the forward gained nothing from TMA), so no first row (m0) is needed: 0
    p1, p2 = _preactivation(y_ptr, xa, b1, b2, 0, rm, M, col0 + head * 2 * D2, stride_ym, scale, D2, IEEE, False)
    if NORM:  # Qwen3's per-head RMSNorm: normalized value rounded to the activation dtype, then the weight
        rstd = _rms_stats(p1, p2, eps, D2)[:, None]
        p1 = (p1 * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + d).to(tl.float32)[None, :]
        p2 = (p2 * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + D2 + d).to(tl.float32)[None, :]
    if ROPE:  # rotate-half: (x1, x2) -> (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2)
        c1, c2, s1, s2 = _load_rotation(cos_ptr, sin_ptr, 0, rm, M, stride_cm, D2, HALF, False)
        p1, p2 = p1 * c1 - p2 * s1, p2 * c2 + p1 * s2
    out = out_ptr + rm[:, None] * stride_om + head * 2 * D2 + d[None, :]
    row_ok = rm[:, None] < M
    tl.store(out, p1.to(out_ptr.dtype.element_ty), mask=row_ok)
    tl.store(out + D2, p2.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def qkv_rope_lora_fwd_kernel(
    y_ptr, xa_ptr, bq_ptr, bk_ptr, bv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, M, heads_q,
    heads_kv, rank_q, rank_k, rank_v, stride_ym, stride_xm, stride_bq, stride_bk, stride_bv, stride_cm, scale_q,
    scale_k, scale_v, eps,
    D2: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, NORM: tl.constexpr, HALF: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """One [BM, head_dim] tile of q, k or v (grid axis 1: the q heads, then the k heads, then the v heads)."""
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    h = tl.program_id(1)
    D = 2 * D2
    if h < heads_q:
        _fwd_head(
            y_ptr, xa_ptr, bq_ptr, wq_ptr, cos_ptr, sin_ptr, q_ptr, rm, M, h, 0, 0, rank_q, stride_ym, stride_xm,
            stride_bq, stride_cm, heads_q * D, scale_q, eps, D2, BR, NORM, True, HALF, IEEE,
        )  # fmt: skip
    elif h < heads_q + heads_kv:
        _fwd_head(
            y_ptr, xa_ptr, bk_ptr, wk_ptr, cos_ptr, sin_ptr, k_ptr, rm, M, h - heads_q, heads_q * D, rank_q, rank_k,
            stride_ym, stride_xm, stride_bk, stride_cm, heads_kv * D, scale_k, eps, D2, BR, NORM, True, HALF, IEEE,
        )  # fmt: skip
    else:
        _fwd_head(
            y_ptr, xa_ptr, bv_ptr, wq_ptr, cos_ptr, sin_ptr, v_ptr, rm, M, h - heads_q - heads_kv,
            (heads_q + heads_kv) * D, rank_q + rank_k, rank_v, stride_ym, stride_xm, stride_bv, stride_cm,
            heads_kv * D, scale_v, eps, D2, BR, False, False, HALF, IEEE,
        )  # fmt: skip


@triton.jit
def _bwd_head(
    dout, y_src, xa_ptr, b_ptr, w_ptr, cos_src, sin_src, dy_dst, dxa_ptr, db_ptr, M, seq, head, col0, xcol, rank,
    stride_db, stride_ds, stride_dh, stride_ym, stride_xm, stride_b, stride_cm, stride_dym, stride_dxm, scale, eps,
    row_tiles,
    D2: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
    HALF: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One head over `row_tiles` tiles of BM rows. Per tile: the output gradient (dout [B, S, H, 2 D2], any strides;
    with TMA a descriptor of it as [B * S, H * 2 D2]) taken back through RoPE and the RMSNorm (pre-activation
    recomputed from y, xa and B), written to dy in y's dtype, and its two LoRA reductions taken from the rounded dy
    tile while it is in registers: dxa (summed over heads: fp32 atomics into [M, r]) and dB (summed over rows: in
    registers across the tiles, then one atomic add). y, cos/sin and dy are `_load_half` sources."""
    brow = head * 2 * D2
    d = tl.arange(0, D2)
    rr = tl.arange(0, BR)
    db1 = tl.zeros((D2, BR), dtype=tl.float32)
    db2 = tl.zeros((D2, BR), dtype=tl.float32)
    b1, b2 = _load_b(b_ptr, xa_ptr, brow, rank, stride_b, D2, BR)
    if NORM:
        w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + D2 + d).to(tl.float32)[None, :]
    for i in range(row_tiles):
        m0 = (tl.program_id(1) * row_tiles + i) * BM
        rm = (m0 + tl.arange(0, BM)).to(tl.int64)
        row_ok = rm[:, None] < M
        if TMA:
            g1 = dout.load([m0, brow]).to(tl.float32)
            g2 = dout.load([m0, brow + D2]).to(tl.float32)
        else:
            batch = rm // seq
            g = dout + (batch * stride_db + (rm - batch * seq) * stride_ds + head * stride_dh)[:, None] + d[None, :]
            g1 = tl.load(g, mask=row_ok, other=0.0).to(tl.float32)
            g2 = tl.load(g + D2, mask=row_ok, other=0.0).to(tl.float32)
        if ROPE:  # the rotation's transpose
            c1, c2, s1, s2 = _load_rotation(cos_src, sin_src, m0, rm, M, stride_cm, D2, HALF, TMA)
            g1, g2 = g1 * c1 + g2 * s2, g2 * c2 - g1 * s1
        xa = _load_xa(xa_ptr, rm, M, xcol, rank, stride_xm, BR)
        if NORM:  # d/dp of w * (p rstd): rstd (dn - n mean(dn n)), dn = g w, n = p rstd (rounding: straight through)
            p1, p2 = _preactivation(y_src, xa, b1, b2, m0, rm, M, col0 + brow, stride_ym, scale, D2, IEEE, TMA)
            rstd = _rms_stats(p1, p2, eps, D2)[:, None]
            n1, n2 = p1 * rstd, p2 * rstd
            dn1, dn2 = g1 * w1, g2 * w2
            mean = ((tl.sum(dn1 * n1, 1) + tl.sum(dn2 * n2, 1)) / (2 * D2))[:, None]
            g1, g2 = rstd * (dn1 - n1 * mean), rstd * (dn2 - n2 * mean)
        if TMA:
            dy1, dy2 = g1.to(dy_dst.dtype), g2.to(dy_dst.dtype)
        else:
            dy1, dy2 = g1.to(dy_dst.dtype.element_ty), g2.to(dy_dst.dtype.element_ty)
        _store_half(dy_dst, dy1, m0, rm, M, stride_dym, col0 + brow, D2, TMA)
        _store_half(dy_dst, dy2, m0, rm, M, stride_dym, col0 + brow + D2, D2, TMA)
        dxa = scale * (_dot(dy1, b1.to(dy1.dtype), IEEE) + _dot(dy2, b2.to(dy2.dtype), IEEE))
        tl.atomic_add(dxa_ptr + rm[:, None] * stride_dxm + xcol + rr[None, :], dxa, mask=row_ok & (rr[None, :] < rank),
                      sem="relaxed")  # fmt: skip
        xa = xa.to(dy1.dtype)
        db1 += _dot(tl.trans(dy1), xa, IEEE)
        db2 += _dot(tl.trans(dy2), xa, IEEE)
    rank_ok = rr[None, :] < rank
    tl.atomic_add(db_ptr + (brow + d)[:, None] * rank + rr[None, :], scale * db1, mask=rank_ok, sem="relaxed")
    tl.atomic_add(db_ptr + (brow + D2 + d)[:, None] * rank + rr[None, :], scale * db2, mask=rank_ok, sem="relaxed")


@triton.jit
def qkv_rope_lora_bwd_kernel(
    dq, dk, dv, y_src, xa_ptr, bq_ptr, bk_ptr, bv_ptr, wq_ptr, wk_ptr, cos_src, sin_src, dy_dst, dxa_ptr,
    dbq_ptr, dbk_ptr, dbv_ptr, M, seq, heads_q, heads_kv, rank_q, rank_k, rank_v, sq_b, sq_s, sq_h, sk_b, sk_s, sk_h,
    sv_b, sv_s, sv_h, stride_ym, stride_xm, stride_bq, stride_bk, stride_bv, stride_cm, stride_dym, stride_dxm,
    scale_q, scale_k, scale_v, eps, row_tiles,
    D2: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, NORM: tl.constexpr, HALF: tl.constexpr,
    IEEE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One head of q, k or v (grid axis 0: the q heads, then the k heads, then the v heads) over a block of rows."""
    h = tl.program_id(0)
    D = 2 * D2
    if h < heads_q:
        _bwd_head(
            dq, y_src, xa_ptr, bq_ptr, wq_ptr, cos_src, sin_src, dy_dst, dxa_ptr, dbq_ptr, M, seq, h, 0, 0,
            rank_q, sq_b, sq_s, sq_h, stride_ym, stride_xm, stride_bq, stride_cm, stride_dym, stride_dxm, scale_q,
            eps, row_tiles, D2, BM, BR, NORM, True, HALF, IEEE, TMA,
        )  # fmt: skip
    elif h < heads_q + heads_kv:
        _bwd_head(
            dk, y_src, xa_ptr, bk_ptr, wk_ptr, cos_src, sin_src, dy_dst, dxa_ptr, dbk_ptr, M, seq, h - heads_q,
            heads_q * D, rank_q, rank_k, sk_b, sk_s, sk_h, stride_ym, stride_xm, stride_bk, stride_cm, stride_dym,
            stride_dxm, scale_k, eps, row_tiles, D2, BM, BR, NORM, True, HALF, IEEE, TMA,
        )  # fmt: skip
    else:
        _bwd_head(
            dv, y_src, xa_ptr, bv_ptr, wq_ptr, cos_src, sin_src, dy_dst, dxa_ptr, dbv_ptr, M, seq,
            h - heads_q - heads_kv, (heads_q + heads_kv) * D, rank_q + rank_k, rank_v, sv_b, sv_s, sv_h, stride_ym,
            stride_xm, stride_bv, stride_cm, stride_dym, stride_dxm, scale_v, eps, row_tiles, D2, BM, BR, False,
            False, HALF, IEEE, TMA,
        )  # fmt: skip
