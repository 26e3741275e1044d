"""The q/k/v LoRA-B products, Qwen3's per-head q/k RMSNorm and RoPE in one op (`torch.ops.surogate.qkv_rope_lora`).

    y, xa = lora_linear(x, [W_q, W_k, W_v], None, [A_q, A_k, A_v], [], s, [])  # no B: y = x W^T, xa = x A^T
    q, k, v = qkv_rope_lora(y, xa, [B_q, B_k, B_v], s, [w_qnorm, w_knorm], cos, sin, head_dim, eps)

with [q_pre | k_pre | v] = y + [s_q xa_q B_q^T | s_k xa_k B_k^T | s_v xa_v B_v^T] (viewed as heads), q =
rope(rms_norm(q_pre)), k = rope(rms_norm(k_pre)); without norm weights (Llama) q and k are only rotated.
`compile_passes/qkv_rope_lora_fusion.py` writes the graph this way; the eager attention (`surogate/models/qwen3.py`:
LoRA modules, `RMSNorm`, `apply_rope`) is the reference it is tested against.

Why: unfused, the q/k/v output is passed over many times per block and micro-step: the rank-r update (read, write,
one cuBLAS kernel per projection), the norm and RoPE (read, write), and in the backward the norm and RoPE gradient
(two Inductor kernels), then `dy B` (one GEMM per projection) and `dy^T xa`. On Qwen3-8B that was ~0.28 ms per
block and micro-step (H100 profile, benchmarks/NOTES.md). Here the forward reads y once and writes q, k, v; the
backward reads the output gradients and the q/k part of y once, writes dy, and takes dxa and dB from each dy tile
while it is in registers.

Numerics: the pre-activations are formed in fp32 and never rounded (the unfused path rounds them to bf16 first);
the normalized value is rounded to the activation dtype before the weight, as in the eager module; the weight
product and RoPE stay in fp32 until the output is rounded. dxa and dB are summed in fp32 with atomics (last bits
depend on the order blocks run in); with `torch.use_deterministic_algorithms(True)` the backward takes the
plain-torch path. The B's may come in any floating dtype (in training their fp32 masters:
`compile_passes/lora_master_dtype.py`): the kernels round them to the activation dtype on load, and dB is returned
in B's dtype, so fp32 B's get the fp32 sums unrounded; dxa is returned in xa's dtype.

xa may also come as y's last columns (xa then [N, 0]; `xa_tail` in ops/lora_linear.py,
`compile_passes/lora_xa_tail.py`): the op reads it there and its backward returns [dy | dxa] as one tensor.

cos/sin may come as HF builds them ([..., head_dim], two equal halves) or as the one half both share ([...,
head_dim / 2]: `rope_cos_sin` in surogate/models/qwen3.py); the kernels then load half the rows (and hold two fewer
tiles: 4B/8B shapes on an H100, forward 57.7 -> 53.8 us, backward 111.6 -> 102.8).

Kernels: Triton on CUDA (`ops/qkv_rope_lora_kernels.py`; also on CPU tensors under TRITON_INTERPRET=1, for tests)
for head_dim a power of two >= 32 and ranks <= `_MAX_RANK`; plain torch otherwise (CPU training).
`qkv_rope_lora_reference` is the autograd-differentiable definition both are tested against.
"""

from __future__ import annotations

import os

import torch
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
from ops.compile_ahead import compile_ahead, gpu_multiprocessors, launch, on_gpu

__all__ = ["qkv_rope_lora", "qkv_rope_lora_reference"]

_MAX_RANK = 64  # per projection; the kernels pad the rank to a power of two >= 16 for one tl.dot per half tile
# (BM rows, warps, software-pipeline stages); H100 sweeps in benchmarks/NOTES.md. Session 16's sweep of tiles and
# stages: 32-row forward tiles and 64-row backward tiles, both with 2 stages, were 3-6% and 7-9% faster than the
# (16, 4) / (32, 4) tiles at the default 3 stages on every Qwen3 shape; 1 stage ran the backward ~1.2x slower.
_FWD_CONFIG = (32, 4, 2)
_BWD_CONFIG = (64, 4, 2)
# Row tiles per backward program (its dB partial sums stay in registers across them): as many as spread the grid
# over one wave when runs of up to 16 do, else 8. Session 13 found an H100 SM holding 2 programs (255 registers and
# 78 KB of shared memory each, at 32-row tiles); a grid just over one wave (Qwen3-4B/8B's 48 heads x 8 programs:
# 384) ran its second, half-full wave at the cost of a full one. The 64-row tiles were measured with this rule.
_BWD_ROW_TILES = (16, 8)
_BWD_PROGRAMS_PER_SM = 2


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _both_halves(t: Tensor, head_dim: int) -> Tensor:
    """cos or sin as [..., head_dim]: given as the one half both halves share ([..., head_dim / 2]), repeated."""
    return t if t.shape[-1] == head_dim else torch.cat((t, t), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = _both_halves(cos, x.shape[-1]), _both_halves(sin, x.shape[-1])
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def qkv_rope_lora_reference(
    y: Tensor,  # [B, S, Nq + Nk + Nv]: the bare base output of the q/k/v group
    xa: Tensor,  # [B * S, r_q + r_k + r_v]
    lora_Bs: list[Tensor],  # [N_i, r_i]
    scalings: list[float],
    norm_weights: list[Tensor],  # [w_q, w_k] ([head_dim] each) or [] (no q/k norm)
    cos: Tensor,  # broadcastable to [B, S, 1, head_dim], or [B, S, 1, head_dim / 2]: the half both halves share
    sin: Tensor,
    head_dim: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eager LoRA, RMSNorm and RoPE, as `surogate/models/qwen3.py` computes them: q, k, v [B, S, heads, head_dim]."""
    lead = y.shape[:-1]
    outs = [b.shape[0] for b in lora_Bs]
    parts = zip(
        y.reshape(-1, y.shape[-1]).split(outs, dim=1), xa.split([b.shape[1] for b in lora_Bs], dim=1), lora_Bs, scalings
    )
    q, k, v = (y_i + s * (x_i @ b.to(x_i.dtype).t()) for y_i, x_i, b, s in parts)
    q, k, v = (t.view(*lead, -1, head_dim) for t in (q, k, v))
    if norm_weights:
        q, k = _rms_norm(q, norm_weights[0], eps), _rms_norm(k, norm_weights[1], eps)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


# ----------------------------------------------------------------------------------------------------------------
# Launchers: Triton kernels, or plain torch where they do not apply.
# ----------------------------------------------------------------------------------------------------------------


def _use_triton(y: Tensor, lora_Bs: list[Tensor], head_dim: int) -> bool:
    on_device = on_gpu(y) or os.environ.get("TRITON_INTERPRET") == "1"
    pow2 = head_dim >= 32 and head_dim & (head_dim - 1) == 0
    return on_device and pow2 and max(b.shape[1] for b in lora_Bs) <= _MAX_RANK


def _cos_sin_rows(cos: Tensor, sin: Tensor, lead: torch.Size) -> tuple[Tensor, Tensor]:
    """cos and sin as [B * S, width] rows (a view for the model's [B, S, 1, width]; width head_dim or half of it)."""
    width = cos.shape[-1]
    shape = (*lead, 1, width)
    return tuple(as_rows(t.expand(shape).reshape(-1, width)) for t in (cos, sin))


def _backward_torch(grads, y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps):
    """The kernel's arithmetic in plain torch (fp32 until dy is rounded to y's dtype)."""
    lead = y.shape[:-1]
    ranks = [b.shape[1] for b in lora_Bs]
    xas = xa.split(ranks, dim=1)
    ys = y.reshape(-1, y.shape[-1]).split([b.shape[0] for b in lora_Bs], dim=1)
    cos32, sin32 = _both_halves(cos, head_dim).float(), _both_halves(sin, head_dim).float()
    dys = []
    for i, (g, y_i, x_i, b, s) in enumerate(zip(grads, ys, xas, lora_Bs, scalings)):
        g = g.float().reshape(*lead, -1, head_dim)
        if i < 2:  # RoPE's transpose: g cos + rot^T(g sin), rot^T(z) = cat(z2, -z1)
            z1, z2 = (g * sin32).chunk(2, dim=-1)
            g = g * cos32 + torch.cat((z2, -z1), dim=-1)
            if norm_weights:
                pre = (y_i.float() + s * (x_i.float() @ b.float().t())).view(g.shape)
                rstd = torch.rsqrt(pre.pow(2).mean(-1, keepdim=True) + eps)
                n = pre * rstd
                dn = g * norm_weights[i].float()
                g = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        dys.append(g.reshape(-1, b.shape[0]).to(y.dtype))
    dxa = torch.cat([s * (dy_i.float() @ b.float()) for dy_i, b, s in zip(dys, lora_Bs, scalings)], dim=1)
    dbs = [s * (dy_i.float().t() @ x_i.float()) for dy_i, x_i, s in zip(dys, xas, scalings)]
    flat = torch.cat([t.flatten() for t in (dxa, *dbs)]).to(lora_grad_dtype(lora_Bs))
    return torch.cat(dys, dim=1).view(y.shape), flat


def _kernel_operands(y, lora_Bs, norm_weights, cos, sin, head_dim):
    """What both kernels take: y as rows, the B matrices with unit column stride, the norm weights (cos stands in
    when there are none: never read), cos/sin as rows, heads of q and of k/v, and the ranks."""
    y2 = as_rows(y)
    bs = [b if b.stride(1) == 1 else b.contiguous() for b in lora_Bs]
    cos2, sin2 = _cos_sin_rows(cos, sin, y.shape[:-1])
    ws = list(norm_weights) if norm_weights else [cos2, cos2]
    heads = [lora_Bs[0].shape[0] // head_dim, lora_Bs[1].shape[0] // head_dim]
    return y2, bs, ws, cos2, sin2, heads, [b.shape[1] for b in lora_Bs]


def _forward(y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps) -> tuple[Tensor, Tensor, Tensor]:
    y, xa = xa_from_tail(y, xa, sum(b.shape[0] for b in lora_Bs))
    lead = y.shape[:-1]
    if not _use_triton(y, lora_Bs, head_dim):
        with torch.no_grad():
            q, k, v = qkv_rope_lora_reference(y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps)
        return q.contiguous(), k.contiguous(), v.contiguous()
    from ops.qkv_rope_lora_kernels import qkv_rope_lora_fwd_kernel

    y2, bs, ws, cos2, sin2, (hq, hkv), ranks = _kernel_operands(y, lora_Bs, norm_weights, cos, sin, head_dim)
    m = y2.shape[0]
    q, k, v = (y.new_empty(*lead, h, head_dim) for h in (hq, hkv, hkv))
    bm, warps, stages = _FWD_CONFIG
    if m:
        launch(
            qkv_rope_lora_fwd_kernel, (cdiv(m, bm), hq + 2 * hkv),
            y2, xa, *bs, *ws, cos2, sin2, q, k, v, m, hq, hkv, *ranks, y2.stride(0), xa.stride(0),
            *(b.stride(0) for b in bs), cos2.stride(0), *map(float, scalings), float(eps),
            D2=head_dim // 2, BM=bm, BR=rank_block(lora_Bs), NORM=bool(norm_weights), HALF=cos.shape[-1] < head_dim,
            IEEE=y.dtype == torch.float32,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return q, k, v


def _bwd_row_tiles_per_program(heads: int, row_tiles: int, multiprocessors: int | None) -> int:
    long_run, short_run = _BWD_ROW_TILES
    if multiprocessors is None:  # the interpreter (CPU tests): short runs, so that programs share a head
        return short_run
    groups = max(1, _BWD_PROGRAMS_PER_SM * multiprocessors // heads)
    return cdiv(row_tiles, groups) if groups >= cdiv(row_tiles, long_run) else short_run


def _backward(grads, y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps):
    """(dy [..., Nq + Nk + Nv], the LoRA gradients dxa [N, r_q + r_k + r_v], dB_q, dB_k, dB_v flat in the B's dtype).
    With xa in y's tail (`ops._launch`), dy is [dy | dxa] and the flat buffer holds the dB's."""
    y_in, width = y, sum(b.shape[0] for b in lora_Bs)
    y, xa = xa_from_tail(y, xa, width)
    triton_ok = _use_triton(y, lora_Bs, head_dim) and not torch.are_deterministic_algorithms_enabled()
    if not triton_ok:  # CPU; deterministic mode (the kernel sums with atomics)
        dy, flat = _backward_torch(grads, y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps)
        return move_dxa_to_tail(dy, flat, y_in, width)
    from ops.qkv_rope_lora_kernels import qkv_rope_lora_bwd_kernel

    y2, bs, ws, cos2, sin2, (hq, hkv), ranks = _kernel_operands(y, lora_Bs, norm_weights, cos, sin, head_dim)
    m = y2.shape[0]
    seq = y.shape[-2]
    # [B, S, H, D] views of the output gradients, any strides (attention's backward may hand them in [B, H, S, D]
    # memory order); the kernel needs unit stride in D
    gs = [g.reshape(-1, seq, g.shape[-2], head_dim) for g in grads]
    gs = [g if g.stride(-1) == 1 else g.contiguous() for g in gs]
    dy_full, dy = grad_rows_with_tail(y_in, width)
    bm, warps, stages = _BWD_CONFIG
    # The kernel's tile sources: TMA descriptors where every one allows (the gradients then as [B * S, H * D] rows,
    # so only in [B, S, H, D] memory order), else pointers (the gradients with their strides, passed below)
    srcs, tma = [*gs, y2, cos2, sin2, dy], False
    if m and all(g.is_contiguous() for g in gs):
        described, tma = tile_sources([*(g.view(m, -1) for g in gs), y2, cos2, sin2, dy], (bm, head_dim // 2))
        srcs = described if tma else srcs
    shapes = lora_grad_buffer(m, xa.shape[1], [b.shape for b in lora_Bs])
    flat = torch.zeros(sum(a * b for a, b in shapes), device=y.device, dtype=torch.float32)  # atomics: fp32
    dxa, *dbs = split_flat(flat, shapes)
    row_tiles = cdiv(m, bm)
    heads = hq + 2 * hkv
    per_program = _bwd_row_tiles_per_program(heads, row_tiles, gpu_multiprocessors(y))
    if m:
        launch(
            qkv_rope_lora_bwd_kernel, (heads, cdiv(row_tiles, per_program)),
            *srcs[:4], xa, *bs, *ws, *srcs[4:], dxa, *dbs, m, seq, hq, hkv, *ranks,  # srcs: dq dk dv y | cos sin dy
            *(st for g in gs for st in g.stride()[:3]), y2.stride(0), xa.stride(0), *(b.stride(0) for b in bs),
            cos2.stride(0), dy.stride(0), dxa.stride(0), *map(float, scalings), float(eps), per_program,
            D2=head_dim // 2, BM=bm, BR=rank_block(lora_Bs), NORM=bool(norm_weights), HALF=cos.shape[-1] < head_dim,
            IEEE=y.dtype == torch.float32, TMA=tma,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return dy_full.view(y_in.shape), round_lora_grads(flat, dy_full, width, lora_grad_dtype(lora_Bs))


# ----------------------------------------------------------------------------------------------------------------
# Registration: forward op, backward op, fakes, autograd.
# ----------------------------------------------------------------------------------------------------------------


def _check(
    y: Tensor, xa: Tensor, lora_Bs: list[Tensor], scalings: list[float], norm_weights: list[Tensor], head_dim: int
) -> None:
    widths = [b.shape[0] for b in lora_Bs]
    tail = 0 if xa.shape[-1] else sum(b.shape[1] for b in lora_Bs)  # xa in y's tail (`ops._launch`)
    if len(lora_Bs) != 3 or len(scalings) != 3 or y.shape[-1] != sum(widths) + tail or len(norm_weights) not in (0, 2):
        raise ValueError(
            "qkv_rope_lora takes y [..., Nq + Nk + Nv] (+ r_q + r_k + r_v with xa in its tail), the q, k and v B"
            " matrices, and 0 or 2 norm weights"
        )
    check_lora_mats("qkv_rope_lora", lora_Bs)
    if any(w % head_dim for w in widths) or head_dim % 2 or y.dim() < 2:
        raise ValueError(f"qkv_rope_lora: widths {widths} must be whole heads of even head_dim {head_dim}")


def _check_rotation(cos: Tensor, sin: Tensor, head_dim: int) -> None:
    if cos.shape[-1] not in (head_dim, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"qkv_rope_lora: cos/sin must be [..., {head_dim}] or [..., {head_dim // 2}], the same shape")


@torch.library.custom_op("surogate::qkv_rope_lora", mutates_args=())
def qkv_rope_lora(
    y: Tensor,
    xa: Tensor,
    lora_Bs: list[Tensor],
    scalings: list[float],
    norm_weights: list[Tensor],
    cos: Tensor,
    sin: Tensor,
    head_dim: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v), each [..., heads, head_dim]. See the module docstring."""
    _check(y, xa, lora_Bs, scalings, norm_weights, head_dim)
    _check_rotation(cos, sin, head_dim)
    return _forward(y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps)


@qkv_rope_lora.register_fake
def _qkv_rope_lora_fake(y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps):
    compile_ahead(_forward, y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps)  # ops/compile_ahead.py
    return tuple(y.new_empty(*y.shape[:-1], b.shape[0] // head_dim, head_dim) for b in lora_Bs)


@torch.library.custom_op("surogate::qkv_rope_lora_grad", mutates_args=())
def qkv_rope_lora_grad(
    grad_q: Tensor,
    grad_k: Tensor,
    grad_v: Tensor,
    y: Tensor,
    xa: Tensor,
    lora_Bs: list[Tensor],
    scalings: list[float],
    norm_weights: list[Tensor],
    cos: Tensor,
    sin: Tensor,
    head_dim: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(grad_y, [grad_xa, grad_B_q, grad_B_k, grad_B_v] flat: one output, as outputs may not alias; `ops._launch`)."""
    grads = (grad_q, grad_k, grad_v)
    return _backward(grads, y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps)


@qkv_rope_lora_grad.register_fake
def _qkv_rope_lora_grad_fake(grad_q, grad_k, grad_v, y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps):
    grads = (grad_q, grad_k, grad_v)
    compile_ahead(_backward, grads, y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps)
    return y.new_empty(y.shape), lora_Bs[0].new_empty(xa.numel() + sum(b.numel() for b in lora_Bs))


def _setup_context(ctx, inputs, output) -> None:
    y, xa, lora_Bs, scalings, norm_weights, cos, sin, head_dim, eps = inputs
    if any(w.requires_grad for w in norm_weights) or cos.requires_grad or sin.requires_grad:
        raise RuntimeError("surogate::qkv_rope_lora computes no gradient for the norm weights or cos/sin: freeze them")
    ctx.scalings, ctx.head_dim, ctx.eps, ctx.n_norm = list(scalings), head_dim, eps, len(norm_weights)
    ctx.save_for_backward(y, xa, cos, sin, *lora_Bs, *norm_weights)  # y: the bare base output, not q/k/v


def _backward_formula(ctx, grad_q, grad_k, grad_v):
    y, xa, cos, sin, *rest = ctx.saved_tensors
    lora_Bs, norm_weights = rest[:3], rest[3:]
    heads = [b.shape[0] // ctx.head_dim for b in lora_Bs]
    grads = [
        g if g is not None else y.new_zeros(*y.shape[:-1], h, ctx.head_dim)
        for g, h in zip((grad_q, grad_k, grad_v), heads)
    ]
    grad_y, flat = qkv_rope_lora_grad(
        *grads, y, xa, list(lora_Bs), ctx.scalings, list(norm_weights), cos, sin, ctx.head_dim, ctx.eps
    )
    grad_xa, *grad_Bs = split_flat(flat, lora_grad_buffer(xa.shape[0], xa.shape[1], [b.shape for b in lora_Bs]))
    grad_Bs = [g.to(b.dtype) for g, b in zip(grad_Bs, lora_Bs)]
    return grad_y, grad_xa.to(xa.dtype), grad_Bs, None, [None] * ctx.n_norm, None, None, None, None


qkv_rope_lora.register_autograd(_backward_formula, setup_context=_setup_context)
