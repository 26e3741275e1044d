"""SwiGLU over the gate/up LoRA group, with the LoRA-B products applied inside (`torch.ops.surogate.swiglu_lora`).

    y, xa = lora_linear(x, [W_gate, W_up], None, [A_gate, A_up], [], [s_g, s_u], [])  # no B: y = x W^T, xa = x A^T
    h = swiglu_lora(y, xa, [B_gate, B_up], [s_g, s_u])                                 # silu(g) * u

with [g | u] = y + [s_g xa_g B_g^T | s_u xa_u B_u^T]. `compile_passes/swiglu_lora_fusion.py` writes the graph this
way; the eager model (`F.silu(gate(x)) * up(x)` with LoRA modules) is the reference it is tested against.

Why: the gate/up output is the widest activation of the block ([tokens, 2 * intermediate]: 200 MB per micro-step on
Qwen3-8B), and the unfused path passes over it six times: the forward adds the rank-r update in place (read, write)
and SwiGLU reads it; the backward's SwiGLU reads it and writes dy, then `dy B` and `dy^T xa` (the LoRA gradients)
each read dy again. Here the forward reads y once and writes h; the backward reads y and dh once and writes dy,
and takes dxa and dB from each dy tile while it is still in registers. Four passes fewer per block and micro-step.

Numerics: g and u are formed in fp32 and never rounded (the unfused path rounds them to bf16 before SwiGLU); dy is
rounded to y's dtype, and dxa and dB are reduced from the rounded dy, as the unfused path's GEMMs do. dxa and dB
are summed in fp32 with atomics (one add per column block for dxa, one per group of row tiles for dB), so their
last bits depend on the order the GPU runs the blocks in, as with FlashAttention's dQ; with
`torch.use_deterministic_algorithms(True)` the backward takes the plain-torch path instead. (A deterministic
kernel, each program owning its partial sums over a block of rows and columns, ran at 1.5 TB/s against 2.2 on the
8B shape and worse on smaller ones: too few programs to hide memory latency.) The B's (and the down projection's A)
may come in any floating dtype (in training their fp32 masters: `compile_passes/lora_master_dtype.py`): rounded to
the activation dtype on load, their gradients returned in their own dtype (the fp32 sums, unrounded).

`swiglu_lora_down(y, xa, [B_g, B_u], s, A_down)` also returns the down projection's LoRA-A product xa_down =
h A_down^T (each forward tile adds its part with fp32 atomics), and its backward takes the down projection's LoRA
dX (gxd A_down, gxd the gradient of xa_down) into the dh tile it reads anyway and dA_down = gxd^T h from the h it
recomputes (`compile_passes/down_lora_fusion.py` writes it). The down projection then runs its base GEMM alone and
h is not kept for its backward: on Qwen3-8B, 535 -> 427 us per block and micro-step for these kernels plus the
three GEMMs they replace, and 3.4 GiB less peak memory (H100, benchmarks/NOTES.md).

xa may also come as y's last columns (xa then [N, 0]; `xa_tail` in ops/lora_linear.py,
`compile_passes/lora_xa_tail.py`): the op reads it there and its backward returns [dy | dxa] as one tensor.

Kernels: Triton on CUDA (`ops/swiglu_lora_kernels.py`; also on CPU tensors under TRITON_INTERPRET=1, for tests);
plain torch otherwise (CPU training) and for ranks above `_MAX_RANK`. `swiglu_lora_reference` is the
autograd-differentiable definition both are tested against.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ops._launch import (
    as_rows,
    cdiv,
    check_lora_mats,
    grad_rows_with_tail,
    lora_grad_buffer,
    lora_grad_dtype,
    move_dxa_to_tail,
    rank_block,
    round_lora_grads,
    split_flat,
    tile_sources,
    xa_from_tail,
)
from ops.compile_ahead import compile_ahead, launch, on_gpu

__all__ = ["swiglu_lora", "swiglu_lora_down", "swiglu_lora_down_reference", "swiglu_lora_reference"]

_MAX_RANK = 64  # per projection; the kernels pad the rank to a power of two >= 16 for one tl.dot per tile
# (BM, BN, warps)
_FWD_CONFIG = (64, 128, 4)  # TMA tiles, runs of row tiles: 4B/8B/14B with A_down 91.6 / 112.8 / 156.9 us (NOTES.md)
_BWD_CONFIG = (64, 64, 4)
_BWD_DOWN_CONFIG = (64, 64, 4)  # with the down projection's A: more live state per tile
_MAX_ROW_TILES = 8  # row tiles per program (B loaded once; the backward's dB partial sums kept in registers) ...
_PROGRAMS = 1024  # ... as long as about this many programs remain


def _row_tiles_per_program(col_blocks: int, row_tiles: int) -> int:
    """How many row tiles one program runs: up to `_MAX_ROW_TILES`, while ~`_PROGRAMS` programs still fill the GPU."""
    return max(1, min(_MAX_ROW_TILES, col_blocks * row_tiles // _PROGRAMS))


def swiglu_lora_reference(y: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float]) -> Tensor:
    """silu(g) * u, [g | u] = y + [s_g xa_g B_g^T | s_u xa_u B_u^T]; y [..., 2I], xa [N, r_g + r_u], B [I, r]."""
    (b_g, b_u), (s_g, s_u) = lora_Bs, scalings
    g, u = y.reshape(-1, y.shape[-1]).chunk(2, dim=-1)
    x_g, x_u = xa.split([b_g.shape[1], b_u.shape[1]], dim=1)
    g = g + s_g * (x_g @ b_g.to(xa.dtype).t())
    u = u + s_u * (x_u @ b_u.to(xa.dtype).t())
    return (F.silu(g) * u).view(*y.shape[:-1], g.shape[-1])


def swiglu_lora_down_reference(
    y: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float], down_A: Tensor
) -> tuple[Tensor, Tensor]:
    """(h, h A_down^T), h = `swiglu_lora_reference(...)`; xa_down [N, r_d] as the down projection's LoRA makes it."""
    h = swiglu_lora_reference(y, xa, lora_Bs, scalings)
    return h, h.reshape(-1, h.shape[-1]) @ down_A.to(h.dtype).t()


# ----------------------------------------------------------------------------------------------------------------
# Launchers: Triton kernels, or plain torch where they do not apply.
# ----------------------------------------------------------------------------------------------------------------


def _use_triton(y: Tensor, lora_Bs: list[Tensor], down_A: Tensor | None = None, xa: Tensor | None = None) -> bool:
    on_device = on_gpu(y) or os.environ.get("TRITON_INTERPRET") == "1"
    ranks = [b.shape[1] for b in lora_Bs] + ([] if down_A is None else [down_A.shape[0]])
    return on_device and max(ranks) <= _MAX_RANK and (xa is None or xa.dtype == y.dtype)


def _preactivations_torch(y2: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float]) -> tuple[Tensor, ...]:
    (b_g, b_u), (s_g, s_u) = lora_Bs, scalings
    x_g, x_u = xa.split([b_g.shape[1], b_u.shape[1]], dim=1)
    g, u = y2.float().chunk(2, dim=-1)
    b_g, b_u = b_g.to(xa.dtype), b_u.to(xa.dtype)  # B may come in its master dtype: the graph's cast, here
    return g + s_g * (x_g @ b_g.t()).float(), u + s_u * (x_u @ b_u.t()).float(), x_g, x_u


def _forward(
    y: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float], down_A: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(h [..., I], and with `down_A` [r_d, I] the down projection's xa_down = h A_down^T [N, r_d])."""
    inter = lora_Bs[0].shape[0]
    y, xa = xa_from_tail(y, xa, 2 * inter)
    y2 = as_rows(y)
    m = y2.shape[0]
    h = y2.new_empty(m, inter)
    xad = None
    if not _use_triton(y, lora_Bs, down_A, xa):
        g, u, _, _ = _preactivations_torch(y2, xa, lora_Bs, scalings)
        h.copy_(F.silu(g) * u)
        if down_A is not None:
            xad = h @ down_A.to(h.dtype).t()
    else:
        from ops.swiglu_lora_kernels import swiglu_lora_fwd_kernel

        (b_g, b_u), (s_g, s_u) = lora_Bs, scalings
        rank_d = 0 if down_A is None else down_A.shape[0]
        xad32 = torch.zeros(m, rank_d, device=y.device, dtype=torch.float32)  # atomics accumulate in fp32
        ad = xad32 if down_A is None else down_A  # never read without DOWN
        bm, bn, warps = _FWD_CONFIG
        tiles, tma = tile_sources([y2[:, :inter], y2[:, inter:], h], (bm, bn))  # y's gate and up halves, h
        if m and inter:
            col_blocks, row_tiles = cdiv(inter, bn), cdiv(m, bm)
            per_program = _row_tiles_per_program(col_blocks, row_tiles)
            launch(
                swiglu_lora_fwd_kernel, (col_blocks, cdiv(row_tiles, per_program)),
                tiles[0], tiles[1], xa, b_g, b_u, tiles[2], ad, xad32, m, inter, b_g.shape[1], b_u.shape[1], rank_d,
                y2.stride(0), xa.stride(0), b_g.stride(0), b_g.stride(1), b_u.stride(0), b_u.stride(1), h.stride(0),
                ad.stride(0), xad32.stride(0), float(s_g), float(s_u), per_program,
                BM=bm, BN=bn, BR=rank_block(lora_Bs), BRD=_down_rank_block(down_A), DOWN=down_A is not None,
                IEEE=y.dtype == torch.float32, TMA=tma, num_warps=warps,
            )  # fmt: skip
        if down_A is not None:
            xad = xad32.to(y.dtype)
    return h.view(*y.shape[:-1], inter), xad


def _down_rank_block(down_A: Tensor | None) -> int:
    return 16 if down_A is None else max(16, 1 << (down_A.shape[0] - 1).bit_length())


def _backward(
    grad_h: Tensor,
    y: Tensor,
    xa: Tensor,
    lora_Bs: list[Tensor],
    scalings: list[float],
    down_A: Tensor | None = None,
    grad_xad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(dy [..., 2I], the LoRA gradients dxa [N, r_g + r_u], dB_g, dB_u (and dA_down) flat in the B's dtype: see
    `_grad_layout`). With `down_A`, grad_h is the down projection's base dX only and grad_xad the gradient of
    xa_down: its LoRA dX (grad_xad A_down) is added here. With xa in y's tail (`ops._launch`), dy is [dy | dxa]
    and the flat buffer holds the rest."""
    y_in, width = y, 2 * lora_Bs[0].shape[0]
    y, xa = xa_from_tail(y, xa, width)
    y2, dh = as_rows(y), as_rows(grad_h)
    (b_g, b_u), (s_g, s_u) = lora_Bs, scalings
    if not _use_triton(y, lora_Bs, down_A) or torch.are_deterministic_algorithms_enabled():  # atomics: docstring
        g, u, x_g, x_u = _preactivations_torch(y2, xa, lora_Bs, scalings)
        sig = torch.sigmoid(g)
        dh32 = dh.float()
        dad = None
        if down_A is not None:
            dh32 = dh32 + (grad_xad @ down_A.to(grad_xad.dtype)).float()
            dad = grad_xad.t() @ (g * sig * u).to(y.dtype)
        dg = (dh32 * u * sig * (1 + g * (1 - sig))).to(y.dtype)
        du = (dh32 * g * sig).to(y.dtype)
        dxa = torch.cat([s_g * (dg @ b_g.to(dg.dtype)), s_u * (du @ b_u.to(du.dtype))], dim=1)
        lora = [dxa, s_g * (dg.t() @ x_g), s_u * (du.t() @ x_u)] + ([] if dad is None else [dad])
        grad_dtype = lora_grad_dtype(lora_Bs)
        dy, flat = torch.cat([dg, du], dim=1), torch.cat([t.flatten().to(grad_dtype) for t in lora])
        return move_dxa_to_tail(dy, flat, y_in, width)
    dy_full, flat = _backward_triton(dh, y_in, y2, xa, b_g, b_u, float(s_g), float(s_u), down_A, grad_xad)
    return dy_full.view(y_in.shape), flat


def _grad_layout(xa: Tensor, lora_Bs: list[Tensor], down_A: Tensor | None) -> list[tuple[int, ...]]:
    """The backward's flat LoRA gradients: dxa, dB_g, dB_u and (with the down projection's A) dA_down."""
    return lora_grad_buffer(
        xa.shape[0], xa.shape[1], [b.shape for b in lora_Bs] + ([] if down_A is None else [down_A.shape])
    )


def _backward_triton(
    dh: Tensor,
    y_in: Tensor,  # y as the op got it: with xa in its tail, dy gets dxa in its tail too
    y2: Tensor,
    xa: Tensor,
    b_g: Tensor,
    b_u: Tensor,
    s_g: float,
    s_u: float,
    down_A: Tensor | None = None,
    grad_xad: Tensor | None = None,
):
    from ops.swiglu_lora_kernels import swiglu_lora_bwd_kernel

    m, width = y2.shape
    inter = width // 2
    r_g, r_u = b_g.shape[1], b_u.shape[1]
    dy_full, dy = grad_rows_with_tail(y_in, width)
    bm, bn, warps = _BWD_CONFIG if down_A is None else _BWD_DOWN_CONFIG
    halves = [y2[:, :inter], y2[:, inter:], dh, dy[:, :inter], dy[:, inter:]]  # y's and dy's gate and up halves
    tiles, tma = tile_sources(halves, (bm, bn))
    shapes = _grad_layout(xa, [b_g, b_u], down_A)
    flat = torch.zeros(sum(a * b for a, b in shapes), device=y2.device, dtype=torch.float32)  # atomics: fp32
    dxa, db_g, db_u, *rest = split_flat(flat, shapes)
    rank_d = 0 if down_A is None else down_A.shape[0]
    dad, ad, gxd = (dxa, dxa, dxa) if down_A is None else (rest[0], down_A, as_rows(grad_xad))  # unread w/o DOWN
    if m and inter:
        col_blocks, row_tiles = cdiv(inter, bn), cdiv(m, bm)
        # Each program keeps its dB partial in registers over its row tiles (fewer atomics)
        per_program = _row_tiles_per_program(col_blocks, row_tiles)
        grid = (col_blocks, cdiv(row_tiles, per_program))
        launch(
            swiglu_lora_bwd_kernel, grid,
            *tiles, xa, b_g, b_u, dxa, db_g, db_u, ad, gxd, dad, m, inter, r_g, r_u, rank_d, y2.stride(0),
            xa.stride(0), b_g.stride(0), b_g.stride(1), b_u.stride(0), b_u.stride(1), dh.stride(0), dy.stride(0),
            dxa.stride(0), ad.stride(0), gxd.stride(0), s_g, s_u, per_program,
            BM=bm, BN=bn, BR=rank_block([b_g, b_u]), BRD=_down_rank_block(down_A), DOWN=down_A is not None,
            IEEE=y2.dtype == torch.float32, TMA=tma, num_warps=warps,
        )  # fmt: skip
    return dy_full, round_lora_grads(flat, dy_full, width, lora_grad_dtype([b_g]))


# ----------------------------------------------------------------------------------------------------------------
# Registration: forward op, backward op, fakes, autograd.
# ----------------------------------------------------------------------------------------------------------------


def _check(y: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float]) -> None:
    tail = 0 if xa.shape[-1] else sum(b.shape[1] for b in lora_Bs)  # xa in y's tail (`ops._launch`)
    if len(lora_Bs) != 2 or len(scalings) != 2 or y.shape[-1] != 2 * lora_Bs[0].shape[0] + tail:
        raise ValueError(
            "swiglu_lora takes y [..., 2I] and xa [N, r_g + r_u] (or y [..., 2I + r_g + r_u] and xa [N, 0]) and the"
            " gate and up B matrices ([I, r] each)"
        )
    check_lora_mats("swiglu_lora", lora_Bs)


@torch.library.custom_op("surogate::swiglu_lora", mutates_args=())
def swiglu_lora(y: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float]) -> Tensor:
    """h [..., I] = silu(g) * u; y [..., 2I] (gate columns first), xa [N, r_g + r_u], lora_Bs [B_g, B_u] ([I, r])."""
    _check(y, xa, lora_Bs, scalings)
    return _forward(y, xa, lora_Bs, scalings)[0]


@swiglu_lora.register_fake
def _swiglu_lora_fake(y, xa, lora_Bs, scalings):
    compile_ahead(_forward, y, xa, lora_Bs, scalings)  # ops/compile_ahead.py
    return y.new_empty(*y.shape[:-1], lora_Bs[0].shape[0])


@torch.library.custom_op("surogate::swiglu_lora_grad", mutates_args=())
def swiglu_lora_grad(
    grad_h: Tensor, y: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float]
) -> tuple[Tensor, Tensor]:
    """(grad_y, [grad_xa, grad_B_gate, grad_B_up] flat: one output, as outputs may not alias; see `_grad_layout`)."""
    return _backward(grad_h, y, xa, lora_Bs, scalings)


@swiglu_lora_grad.register_fake
def _swiglu_lora_grad_fake(grad_h, y, xa, lora_Bs, scalings):
    compile_ahead(_backward, grad_h, y, xa, lora_Bs, scalings)
    return y.new_empty(y.shape), lora_Bs[0].new_empty(xa.numel() + sum(b.numel() for b in lora_Bs))


def _setup_context(ctx, inputs, output) -> None:
    y, xa, lora_Bs, scalings = inputs
    ctx.scalings = list(scalings)
    ctx.save_for_backward(y, xa, *lora_Bs)  # y is saved instead of the unfused path's g and u (same size)


def _backward_formula(ctx, grad_h):
    y, xa, b_g, b_u = ctx.saved_tensors
    grad_y, flat = swiglu_lora_grad(grad_h, y, xa, [b_g, b_u], ctx.scalings)
    grad_xa, grad_bg, grad_bu = split_flat(flat, _grad_layout(xa, [b_g, b_u], None))
    return grad_y, grad_xa.to(xa.dtype), [grad_bg.to(b_g.dtype), grad_bu.to(b_u.dtype)], None


swiglu_lora.register_autograd(_backward_formula, setup_context=_setup_context)


@torch.library.custom_op("surogate::swiglu_lora_down", mutates_args=())
def swiglu_lora_down(
    y: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float], down_A: Tensor
) -> tuple[Tensor, Tensor]:
    """(h, xa_down = h A_down^T [N, r_d]): `swiglu_lora` that also makes the down projection's LoRA product, so the
    down projection runs its base GEMM alone and h is never read again for its LoRA (see the module docstring)."""
    _check(y, xa, lora_Bs, scalings)
    if down_A.shape[-1] != lora_Bs[0].shape[0]:
        raise ValueError("swiglu_lora_down takes the down projection's A as [r, I]")
    check_lora_mats("swiglu_lora_down", [*lora_Bs, down_A])
    return _forward(y, xa, lora_Bs, scalings, down_A)


@swiglu_lora_down.register_fake
def _swiglu_lora_down_fake(y, xa, lora_Bs, scalings, down_A):
    compile_ahead(_forward, y, xa, lora_Bs, scalings, down_A)
    h = y.new_empty(*y.shape[:-1], lora_Bs[0].shape[0])
    return h, y.new_empty(xa.shape[0], down_A.shape[0])


@torch.library.custom_op("surogate::swiglu_lora_down_grad", mutates_args=())
def swiglu_lora_down_grad(
    grad_h: Tensor,
    grad_xa_down: Tensor,
    y: Tensor,
    xa: Tensor,
    lora_Bs: list[Tensor],
    scalings: list[float],
    down_A: Tensor,
) -> tuple[Tensor, Tensor]:
    """(grad_y, [grad_xa, grad_B_gate, grad_B_up, grad_A_down] flat: see `_grad_layout`)."""
    return _backward(grad_h, y, xa, lora_Bs, scalings, down_A, grad_xa_down)


@swiglu_lora_down_grad.register_fake
def _swiglu_lora_down_grad_fake(grad_h, grad_xa_down, y, xa, lora_Bs, scalings, down_A):
    compile_ahead(_backward, grad_h, y, xa, lora_Bs, scalings, down_A, grad_xa_down)
    n = xa.numel() + sum(b.numel() for b in lora_Bs) + down_A.numel()
    return y.new_empty(y.shape), lora_Bs[0].new_empty(n)


def _setup_context_down(ctx, inputs, output) -> None:
    y, xa, lora_Bs, scalings, down_A = inputs
    ctx.scalings = list(scalings)
    ctx.save_for_backward(y, xa, *lora_Bs, down_A)  # not h: the backward recomputes it from y


def _backward_formula_down(ctx, grad_h, grad_xa_down):
    y, xa, b_g, b_u, down_A = ctx.saved_tensors
    if grad_h is None:
        grad_h = y.new_zeros(*y.shape[:-1], b_g.shape[0])
    if grad_xa_down is None:
        grad_xa_down = xa.new_zeros(xa.shape[0], down_A.shape[0])
    grad_y, flat = swiglu_lora_down_grad(grad_h, grad_xa_down, y, xa, [b_g, b_u], ctx.scalings, down_A)
    grad_xa, grad_bg, grad_bu, grad_ad = split_flat(flat, _grad_layout(xa, [b_g, b_u], down_A))
    grad_bs = [grad_bg.to(b_g.dtype), grad_bu.to(b_u.dtype)]
    return grad_y, grad_xa.to(xa.dtype), grad_bs, None, grad_ad.to(down_A.dtype)


swiglu_lora_down.register_autograd(_backward_formula_down, setup_context=_setup_context_down)
