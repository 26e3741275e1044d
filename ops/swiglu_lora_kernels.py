"""The Triton kernels of `ops.swiglu_lora` (the op, its plain-torch reference and its launchers live there).
Imported lazily by that module: this one needs triton at import, and Triton's interpreter (the CPU tests) resolves a
kernel's helpers only among module globals.

Both kernels work on [BM, BN] tiles of the activation h [M, N] (N: the MLP's intermediate size); the gate and up
pre-activations of a tile are the columns rn and N + rn of the base output y [M, 2N]. The LoRA-B products are added
per tile from xa [M, rank_g + rank_u] and the B rows of the tile's columns: one `tl.dot` of inner size BR (the rank,
padded with zeros to >= 16).

Both kernels give each program one column block and a run of row tiles, so the block's B rows are loaded once per
program. They read and write their wide tiles (y's gate and up halves, h; dh, dy's halves) through TMA descriptors
where the launcher can make them (TMA): the backward 7-9% faster on Qwen3 4B-14B shapes on an H100
(benchmarks/NOTES.md), as the copy engine replaces the per-element addresses and masks the threads otherwise hold in
registers. Elsewhere (unaligned rows, GPUs without TMA) the same sources are pointers with a row stride.
"""

import triton
import triton.language as tl

from ops._triton_lora import _dot, _load_xa


@triton.jit
def _load_b(b_ptr, xa_ptr, rn, N, rank, stride_bn, stride_br, BR: tl.constexpr):
    """B[rn, :rank] as [BN, BR] (zero beyond the rank and N), in xa's dtype: B may come in its fp32 master dtype
    (compile_passes/lora_master_dtype.py), and this is the graph's cast it replaces."""
    rr = tl.arange(0, BR)
    mask = (rn[:, None] < N) & (rr[None, :] < rank)
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=mask, other=0.0)
    return b.to(xa_ptr.dtype.element_ty)


@triton.jit
def _load_tile(src, m0, n0, rm, rn, M, N, stride_m, TMA: tl.constexpr):
    """The [BM, BN] tile at rows rm and columns rn (m0 and n0 their first) of a row-major [M, N] source: a TMA
    descriptor, or a pointer with row stride `stride_m`. Zero out of range."""
    if TMA:  # an if/else, not an early return: Triton 3.6 compiles what follows a constexpr branch's return
        tile = src.load([m0, n0])
    else:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tile = tl.load(src + rm[:, None] * stride_m + rn[None, :], mask=mask, other=0.0)
    return tile


@triton.jit
def _store_tile(dst, value, m0, n0, rm, rn, M, N, stride_m, TMA: tl.constexpr):
    """`_load_tile`'s store: nothing written out of range."""
    if TMA:
        dst.store([m0, n0], value)
    else:
        tl.store(dst + rm[:, None] * stride_m + rn[None, :], value, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _preactivations(
    y_g, y_u, xa_ptr, bg, bu, m0, n0, rm, rn, M, N, rank_g, rank_u, stride_ym, stride_xm, scale_g, scale_u,
    BR: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """fp32 [BM, BN] tiles of g = y_g + s_g xa_g B_g^T and u = y_u + s_u xa_u B_u^T, plus the xa tiles; y_g and y_u
    are y's two halves (`_load_tile` sources)."""
    xg = _load_xa(xa_ptr, rm, M, 0, rank_g, stride_xm, BR)
    xu = _load_xa(xa_ptr, rm, M, rank_g, rank_u, stride_xm, BR)
    g = _load_tile(y_g, m0, n0, rm, rn, M, N, stride_ym, TMA).to(tl.float32) + scale_g * _dot(xg, tl.trans(bg), IEEE)
    u = _load_tile(y_u, m0, n0, rm, rn, M, N, stride_ym, TMA).to(tl.float32) + scale_u * _dot(xu, tl.trans(bu), IEEE)
    return g, u, xg, xu


@triton.jit
def _run_tile(
    i, row_tiles, y_g, y_u, xa_ptr, bg, bu, n0, rn, M, N, rank_g, rank_u, stride_ym, stride_xm, scale_g, scale_u,
    BM: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """This program's i-th row tile (grid axis 1: runs of `row_tiles` tiles of BM rows): its first row m0, its rows,
    and `_preactivations` of the tile (g, u, xa_g, xa_u)."""
    m0 = (tl.program_id(1) * row_tiles + i) * BM
    rm = (m0 + tl.arange(0, BM)).to(tl.int64)
    g, u, xg, xu = _preactivations(
        y_g, y_u, xa_ptr, bg, bu, m0, n0, rm, rn, M, N, rank_g, rank_u, stride_ym, stride_xm, scale_g, scale_u, BR,
        IEEE, TMA,
    )  # fmt: skip
    return m0, rm, g, u, xg, xu


@triton.jit
def swiglu_lora_fwd_kernel(
    y_g, y_u, xa_ptr, bg_ptr, bu_ptr, h_dst, ad_ptr, xad_ptr, M, N, rank_g, rank_u, rank_d, stride_ym, stride_xm,
    stride_bgn, stride_bgr, stride_bun, stride_bur, stride_hm, stride_ad, stride_xdm, scale_g, scale_u, row_tiles,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, BRD: tl.constexpr, DOWN: tl.constexpr, IEEE: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """h = silu(g) * u for one column block of BN activations over `row_tiles` row tiles of BM: y read once, h
    written once (y's gate and up halves and h are `_load_tile` sources). The block's B rows (and A_down columns)
    are loaded once per program, not once per tile: with single-tile programs those loads were as many bytes as
    the tile's y, and the kernel ran at ~1.6x its memory floor. With DOWN, also the tile's part of the down
    projection's x A^T (the rounded h against A_down's columns of the tile), added into xa_down [M, rank_d] with
    fp32 atomics: the down projection's LoRA then never reads h again."""
    n0 = tl.program_id(0) * BN
    rn = n0 + tl.arange(0, BN)
    bg = _load_b(bg_ptr, xa_ptr, rn, N, rank_g, stride_bgn, stride_bgr, BR)
    bu = _load_b(bu_ptr, xa_ptr, rn, N, rank_u, stride_bun, stride_bur, BR)
    rd = tl.arange(0, BRD)
    if DOWN:
        ad = _load_a_down(ad_ptr, xa_ptr, rn, N, rank_d, stride_ad, BRD)
    for i in range(row_tiles):
        m0, rm, g, u, _, _ = _run_tile(
            i, row_tiles, y_g, y_u, xa_ptr, bg, bu, n0, rn, M, N, rank_g, rank_u, stride_ym, stride_xm, scale_g,
            scale_u, BM, BR, IEEE, TMA,
        )  # fmt: skip
        h = (g * tl.sigmoid(g) * u).to(xa_ptr.dtype.element_ty)  # h, y and xa share one dtype (the launcher's check)
        _store_tile(h_dst, h, m0, n0, rm, rn, M, N, stride_hm, TMA)
        if DOWN:
            tl.atomic_add(xad_ptr + rm[:, None] * stride_xdm + rd[None, :], _dot(h, tl.trans(ad), IEEE),
                          mask=(rm[:, None] < M) & (rd[None, :] < rank_d), sem="relaxed")  # fmt: skip


@triton.jit
def _load_a_down(ad_ptr, xa_ptr, rn, N, rank, stride_ad, BRD: tl.constexpr):
    """A_down[:rank, rn] as [BRD, BN] (zero past the rank and N), in xa's dtype (as `_load_b`)."""
    rr = tl.arange(0, BRD)
    mask = (rr[:, None] < rank) & (rn[None, :] < N)
    a = tl.load(ad_ptr + rr[:, None] * stride_ad + rn[None, :], mask=mask, other=0.0)
    return a.to(xa_ptr.dtype.element_ty)


@triton.jit
def swiglu_lora_bwd_kernel(
    y_g, y_u, dh_src, dy_g, dy_u, xa_ptr, bg_ptr, bu_ptr, dxa_ptr, dbg_ptr, dbu_ptr, ad_ptr, gxd_ptr, dad_ptr, M, N,
    rank_g, rank_u, rank_d, stride_ym, stride_xm, stride_bgn, stride_bgr, stride_bun, stride_bur, stride_dhm,
    stride_dym, stride_dxm, stride_ad, stride_gxd, scale_g, scale_u, row_tiles,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, BRD: tl.constexpr, DOWN: tl.constexpr, IEEE: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One column block of BN activations over `row_tiles` row tiles of BM. The [M, N] tiles come from and go to
    `_load_tile` sources: y's gate and up halves, dh, and dy's two halves.

    Per tile: g and u recomputed (as in the forward), dy = [dg | du] written in y's dtype, and its two LoRA
    reductions taken from the rounded dy tile while it is in registers: dxa (summed over columns: each column block
    adds its part with fp32 atomics into [M, rank_g + rank_u]) and dB (summed over rows: accumulated in registers
    across this program's row tiles, then added once with fp32 atomics into [N, rank]).

    With DOWN, dh is the down projection's base dX only: the tile adds its LoRA part (gxd A_down, gxd = the
    gradient of xa_down) itself, and takes dA_down = gxd^T h from the recomputed, rounded h (summed over rows like
    dB: registers, then one atomic add into [rank_d, N])."""
    n0 = tl.program_id(0) * BN
    rn = n0 + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    bg = _load_b(bg_ptr, xa_ptr, rn, N, rank_g, stride_bgn, stride_bgr, BR)
    bu = _load_b(bu_ptr, xa_ptr, rn, N, rank_u, stride_bun, stride_bur, BR)
    dbg = tl.zeros((BN, BR), dtype=tl.float32)
    dbu = tl.zeros((BN, BR), dtype=tl.float32)
    rd = tl.arange(0, BRD)
    if DOWN:
        ad = _load_a_down(ad_ptr, xa_ptr, rn, N, rank_d, stride_ad, BRD)
        dad = tl.zeros((BRD, BN), dtype=tl.float32)
    for i in range(row_tiles):
        m0, rm, g, u, xg, xu = _run_tile(
            i, row_tiles, y_g, y_u, xa_ptr, bg, bu, n0, rn, M, N, rank_g, rank_u, stride_ym, stride_xm, scale_g,
            scale_u, BM, BR, IEEE, TMA,
        )  # fmt: skip
        dh = _load_tile(dh_src, m0, n0, rm, rn, M, N, stride_dhm, TMA)
        out_dtype = dh.dtype  # dy's: y's dtype, as dh's
        dh = dh.to(tl.float32)
        sig = tl.sigmoid(g)
        if DOWN:
            gxd_mask = (rm[:, None] < M) & (rd[None, :] < rank_d)
            gxd = tl.load(gxd_ptr + rm[:, None] * stride_gxd + rd[None, :], mask=gxd_mask, other=0.0)
            dh += _dot(gxd, ad, IEEE)
            dad += _dot(tl.trans(gxd), (g * sig * u).to(gxd.dtype), IEEE)
        # d silu(g)/dg = sig (1 + g (1 - sig)); out of range dh = 0, so dg = du = 0 there
        dg = (dh * u * sig * (1.0 + g * (1.0 - sig))).to(out_dtype)
        du = (dh * g * sig).to(out_dtype)
        _store_tile(dy_g, dg, m0, n0, rm, rn, M, N, stride_dym, TMA)
        _store_tile(dy_u, du, m0, n0, rm, rn, M, N, stride_dym, TMA)
        dxa_row = dxa_ptr + rm[:, None] * stride_dxm + rr[None, :]
        row_ok = rm[:, None] < M
        tl.atomic_add(dxa_row, scale_g * _dot(dg, bg, IEEE), mask=row_ok & (rr[None, :] < rank_g), sem="relaxed")
        tl.atomic_add(
            dxa_row + rank_g, scale_u * _dot(du, bu, IEEE), mask=row_ok & (rr[None, :] < rank_u), sem="relaxed"
        )
        dbg += _dot(tl.trans(dg), xg.to(dg.dtype), IEEE)
        dbu += _dot(tl.trans(du), xu.to(du.dtype), IEEE)
    col_ok = rn[:, None] < N
    tl.atomic_add(dbg_ptr + rn[:, None] * rank_g + rr[None, :], scale_g * dbg, mask=col_ok & (rr[None, :] < rank_g),
                  sem="relaxed")  # fmt: skip
    tl.atomic_add(dbu_ptr + rn[:, None] * rank_u + rr[None, :], scale_u * dbu, mask=col_ok & (rr[None, :] < rank_u),
                  sem="relaxed")  # fmt: skip
    if DOWN:
        dad_mask = (rd[:, None] < rank_d) & (rn[None, :] < N)
        tl.atomic_add(dad_ptr + rd[:, None] * N + rn[None, :], dad, mask=dad_mask, sem="relaxed")
