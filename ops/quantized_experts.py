"""Quantized MoE expert weights: stacked expert projections stored in FP8 (qfp8) or NF4 (qnf4), run as bf16 grouped
GEMMs on a dequantized copy that lives only for the duration of one GEMM (`surogate::quantized_grouped_mm`).

Why: Qwen3-30B-A3B is ~61 GB in bf16 and almost all of it is expert weights (48 layers x 3 projections x 128 experts
x 768 x 2048). Quantizing only the attention projections (what the q* recipes do for dense models) leaves no room
for activations on one 80 GB GPU; storing the experts in FP8 halves them, NF4 quarters them.

Formats (one projection's stack W [E, out, in], per-expert LoRA is separate and unchanged):
    fp8   codes [E, out, in] e4m3 + one fp32 scale per output row [E, out] (dequant: codes * scale), the same
          rowwise format as `ops.fp8.FP8LoRALinear`; quantized with `ops.fp8.quantize_rows` on the [E * out, in]
          view (the Triton kernel on CUDA).
    nf4   `ops.nf4.quantize_nf4` over the flattened stack ([E * out, in]): codes [E, out, in/2] uint8 (two per byte),
          int8 absmax per 64-weight block, double-quantized in groups of 256 blocks with one fp32 factor each and one
          fp32 mean for the whole stack. A block never straddles two experts (in is a multiple of 64 here).

Compute: the op dequantizes the whole stack to the activation dtype (one Triton kernel on CUDA: one read of the
codes, one write of the dense stack; `dequantize_experts_reference` elsewhere, bit-identical arithmetic) and runs
`ops.grouped_mm.grouped_mm` on it. Its registered autograd saves only the stored tensors and `offs`: the backward
(dX only; the base is frozen and no weight gradient is ever formed) dequantizes again and runs the transposed grouped
GEMM. So autograd never holds a dense copy of a stack between forward and backward, eager or compiled (a custom op is
opaque to AOTAutograd's partitioner, which could otherwise choose to save the dequantized stack). Cost: one extra
dequantization per projection per backward, ~3 bytes per weight of memory traffic, a few percent of a step.

Not done: FP8 grouped GEMMs (`torch._scaled_grouped_mm` exists in torch 2.11/2.13) were not tried: they could not be
measured here, and the dequantize + bf16 grouped GEMM path is the numerical reference either way.

References: `dequantize_experts_reference` (plain torch) and `quantized_grouped_mm_reference` (differentiable:
dequantize, then `grouped_mm_reference`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from ops.fp8 import E4M3, quantize_rows
from ops.grouped_mm import grouped_mm, grouped_mm_reference
from ops.nf4 import BLOCK, dequantize_nf4, dequantize_nf4_reference, quantize_nf4

__all__ = [
    "FORMATS",
    "dequantize_experts",
    "dequantize_experts_reference",
    "expert_nbytes",
    "quantize_experts",
    "quantized_grouped_mm",
    "quantized_grouped_mm_reference",
    "stats",
]

# Stored tensors of one projection, by format, in the order the op takes them (and their attribute suffixes).
FORMATS = {"fp8": ("", "_scale"), "nf4": ("", "_absmax", "_absmax_factor", "_absmax_mean")}
stats: Counter = Counter()  # "experts_dequantized": expert stacks dequantized by the op (forward and dX)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"expert weight format {fmt!r}: use one of {sorted(FORMATS)}")


def can_quantize_experts(w: Tensor, fmt: str) -> bool:
    """NF4 blocks of 64 run along the flattened stack; an input width that is a multiple of 64 keeps each block
    inside one expert's row."""
    return fmt == "fp8" or w.shape[-1] % BLOCK == 0


def quantize_experts(w: Tensor, fmt: str) -> list[Tensor]:
    """A stack [E, out, in] -> its stored tensors in `fmt` (see the module docstring), computed from `w` as given."""
    _check_format(fmt)
    if not can_quantize_experts(w, fmt):
        raise ValueError(f"NF4 expert weights need an input width divisible by {BLOCK}; got {list(w.shape)}")
    E, out, inp = w.shape
    flat = w.detach().reshape(E * out, inp)
    if fmt == "fp8":
        codes, scale = quantize_rows(flat, E4M3)
        return [codes.view(E, out, inp), scale.view(E, out)]
    codes, absmax_q, factor, mean = quantize_nf4(flat)
    return [codes.view(E, out, inp // 2), absmax_q, factor, mean]


def expert_nbytes(stored: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored)


# ----------------------------------------------------------------------------------------------------------------
# Dequantization: the reference and the FP8 Triton kernel (NF4 reuses ops/nf4.py's kernel on the flat view).
# ----------------------------------------------------------------------------------------------------------------


def _shape(stored: Sequence[Tensor], fmt: str) -> tuple[int, int, int]:
    E, out, k = stored[0].shape
    return E, out, k * 2 if fmt == "nf4" else k


def dequantize_experts_reference(stored: Sequence[Tensor], fmt: str, dtype: torch.dtype) -> Tensor:
    """Stored stack -> dense [E, out, in] `dtype`, computed in fp32 and rounded once (plain torch)."""
    _check_format(fmt)
    E, out, inp = _shape(stored, fmt)
    if fmt == "fp8":
        codes, scale = stored
        return (codes.float() * scale.float()[..., None]).to(dtype)
    codes, absmax_q, factor, mean = stored
    return dequantize_nf4_reference(codes.view(E * out, inp // 2), absmax_q, factor, mean, dtype).view(E, out, inp)


def _triton_fp8_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_dequantize_kernel(codes_ptr, scale_ptr, out_ptr, numel, cols, ELEMS: tl.constexpr):
        e = tl.program_id(0).to(tl.int64) * ELEMS + tl.arange(0, ELEMS)  # element indices (row-major)
        mask = e < numel
        code = tl.load(codes_ptr + e, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + e // cols, mask=mask, other=0.0)
        tl.store(out_ptr + e, (code * scale).to(out_ptr.dtype.element_ty), mask=mask)

    return fp8_dequantize_kernel


_FP8_KERNEL = None


def dequantize_experts_fp8_triton(codes: Tensor, scale: Tensor, dtype: torch.dtype, elems: int = 4096) -> Tensor:
    """codes [E, out, in] e4m3 * scale [E, out] -> `dtype` in one kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    global _FP8_KERNEL
    if _FP8_KERNEL is None:
        _FP8_KERNEL = _triton_fp8_kernel()
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    numel = out.numel()
    if numel:
        grid = (-(-numel // elems),)
        _FP8_KERNEL[grid](codes.contiguous(), scale.float().contiguous(), out, numel, codes.shape[-1], ELEMS=elems)
    return out


def dequantize_experts(stored: Sequence[Tensor], fmt: str, dtype: torch.dtype) -> Tensor:
    """Stored stack -> dense [E, out, in] `dtype`: one Triton kernel on CUDA, the reference elsewhere."""
    if stored[0].device.type != "cuda":
        return dequantize_experts_reference(stored, fmt, dtype)
    if fmt == "fp8":
        return dequantize_experts_fp8_triton(stored[0], stored[1], dtype)
    E, out, inp = _shape(stored, fmt)
    codes, absmax_q, factor, mean = stored
    return dequantize_nf4(codes.view(E * out, inp // 2), absmax_q, factor, mean, dtype).view(E, out, inp)


# ----------------------------------------------------------------------------------------------------------------
# The op: forward, fake, autograd (dX by dequantizing again; never a weight gradient).
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "surogate::quantized_grouped_mm",
    mutates_args=(),
    schema="(Tensor x, Tensor[] stored, Tensor offs, str fmt, bool transposed) -> Tensor",
)
def quantized_grouped_mm(x: Tensor, stored: list[Tensor], offs: Tensor, fmt: str, transposed: bool) -> Tensor:
    """`grouped_mm(x, W, offs)` with W [E, out, in] dequantized from `stored` (x [rows, in] -> [rows, out]), or with
    W^T when `transposed` (x [rows, out] -> [rows, in]: the dX of the former)."""
    w = dequantize_experts(stored, fmt, x.dtype)
    stats["experts_dequantized"] += 1
    return grouped_mm(x, w.transpose(-2, -1) if transposed else w, offs)


@quantized_grouped_mm.register_fake
def _(x: Tensor, stored: list[Tensor], offs: Tensor, fmt: str, transposed: bool) -> Tensor:
    _, out, inp = _shape(stored, fmt)
    return x.new_empty(x.shape[0], inp if transposed else out)


def _setup_context(ctx, inputs, output) -> None:
    x, stored, offs, fmt, transposed = inputs
    if any(t.requires_grad for t in stored):
        raise RuntimeError("surogate::quantized_grouped_mm never computes a weight gradient: freeze the expert stack")
    ctx.fmt, ctx.transposed = fmt, transposed
    ctx.n_stored = len(stored)
    ctx.save_for_backward(offs, *stored)  # the stored (quantized) tensors only: no dense copy is kept


def _backward(ctx, grad_y: Tensor):
    offs, *stored = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = quantized_grouped_mm(grad_y.contiguous(), stored, offs, ctx.fmt, not ctx.transposed)
    return grad_x, [None] * ctx.n_stored, None, None, None


quantized_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def quantized_grouped_mm_reference(x: Tensor, stored: Sequence[Tensor], offs: Tensor, fmt: str) -> Tensor:
    """Plain torch, differentiable: dequantize the stack, then the segment loop (what the op computes)."""
    return grouped_mm_reference(x, dequantize_experts_reference(stored, fmt, x.dtype), offs)
