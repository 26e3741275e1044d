"""NF4 LoRA linear: frozen base weights stored as 4-bit NormalFloat (QLoRA), LoRA in the activation dtype
(`surogate::lora_linear_nf4`, recipe qnf4; alias qbnb).

Format (QLoRA paper, Dettmers et al. 2023, as bitsandbytes and torchao store it):
    codes       each weight is the index (4 bits) of the nearest of 16 NormalFloat values (`NF4`, in [-1, 1]) after
                dividing by its block's absmax; blocks are 64 consecutive elements of the row-major flattened weight.
                Two codes per byte, the first element in the high nibble: a [out, in] weight is a [out, in/2] uint8
                tensor (a frozen parameter: FSDP shards it along out, the state-dict key stays `...weight`).
    absmax      double quantization of the per-block absmax: the mean is subtracted, then each group of 256 blocks
                is quantized linearly to int8 with its own fp32 factor (`absmax_q / factor + mean` gives it back).
    bytes       4 bits + 8 bits / 64 + 32 bits / (64 * 256) per weight = 4.127 bits: 0.258x of bf16.
This is torchao's NF4Tensor layout (quantized_data, quantized_scalers, quantization_factor, scaler_mean), kept as
plain tensors: a tensor subclass inside a compiled graph is fragile, plain tensors are graph inputs like any other.
torchao is not needed at run time; the tests check our quantization and dequantization against it.

Compute (`precision.compute`; there is no 4-bit tensor-core GEMM to run):
    bf16  the op dequantizes the stored codes to the activation dtype inside the forward and again in the backward
          (dX), runs the bf16 LoRA linear arithmetic of `ops.lora_linear` on that, and frees the dense weight.
    fp8   the op dequantizes straight to e4m3 codes with one fp32 scale per output row (`nf4_to_fp8`: the row scale
          comes from the stored block absmax, so one kernel pass, 1 byte written per weight instead of 2) and runs
          the base GEMMs on FP8 tensor cores exactly as qfp8 does with its stored codes (`ops.fp8`: activations e4m3
          rowwise in the forward; dy in `fp8_grad_format` with the row scales folded in, against the transposed
          codes, in dX). The weights see one more rounding (NF4 value -> e4m3, <= 2^-4 relative).
Nothing dense is saved between forward and backward, and no weight gradient is ever formed. A shared-input group
(q/k/v, gate/up) dequantizes each member into its row block of one buffer, so the fused op runs one base GEMM per
group.

Dequantization: on CUDA one fused Triton kernel (`ops/dequant_kernels.py`: unpack, look up, undo the double
quantization, scale, cast: one read of the codes, one write of the dense weight, in W^T's layout for dX if asked);
elsewhere `dequantize_nf4_reference`, the same arithmetic in plain torch, in the same order (the kernel matches it
bit for bit; tested under TRITON_INTERPRET=1). It is an op of its own (`surogate::nf4_dequantize`), so the eager
module (`NF4LoRALinear`, the numerical reference) records one graph node per weight, which the qnf4 pass
(`compile_passes/nf4_weights.py`) replaces by the stored tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops.compile_ahead import OpCounts, compile_ahead, launch, on_gpu
from ops.fp8 import (
    E4M3,
    FP8_MAX,
    GRAD_FORMATS,
    Fp8Weight,
    cached_row_absmax,
    cast_rows,
    fp8_base_forward,
    fp8_base_grad_input,
    row_codes,
)
from ops.lora_linear import (
    _lora_backward,
    _lora_forward,
    _split_grads,
    lora_grad_fake,
    lora_saved_inputs,
    mark_xa_non_differentiable,
    xa_or_its_grad,
)
from ops.quantized_lora_module import QuantizedLoRALinear

__all__ = [
    "BLOCK",
    "NF4",
    "SCALE_GROUP",
    "NF4LoRALinear",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "dequantize_nf4_triton",
    "lora_linear_nf4",
    "lora_linear_nf4_reference",
    "nf4_dequantize",
    "nf4_nbytes",
    "nf4_row_absmax",
    "nf4_to_fp8",
    "quantize_lora_base_nf4_",
    "quantize_nf4",
    "stats",
]

BLOCK = 64  # weights per absmax block
SCALE_GROUP = 256  # absmax blocks per double-quantization group
# The 16 NormalFloat values: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero (QLoRA appendix E;
# bitsandbytes' table). torchao rounds them to 4 decimals.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4 = torch.tensor(NF4_VALUES, dtype=torch.float32)
EPS = 1e-12  # absmax floor: an all-zero block divides by this, not by zero
stats = OpCounts()  # "nf4_dequantized": stored NF4 weights dequantized by the op (forward and dX)


# ----------------------------------------------------------------------------------------------------------------
# Quantization (at load) and dequantization (the reference, and what the op runs).
# ----------------------------------------------------------------------------------------------------------------


def quantize_nf4(w: Tensor, codebook: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[out, in] -> (codes [out, in/2] uint8, absmax_q [n_blocks] int8, factor [n_groups] fp32, mean [1] fp32).

    Computed in fp32 whatever the input dtype. numel must be a multiple of 64; a last double-quantization group of
    fewer than 256 blocks is allowed (torchao requires full groups). `codebook` (default NF4): tests pass torchao's."""
    if w.dim() != 2 or w.numel() % BLOCK or w.shape[1] % 2:
        raise ValueError(f"NF4 needs a 2-D weight with numel divisible by {BLOCK} and an even row; got {list(w.shape)}")
    blocks = w.detach().float().reshape(-1, BLOCK)  # [n_blocks, 64]
    absmax = blocks.abs().amax(dim=1)
    mean = absmax.mean().reshape(1)
    centered = absmax - mean
    n_blocks = absmax.numel()
    groups = F.pad(centered, (0, -n_blocks % SCALE_GROUP)).view(-1, SCALE_GROUP)
    factor = 256 / (2 * groups.abs().amax(dim=1).clamp_min(EPS))  # int8 levels per unit, per group
    absmax_q = (groups * factor[:, None]).round().clamp(-128, 127).flatten()[:n_blocks].to(torch.int8)
    # Codes: the nearest NF4 value to each weight over its block's exact absmax (as bitsandbytes and torchao do;
    # the double quantization of the absmax is a separate, later rounding).
    normed = blocks / absmax.clamp_min(EPS)[:, None]
    table = (NF4 if codebook is None else codebook).to(w.device, torch.float32)
    mid = (table[1:] + table[:-1]) / 2  # decision boundaries: bucketize = nearest value, without a [numel, 16] temp
    idx = torch.bucketize(normed.flatten(), mid, out_int32=True).to(torch.uint8)
    codes = (idx[0::2] << 4) | idx[1::2]
    return codes.view(w.shape[0], w.shape[1] // 2), absmax_q, factor, mean


def _absmax(absmax_q: Tensor, factor: Tensor, mean: Tensor) -> Tensor:
    """The per-block absmax back from its double quantization, fp32 [n_blocks]."""
    n = absmax_q.numel()
    q = F.pad(absmax_q.float(), (0, -n % SCALE_GROUP)).view(-1, SCALE_GROUP)
    return (q / factor[:, None].float()).flatten()[:n] + mean.float()


def dequantize_nf4_reference(
    codes: Tensor,  # [out, in/2] uint8
    absmax_q: Tensor,  # [n_blocks] int8
    factor: Tensor,  # [n_groups] fp32
    mean: Tensor,  # [1] fp32
    dtype: torch.dtype = torch.bfloat16,
    codebook: Tensor | None = None,  # [16]; default NF4 (tests pass torchao's rounded table)
    row_scale: Tensor | None = None,  # [out] fp32 multiplier per row (FP8 compute: 448 / row absmax)
) -> Tensor:  # [out, in] `dtype`, computed in fp32 and rounded once
    table = _nf4_table(codes.device) if codebook is None else codebook.to(codes.device, torch.float32)
    idx = torch.stack([codes >> 4, codes & 0xF], dim=-1).long()  # [out, in/2, 2]: high nibble first
    values = table[idx].view(-1, BLOCK) * _absmax(absmax_q, factor, mean)[:, None]
    return cast_rows(values.view(codes.shape[0], codes.shape[1] * 2), row_scale, dtype)


@functools.cache
def _nf4_table(device: torch.device) -> Tensor:
    """The NF4 codebook on `device`, copied once: a host-to-device copy per call would stall the host on every
    weight and is not allowed while a CUDA graph is captured (surogate/cuda_graphs.py)."""
    return NF4.to(device, torch.float32)


def dequantize_nf4_triton(
    codes: Tensor, absmax_q: Tensor, factor: Tensor, mean: Tensor, dtype: torch.dtype = torch.bfloat16,
    codebook: Tensor | None = None, row_scale: Tensor | None = None, out: Tensor | None = None,
    tile: tuple[int, int] | None = None,
) -> Tensor:  # fmt: skip
    """The fused kernel, one program per [BR, BC] tile of the output (CUDA, or CPU tensors under TRITON_INTERPRET=1
    in tests); in_features must be a multiple of 64 (whole blocks per row). `out`: an [out, in] view of `dtype` to
    write into, with unit stride along in (a row block of a group's buffer) or along out (a row block of a buffer laid
    out as W^T: the dX operand)."""
    from ops.dequant_kernels import nf4_dequantize_kernel, tile_launch

    if codes.shape[1] * 2 % BLOCK:
        raise ValueError(f"the NF4 kernel needs whole {BLOCK}-blocks per row; got {codes.shape[1] * 2} columns")
    table = _nf4_table(codes.device) if codebook is None else codebook.to(codes.device, torch.float32)
    tiles = tile_launch(codes, dtype, out, tile)
    row = row_scale.float().contiguous() if row_scale is not None else table  # dummy pointer when unused
    if codes.numel():
        launch(
            nf4_dequantize_kernel, tiles.grid, codes.contiguous(), absmax_q.contiguous(), factor.float().contiguous(),
            mean.float(), table, row, tiles.out, codes.shape[0], codes.shape[1] * 2, tiles.ld, BLOCK=BLOCK,
            GROUP=SCALE_GROUP, BR=tiles.br, BC=tiles.bc, HAS_ROW=row_scale is not None, FMAX=FP8_MAX.get(dtype, 0.0),
            TRANSPOSED=tiles.transposed, num_warps=4,
        )  # fmt: skip
    return tiles.out


def dequantize_nf4(
    codes: Tensor,  # [out, in/2] uint8
    absmax_q: Tensor,  # [n_blocks] int8
    factor: Tensor,  # [n_groups] fp32
    mean: Tensor,  # [1] fp32
    dtype: torch.dtype = torch.bfloat16,
    codebook: Tensor | None = None,  # [16]; default NF4 (tests pass torchao's rounded table)
    row_scale: Tensor | None = None,  # [out] fp32 multiplier per row, applied before the cast
) -> Tensor:  # [out, in] `dtype`
    """NF4 -> `dtype`: the Triton kernel on CUDA, the reference elsewhere (bit-identical results) and for shapes with
    blocks that straddle rows (in_features not a multiple of 64: no Qwen3 or Llama projection)."""
    if on_gpu(codes) and codes.shape[1] * 2 % BLOCK == 0:
        return dequantize_nf4_triton(codes, absmax_q, factor, mean, dtype, codebook, row_scale)
    return dequantize_nf4_reference(codes, absmax_q, factor, mean, dtype, codebook, row_scale)


def nf4_row_absmax(absmax_q: Tensor, factor: Tensor, mean: Tensor, rows: int) -> Tensor:
    """[rows] fp32: the largest |dequantized weight| a row can hold (its blocks' largest absmax; NF4 values are in
    [-1, 1]). Needs whole blocks per row (in % 64 == 0)."""
    if absmax_q.numel() % rows:
        raise ValueError(f"NF4 with FP8 compute needs in_features divisible by {BLOCK}: set precision.compute=bf16")
    return _absmax(absmax_q, factor, mean).view(rows, -1).abs().amax(dim=1).clamp_min(EPS)


def nf4_to_fp8(
    codes: Sequence[Tensor],
    absmax_q: Sequence[Tensor],
    factors: Sequence[Tensor],
    means: Sequence[Tensor],
    transposed: bool = False,
) -> Fp8Weight:
    """NF4-stored weights (a shared-input group: row blocks of one result) as e4m3 codes with one fp32 scale per
    output row, the operand of the FP8 GEMMs (`precision.compute: fp8`). One kernel per weight writes the codes
    straight into its row block; the dense bf16 weight is never made. The row scale (row absmax / 448) comes from
    the stored block absmax, so no pass over the weight is needed to find it. `transposed`: laid out for dX
    (`row_codes`)."""
    rows = [c.shape[0] for c in codes]
    amax = cached_row_absmax(
        [*absmax_q, *factors, *means],
        lambda: torch.cat([nf4_row_absmax(a, f, m, r) for a, f, m, r in zip(absmax_q, factors, means, rows)]),
    )

    def write(i: int, dst: Tensor, inv: Tensor) -> None:
        stored = (codes[i], absmax_q[i], factors[i], means[i])
        if on_gpu(dst):
            dequantize_nf4_triton(*stored, E4M3, row_scale=inv, out=dst)
        else:
            dst.copy_(dequantize_nf4_reference(*stored, E4M3, row_scale=inv))

    stats["nf4_dequantized"] += len(codes)
    return row_codes(amax, rows, codes[0].shape[1] * 2, write, transposed)


def nf4_nbytes(codes: Tensor, absmax_q: Tensor, factor: Tensor, mean: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (codes, absmax_q, factor, mean))


@torch.library.custom_op("surogate::nf4_dequantize", mutates_args=())
def nf4_dequantize(codes: Tensor, absmax_q: Tensor, factor: Tensor, mean: Tensor, dtype: torch.dtype) -> Tensor:
    """One NF4 weight back to `dtype` (one op, so the pass sees the stored tensors behind it)."""
    return dequantize_nf4(codes, absmax_q, factor, mean, dtype)


@nf4_dequantize.register_fake
def _(codes: Tensor, absmax_q: Tensor, factor: Tensor, mean: Tensor, dtype: torch.dtype) -> Tensor:
    return codes.new_empty(codes.shape[0], codes.shape[1] * 2, dtype=dtype)


def _dense(weights: Sequence[Tensor], nf4: Sequence[Sequence[Tensor]] | None, dtype: torch.dtype) -> Tensor:
    """The (group's) base weight as one dense [sum out, in] tensor: stored NF4 dequantized row block by row block,
    or the dense weights as given (a projection the recipe left unquantized)."""
    if nf4 is None:
        if weights[0].dtype == torch.uint8:
            raise RuntimeError("surogate::lora_linear_nf4 got NF4 codes without their absmax tensors")
        return weights[0] if len(weights) == 1 else torch.cat(list(weights))
    absmax_q, factors, means = nf4
    stats["nf4_dequantized"] += len(weights)
    if len(weights) == 1:
        return dequantize_nf4(weights[0], absmax_q[0], factors[0], means[0], dtype)
    rows = [c.shape[0] for c in weights]
    out = torch.empty(sum(rows), weights[0].shape[1] * 2, dtype=dtype, device=weights[0].device)
    for dst, c, a, f, m in zip(out.split(rows), weights, absmax_q, factors, means):
        dst.copy_(dequantize_nf4(c, a, f, m, dtype))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain torch, differentiable).
# ----------------------------------------------------------------------------------------------------------------


def lora_linear_nf4_reference(
    x: Tensor,  # [..., in]
    codes: Tensor,  # [out, in/2] uint8
    absmax_q: Tensor,
    factor: Tensor,
    mean: Tensor,
    lora_A: Tensor,  # [r, in]
    lora_B: Tensor,  # [out, r]
    scaling: float,
    bias: Tensor | None = None,
) -> Tensor:
    """linear(x, dequantize(W)) + scaling * B A x: what `NF4LoRALinear` computes eagerly."""
    w = dequantize_nf4(codes, absmax_q, factor, mean, x.dtype)
    return F.linear(x, w, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)


# ----------------------------------------------------------------------------------------------------------------
# The op: forward, backward, fakes, autograd.
# ----------------------------------------------------------------------------------------------------------------


def _nf4_args(absmax_q, factors, means):
    return None if absmax_q is None else (absmax_q, factors, means)


def _lora_linear_nf4(
    x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, absmax_q=None, factors=None, means=None,
    compute="bf16", grad_format="e5m2",
):  # fmt: skip
    """Returns (y [..., sum out], xa [N, sum r]); `weights` are NF4 codes when `absmax_q` etc. are given.
    compute fp8: the stored weights become e4m3 row codes and the base GEMM runs on FP8 tensor cores."""
    nf4 = _nf4_args(absmax_q, factors, means)
    if compute == "fp8" and nf4 is not None:
        fw = nf4_to_fp8(weights, *nf4)
        return _lora_forward(
            x, [], bias, lora_As, lora_Bs, scalings, lora_inputs, base_linear=lambda x2: fp8_base_forward(x2, fw)
        )
    w = _dense(weights, nf4, x.dtype)
    return _lora_forward(x, [w], bias, lora_As, lora_Bs, scalings, lora_inputs)


lora_linear_nf4 = torch.library.custom_op(
    "surogate::lora_linear_nf4",
    _lora_linear_nf4,
    mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor? bias, Tensor[] lora_As, Tensor[] lora_Bs, float[] scalings, "
    "Tensor[] lora_inputs, Tensor[]? absmax_q=None, Tensor[]? factors=None, Tensor[]? means=None, "
    'str compute="bf16", str grad_format="e5m2") -> (Tensor, Tensor)',
)


def _out_features(weights, absmax_q) -> int:
    return sum(w.shape[0] for w in weights)


def _in_features(weights, absmax_q) -> int:
    return weights[0].shape[1] * (2 if absmax_q is not None else 1)


@lora_linear_nf4.register_fake
def _(x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, absmax_q=None, factors=None, means=None, *options):
    args = (x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, absmax_q, factors, means, *options)
    compile_ahead(_lora_linear_nf4, *args)  # ops/compile_ahead.py
    n = x.numel() // x.shape[-1]
    out = _out_features(weights, absmax_q)
    return x.new_empty(*x.shape[:-1], out), x.new_empty(n, sum(a.shape[0] for a in lora_As))


def _lora_linear_nf4_grad(
    grad_y, lora_inputs, xa, weights, absmax_q, factors, means, lora_As, lora_Bs, scalings, shared_input, needs_grad_x,
    compute, grad_format,
):  # fmt: skip
    """(grad_x or empty, grad_A_cat, grad_B_full, grad_lora_inputs), as `surogate::lora_linear_grad`; the base
    weight is dequantized again here (only when dX is needed)."""
    nf4 = _nf4_args(absmax_q, factors, means)
    if needs_grad_x and compute == "fp8" and nf4 is not None:
        fw = nf4_to_fp8(weights, *nf4, transposed=True)
        width = grad_y.new_empty(0, _in_features(weights, absmax_q))  # _lora_backward reads only its width
        return _lora_backward(
            grad_y, lora_inputs, xa, [width], lora_As, lora_Bs, scalings, shared_input, needs_grad_x,
            base_grad_x=lambda dy: fp8_base_grad_input(dy, fw, "fp8", GRAD_FORMATS[grad_format]),
        )  # fmt: skip
    if needs_grad_x:
        w = _dense(weights, nf4, grad_y.dtype)
    else:  # _lora_backward reads only the input width then
        w = grad_y.new_empty(0, _in_features(weights, absmax_q))
    return _lora_backward(grad_y, lora_inputs, xa, [w], lora_As, lora_Bs, scalings, shared_input, needs_grad_x)


lora_linear_nf4_grad = torch.library.custom_op(
    "surogate::lora_linear_nf4_grad",
    _lora_linear_nf4_grad,
    mutates_args=(),
    schema="(Tensor grad_y, Tensor[] lora_inputs, Tensor xa, Tensor[] weights, Tensor[]? absmax_q, Tensor[]? factors, "
    "Tensor[]? means, Tensor[] lora_As, Tensor[] lora_Bs, float[] scalings, bool shared_input, bool needs_grad_x, "
    "str compute, str grad_format) -> (Tensor, Tensor, Tensor, Tensor[])",
)


@lora_linear_nf4_grad.register_fake
def _(grad_y, lora_inputs, xa, weights, absmax_q, factors, means, lora_As, lora_Bs, scalings, shared, needs_x, *o):
    args = (grad_y, lora_inputs, xa, weights, absmax_q, factors, means, lora_As, lora_Bs, scalings, shared, needs_x)
    compile_ahead(_lora_linear_nf4_grad, *args, *o)
    return lora_grad_fake(grad_y, lora_inputs, lora_As, _in_features(weights, absmax_q), shared, needs_x, bool(lora_Bs))


def _setup_context(ctx, inputs, output) -> None:
    x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = inputs[:7]
    nf4 = list(inputs[7:10]) + [None] * (10 - len(inputs))
    if any(w.requires_grad for w in weights) or (bias is not None and bias.requires_grad):
        raise RuntimeError("surogate::lora_linear_nf4 never computes a base weight/bias gradient: freeze the base")
    ctx.shared_input = len(lora_inputs) == 0
    ctx.n = len(weights)
    ctx.has_nf4 = nf4[0] is not None
    ctx.scalings = list(scalings)
    ctx.compute = inputs[10] if len(inputs) > 10 else "bf16"
    ctx.grad_format = inputs[11] if len(inputs) > 11 else "e5m2"
    ctx.ranks = [a.shape[0] for a in lora_As]
    ctx.outs = [b.shape[0] for b in lora_Bs]
    saved_inputs = lora_saved_inputs(x, lora_As, lora_inputs)
    ctx.k = len(saved_inputs)
    stored = [t for group in nf4 if group is not None for t in group]
    ctx.save_for_backward(output[1], *saved_inputs, *weights, *stored, *lora_As, *lora_Bs)
    mark_xa_non_differentiable(ctx, output, lora_Bs)


def _backward(ctx, grad_y, grad_xa):
    xa, *saved = ctx.saved_tensors
    xa = xa_or_its_grad(ctx, xa, grad_xa)
    k, n = ctx.k, ctx.n
    lora_inputs, saved = saved[:k], saved[k:]
    weights, saved = saved[:n], saved[n:]
    if ctx.has_nf4:
        absmax_q, factors, means, saved = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n], saved[3 * n :]
    else:
        absmax_q = factors = means = None
    lora_As, lora_Bs = saved[: len(ctx.ranks)], saved[len(ctx.ranks) :]
    needs_grad_x = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[6])
    grad_x, grad_a, grad_b, grad_lora_inputs = lora_linear_nf4_grad(
        grad_y, lora_inputs, xa, weights, absmax_q, factors, means, lora_As, lora_Bs, ctx.scalings, ctx.shared_input,
        needs_grad_x, ctx.compute, ctx.grad_format,
    )  # fmt: skip
    grad_As, grad_Bs = _split_grads(grad_a, grad_b, ctx.ranks, ctx.outs)
    if not needs_grad_x:
        grad_x, grad_lora_inputs = None, [None] * (0 if ctx.shared_input else k)
    # needs_input_grad has one entry per argument as called (options left at their defaults are not passed)
    options = [[None] * n if ctx.has_nf4 else None] * 3 + [None, None]
    return grad_x, [None] * n, None, grad_As, grad_Bs, None, grad_lora_inputs, *options[: len(ctx.needs_input_grad) - 7]


lora_linear_nf4.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# qnf4 storage: the eager module (numerical reference) and the conversion that makes it.
# ----------------------------------------------------------------------------------------------------------------


class NF4LoRALinear(QuantizedLoRALinear):
    """qnf4 storage: NF4 codes [out, in/2] uint8 in `weight` and the buffers `weight_absmax` (int8 per 64-weight
    block), `weight_absmax_factor` (fp32 per 256 blocks) and `weight_absmax_mean` (fp32 [1])."""

    format_name = "nf4"

    def __init__(self, lora: nn.Module, codes: Tensor, absmax_q: Tensor, factor: Tensor, mean: Tensor):
        super().__init__(lora, codes)
        self.register_buffer("weight_absmax", absmax_q)
        self.register_buffer("weight_absmax_factor", factor)
        self.register_buffer("weight_absmax_mean", mean)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        # the OpOverload itself, so every Dynamo version records one node (the pass looks for exactly this op)
        return torch.ops.surogate.nf4_dequantize.default(
            self.weight, self.weight_absmax, self.weight_absmax_factor, self.weight_absmax_mean, dtype
        )


def can_quantize_nf4(module: nn.Module) -> bool:
    return module.in_features % 2 == 0 and (module.in_features * module.out_features) % BLOCK == 0


def quantize_lora_base_nf4_(module: nn.Module) -> NF4LoRALinear:
    """The NF4 replacement of one LoRA module (to be set in its place by the caller); releases the module's
    reference to its dense weight (the memory is freed once nothing else, e.g. a packed group, holds it)."""
    new = NF4LoRALinear(module, *quantize_nf4(module.weight.detach()))
    module.weight = None
    return new
