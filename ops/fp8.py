"""FP8 LoRA linear: the frozen base GEMMs in FP8 on tensor cores, the LoRA path in bf16 (`surogate::lora_linear_fp8`).

Two recipes share this op family:

    fp8   base weights stay bf16 in memory; the op quantizes each (group of) frozen weight(s) to e4m3 once, on first
          use, and caches the codes (see `cached_fp8_weight`: keyed like `ops.lora_linear.frozen_concat`).
    qfp8  base weights are stored only as e4m3 codes + one fp32 scale per output row (`FP8LoRALinear`, made by
          `quantize_lora_base_`); the bf16 copy is gone. The pass hands the op the codes and scales as graph inputs.

Formats and scales (`scale` is always the *dequantization* multiplier, what `torch._scaled_mm` takes):
    activations x   e4m3, one scale per row (token), computed on the fly by a fused Triton kernel (absmax, scale,
                    cast in one launch; `quantize_rows`). Rowwise rather than tensorwise: equally fast here (the
                    kernel is one pass over a row that is in L2 anyway) and it needs no grid-wide absmax reduction.
    weights W       e4m3, one scale per output row. Forward `y = x W^T` is `_scaled_mm(xq, Wq.t())` with W's row
                    scales as scale_b [1, out]: the stored [out, in] codes are exactly the column-major operand.
    grad output dy  e5m2 ("hybrid", default: more range for gradients) or e4m3 (`fp8_grad_format`), rowwise.

The dX GEMM `dx = dy W` needs W with `out` as the contiguous (K) axis, because Hopper FP8 GEMMs are TN only:
    fp8   caches a second orientation, W^T [in, out] e4m3 with one scale per input column (its own absmax: the
          best accuracy for dX), so the backward does no layout work. With `cache_transposed=False` (the op
          option), or for the weights quantized once `set_transposed_budget`'s cap is reached
          (`precision.fp8_cache_transposed`: auto keeps the bf16 base plus the transposed codes within 40% of the
          GPU, which on 80 GB is all of Qwen3-8B's weights and about half of Qwen3-14B's), only the row codes are
          cached and dX runs as qfp8's does, below.
    qfp8  keeps one copy (memory is the point of the recipe) and uses dy W = (dy diag(s)) C with C the row codes:
          the row scales s of W fold into dy before it is quantized (the quantize kernel takes a column
          multiplier), and C is transposed per backward (1 byte/param read + write: 3.3% of a Qwen3-14B fp8 step
          on an H100 when every weight's dX ran this way).
The LoRA products (x A^T, (x A^T) B^T and their gradients) stay in the activation dtype, as in `lora_linear`.

`precision.compute: bf16` with fp8 weights dequantizes the codes inside the op, forward and backward (nothing bf16
is saved between them). No weight gradient is ever formed.

Devices: on CUDA the GEMMs are `torch._scaled_mm` (rowwise scaling, bf16 out, fast accumulation in the forward;
in dX only with `precision.fp8_dx_fast_accum`, which the FP8-compute recipes set: torchao and Transformer Engine keep
dX's accumulation precise, but with dy in e5m2 its rounding dominates. Measured on an H100 at Qwen3 4B-14B shapes,
4096 rows: the dX error against fp32 goes from 5.88e-2 to at most 5.90e-2, while the GEMM is 5-16% faster.)
Elsewhere (CPU tests) they are emulated exactly as `_scaled_mm` defines them: dequantize to fp32, matmul, round to
the output dtype. `stats["fp8_gemms"]` counts FP8 GEMMs run (either way), so tests and benchmarks can assert that
the FP8 path really ran.

References: `lora_linear_fp8_reference` (plain torch, differentiable: quantize -> dequantize -> linear) and
`quantize_rows_reference` (the Triton kernel is tested against it, also under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops.compile_ahead import OpCounts, compile_ahead, launch, on_gpu, shared
from ops.lora_linear import (
    FrozenWeightCache,
    _lora_backward,
    _lora_forward,
    _split_grads,
    frozen_concat,
    lora_grad_fake,
    lora_saved_inputs,
    mark_xa_non_differentiable,
    xa_or_its_grad,
)
from ops.quantized_lora_module import QuantizedLoRALinear

__all__ = [
    "E4M3",
    "E5M2",
    "FP8_MAX",
    "GRAD_FORMATS",
    "FP8Embedding",
    "FP8LoRALinear",
    "Fp8Weight",
    "dequantize",
    "dequantize_blockwise",
    "fp8_base_forward",
    "fp8_base_grad_input",
    "cached_fp8_weight",
    "cached_row_absmax",
    "cast_rows",
    "row_codes",
    "lora_linear_fp8",
    "lora_linear_fp8_reference",
    "quantize_blockwise",
    "quantize_lora_base_",
    "quantize_rows",
    "quantize_rows_reference",
    "quantize_tensorwise",
    "stats",
    "transpose_codes",
]

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
GRAD_FORMATS = {"e5m2": E5M2, "e4m3": E4M3}
EPS = 1e-12  # absmax floor: an all-zero row gets a tiny scale, not a division by zero
stats = OpCounts()  # "fp8_gemms": FP8 GEMMs run; "weights_quantized": frozen weights quantized (fp8 recipe)


# ----------------------------------------------------------------------------------------------------------------
# Quantization: references (plain torch) and the fused Triton rowwise kernel.
# ----------------------------------------------------------------------------------------------------------------


def quantize_rows_reference(
    x: Tensor,  # [M, K]
    dtype: torch.dtype = E4M3,
    col_scale: Tensor | None = None,  # [K] fp32, multiplied in before quantizing
) -> tuple[Tensor, Tensor]:  # codes [M, K] fp8, scale [M, 1] fp32 (dequant: codes * scale)
    fmax = FP8_MAX[dtype]
    xf = x.float() if col_scale is None else x.float() * col_scale.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    codes = (xf * (fmax / amax)).clamp(-fmax, fmax).to(dtype)
    return codes, amax / fmax


def quantize_tensorwise(x: Tensor, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """One scale for the whole tensor (0-d fp32)."""
    fmax = FP8_MAX[dtype]
    amax = x.float().abs().amax().clamp_min(EPS)
    return (x.float() * (fmax / amax)).clamp(-fmax, fmax).to(dtype), amax / fmax


def quantize_blockwise(w: Tensor, block: int = 128, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """Per (block x block) tile scales, as Hugging Face fine-grained FP8 checkpoints store them (`weight_scale_inv`,
    shape [ceil(out/block), ceil(in/block)])."""
    rows, cols = w.shape
    pr, pc = -rows % block, -cols % block
    wp = F.pad(w.float(), (0, pc, 0, pr))
    tiles = wp.view(wp.shape[0] // block, block, wp.shape[1] // block, block)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp_min(EPS)
    fmax = FP8_MAX[dtype]
    codes = (tiles * (fmax / amax)).clamp(-fmax, fmax).to(dtype).view(wp.shape)[:rows, :cols].contiguous()
    return codes, (amax / fmax).squeeze(3).squeeze(1)


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """codes [M, K] * scale ([M, 1] or [M] rowwise, or 0-d tensorwise), computed in fp32, rounded once to `dtype`."""
    s = scale.float()
    if s.dim() == 1:
        s = s[:, None]
    return (codes.float() * s).to(dtype)


def dequantize_blockwise(codes: Tensor, scale: Tensor, block: int = 128, dtype: torch.dtype = torch.bfloat16):
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[: codes.shape[0], : codes.shape[1]]
    return (codes.float() * s).to(dtype)


def _triton_quantize_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(
        x_ptr,
        col_ptr,
        q_ptr,
        s_ptr,
        K,
        stride_x,
        stride_q,
        FMAX: tl.constexpr,
        HAS_COL: tl.constexpr,
        BLOCK: tl.constexpr,  # >= K: the row is loaded once and held in registers between its absmax and the cast
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_COL:
            v = v * tl.load(col_ptr + cols, mask=cols < K, other=0.0)
        amax = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12)
        tl.store(s_ptr + row, amax / FMAX)
        q = tl.minimum(tl.maximum(v * (FMAX / amax), -FMAX), FMAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)

    @triton.jit
    def quantize_long_rows_kernel(
        x_ptr,
        col_ptr,
        q_ptr,
        s_ptr,
        K,
        stride_x,
        stride_q,
        FMAX: tl.constexpr,
        HAS_COL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, K, BLOCK):  # pass 1: absmax of the row (of x * col when HAS_COL)
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(col_ptr + cols, mask=cols < K, other=0.0)
            acc = tl.maximum(acc, tl.abs(v))
        amax = tl.maximum(tl.max(acc, axis=0), 1e-12)
        inv = FMAX / amax
        tl.store(s_ptr + row, amax / FMAX)
        for start in range(0, K, BLOCK):  # pass 2: scale, saturate, cast (the row is in L1/L2 from pass 1)
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(col_ptr + cols, mask=cols < K, other=0.0)
            q = tl.minimum(tl.maximum(v * inv, -FMAX), FMAX)
            tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)

    return quantize_rows_kernel, quantize_long_rows_kernel


_quantize_kernels = shared(_triton_quantize_kernels)  # made at the first launch, one object for every thread
ROW_IN_REGISTERS_MAX = 16384  # longer rows take the two-pass kernel (one row in registers would spill)


def quantize_rows_triton(
    x: Tensor,
    dtype: torch.dtype = E4M3,
    col_scale: Tensor | None = None,
    row_in_registers_max: int = ROW_IN_REGISTERS_MAX,
    block: int = 8192,  # the two-pass kernel's chunk
) -> tuple[Tensor, Tensor]:
    """The fused kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1 in tests).

    Rows up to 16384 wide are read once: the row stays in registers between its absmax and the cast. On an H100 (4096
    rows; microbench, CUDA-graphed) that took 2048 / 2560 / 9728 / 12288-wide rows from 8.4 / 12.4 / 47.4 / 54.8 us
    to 5.2 / 7.7 / 41.4 / 51.8 with 4 warps up to 4096 wide and 8 beyond; 2 warps up to 2560 wide then took 2048-wide
    rows from 5.9 to 4.7 us (a later sweep of 2 to 32 warps: every other width was within 1% of its best). Wider
    rows (Qwen3-4B/8B gate/up gradients, 19456 / 24576) were no faster that way, so they keep the two-pass kernel,
    whose second read hits L2: chunks of 8192 with 16 warps, 32 beyond 20480 wide (H100, 4096 rows, us, against
    chunks of 2048 with 16 warps: 17408 79.7 -> 77.9, 19456 89.3 -> 85.2, 24576 112.8 -> 105.6, 34816 198 -> 156,
    51200 > 340 -> 245)."""
    in_registers, long_rows = _quantize_kernels()
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, k = x.shape
    codes = torch.empty(rows, k, dtype=dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    col = col_scale.float().contiguous() if col_scale is not None else scale  # dummy pointer when unused
    if not rows:
        return codes, scale
    if k <= row_in_registers_max:
        launch(
            in_registers, (rows,), x, col, codes, scale, k, x.stride(0), codes.stride(0),
            FMAX=FP8_MAX[dtype], HAS_COL=col_scale is not None, BLOCK=max(16, 1 << (k - 1).bit_length()),
            num_warps=2 if k <= 2560 else 4 if k <= 4096 else 8,
        )  # fmt: skip
    else:
        launch(
            long_rows, (rows,), x, col, codes, scale, k, x.stride(0), codes.stride(0),
            FMAX=FP8_MAX[dtype], HAS_COL=col_scale is not None, BLOCK=min(block, max(16, 1 << (k - 1).bit_length())),
            num_warps=16 if k <= 20480 else 32,
        )  # fmt: skip
    return codes, scale


def _triton_transpose_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def transpose_kernel(src_ptr, dst_ptr, R, C, BLOCK: tl.constexpr):
        # One BLOCK x BLOCK tile: read rows of src coalesced, write rows of dst coalesced (the shuffle goes
        # through shared memory, which tl.trans arranges).
        pr, pc = tl.program_id(0), tl.program_id(1)
        rows = pr * BLOCK + tl.arange(0, BLOCK)
        cols = pc * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        tile = tl.load(src_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask)
        tl.store(dst_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], tl.trans(tile), mask=tl.trans(mask))

    return transpose_kernel


_transpose_kernel = shared(_triton_transpose_kernel)


def transpose_codes(codes: Tensor, block: int = 64) -> Tensor:
    """[R, C] contiguous 1-byte codes -> [C, R] contiguous (`codes.t().contiguous()`).

    Why a kernel: torch's generic copy transposes 1-byte elements with uncoalesced accesses, several times below
    memory bandwidth, and qfp8 transposes every stored weight once per backward (the dX GEMM needs `out` as the
    contiguous axis; Hopper FP8 GEMMs are TN only). CUDA, or CPU tensors under TRITON_INTERPRET=1 in tests.
    """
    if codes.t().is_contiguous():  # written transposed already (`row_codes(transposed=True)`)
        return codes.t()
    if not on_gpu(codes) and os.environ.get("TRITON_INTERPRET") != "1":
        return codes.t().contiguous()
    src = codes.contiguous().view(torch.uint8)
    R, C = src.shape
    dst = torch.empty(C, R, dtype=torch.uint8, device=codes.device)
    if R and C:
        launch(_transpose_kernel(), (_cdiv(R, block), _cdiv(C, block)), src, dst, R, C, BLOCK=block, num_warps=4)
    return dst.view(codes.dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantize_rows(x: Tensor, dtype: torch.dtype = E4M3, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rowwise quantization of [M, K]: the Triton kernel on CUDA, the reference elsewhere."""
    if on_gpu(x):
        return quantize_rows_triton(x, dtype, col_scale)
    return quantize_rows_reference(x, dtype, col_scale)


# ----------------------------------------------------------------------------------------------------------------
# FP8 GEMM: torch._scaled_mm on CUDA, exact emulation elsewhere.
# ----------------------------------------------------------------------------------------------------------------


def emulated_scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """What `_scaled_mm` computes: (a * scale_a) @ (b * scale_b) in fp32, rounded to `out_dtype`."""
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


def fp8_mm(
    a: Tensor,  # [M, K] fp8, row-major
    b: Tensor,  # [K, N] fp8, column-major
    scale_a: Tensor,  # [M, 1] fp32
    scale_b: Tensor,  # [1, N] fp32
    out_dtype: torch.dtype,
    fast_accum: bool,
) -> Tensor:  # [M, N]
    stats["fp8_gemms"] += 1
    if a.device.type != "cuda":
        return emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype)
    if out_dtype != torch.bfloat16:
        raise ValueError(f"FP8 GEMMs with rowwise scales produce bf16; got activations in {out_dtype} (use dtype=bf16)")
    if a.shape[1] % 16 or b.shape[1] % 16:
        raise ValueError(f"FP8 GEMMs need K and N divisible by 16; got [{a.shape[0]}, {a.shape[1]}] x {list(b.shape)}")
    return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)


# ----------------------------------------------------------------------------------------------------------------
# The quantized base weight as the op sees it.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Fp8Weight:
    codes: Tensor  # [out, in] e4m3 (forward operand: codes.t())
    scale: Tensor  # [1, out] fp32, per output row
    codes_t: Tensor | None = None  # [in, out] e4m3 (dX operand: codes_t.t()); None: transpose per backward
    scale_t: Tensor | None = None  # [1, in] fp32, per input column


WEIGHT_CACHE = FrozenWeightCache()  # fp8 recipe: each frozen bf16 weight (group) quantized once
_transposed_budget: int | None = None  # bytes of W^T codes WEIGHT_CACHE may hold; None: no cap
_dx_fast_accum = False  # cuBLAS fast accumulation in the dX GEMMs too (`precision.fp8_dx_fast_accum`)


def set_transposed_budget(nbytes: int | None) -> None:
    """Cap the bytes of transposed codes `cached_fp8_weight` keeps (None: no cap). A weight quantized once the cap
    is reached keeps only its row codes, and its dX runs as qfp8's does (the codes transposed per backward). Set by
    `surogate.parallelize` from `precision.fp8_cache_transposed`."""
    global _transposed_budget
    _transposed_budget = nbytes


def set_dx_fast_accum(enabled: bool) -> None:
    """Whether the dX GEMMs (`fp8_base_grad_input`) use cuBLAS's fast accumulation, as the forward always does.
    Process-wide; set by `surogate.parallelize` from `precision.fp8_dx_fast_accum`."""
    global _dx_fast_accum
    _dx_fast_accum = enabled


def _room_for_transposed(numel: int) -> bool:
    if _transposed_budget is None:
        return True
    held = sum(fw.codes_t.numel() for fw in WEIGHT_CACHE.values() if fw.codes_t is not None)
    return held + numel <= _transposed_budget


def quantize_weight(w: Tensor, transposed: bool = True) -> Fp8Weight:
    """Both orientations of a frozen [out, in] weight, each with its own absmax scales (rowwise e4m3)."""
    codes, scale = quantize_rows(w.detach(), E4M3)
    fw = Fp8Weight(codes, scale.view(1, -1))
    if transposed:
        codes_t, scale_t = quantize_rows(w.detach().t().contiguous(), E4M3)
        fw.codes_t, fw.scale_t = codes_t, scale_t.view(1, -1)
    return fw


def cached_fp8_weight(weights: Sequence[Tensor], transposed: bool = True) -> Fp8Weight:
    """The (concatenated) bf16 base weights quantized once; later calls hit the cache (fp8 recipe). `transposed`:
    also cache W^T's codes for dX (1 more byte per weight) while `set_transposed_budget` leaves room; without them
    dX runs as qfp8's does (transpose per call).

    See `ops.lora_linear.FrozenWeightCache` for the keying (an in-place write re-quantizes).
    """
    w = frozen_concat(weights)

    def quantize() -> Fp8Weight:
        stats["weights_quantized"] += 1
        return quantize_weight(w, transposed and _room_for_transposed(w.numel()))

    return WEIGHT_CACHE.get(w, (transposed,), quantize)


def clear_fp8_weight_cache() -> None:
    """Drop the cached FP8 codes of bf16 weights and the cached row absmax of 4-bit stored weights."""
    WEIGHT_CACHE.clear()
    ROW_ABSMAX_CACHE.clear()


def _stored_fp8_weight(codes: Sequence[Tensor], scales: Sequence[Tensor]) -> Fp8Weight:
    """qfp8: the stored codes/scales (zero-copy views when a group was packed by `quantize_lora_base_`)."""
    return Fp8Weight(frozen_concat(codes), frozen_concat(scales).view(1, -1))


def _dequantized(fw: Fp8Weight, dtype: torch.dtype) -> Tensor:
    return dequantize(fw.codes, fw.scale.view(-1), dtype)


def fp8_base_forward(x2: Tensor, fw: Fp8Weight, compute: str = "fp8") -> Tensor:
    """x [N, in] @ W^T -> [N, out] in x.dtype: x quantized rowwise to e4m3, one FP8 GEMM (or bf16 on dequantized
    codes with compute bf16). Also the base GEMM of the 4-bit storage recipes with FP8 compute (ops/nf4.py)."""
    if compute == "bf16":
        return x2 @ _dequantized(fw, x2.dtype).t()
    xq, xs = quantize_rows(x2, E4M3)
    return fp8_mm(xq, fw.codes.t(), xs, fw.scale, x2.dtype, fast_accum=True)


def fp8_base_grad_input(dy: Tensor, fw: Fp8Weight, compute: str, grad_dtype: torch.dtype) -> Tensor:
    """dy [N, out] @ W -> [N, in]: dy quantized to `grad_dtype`, against W^T's own codes when cached, else against
    the transposed row codes with W's row scales folded into dy."""
    if compute == "bf16":
        return dy @ _dequantized(fw, dy.dtype)
    if fw.codes_t is not None:
        dyq, dys = quantize_rows(dy, grad_dtype)
        return fp8_mm(dyq, fw.codes_t.t(), dys, fw.scale_t, dy.dtype, fast_accum=_dx_fast_accum)
    # dy W = (dy diag(s)) C: fold W's row scales into dy, quantize, GEMM against the transposed row codes.
    dyq, dys = quantize_rows(dy, grad_dtype, col_scale=fw.scale.view(-1))
    ones = torch.ones(1, fw.codes.shape[1], dtype=torch.float32, device=dy.device)
    return fp8_mm(dyq, transpose_codes(fw.codes).t(), dys, ones, dy.dtype, fast_accum=_dx_fast_accum)


def cast_rows(values: Tensor, row_scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """fp32 [rows, cols] (a dequantized weight) times an optional per-row multiplier, saturated to `dtype`'s range
    when that is FP8 (torch's cast would turn a value one rounding step past the maximum into NaN), rounded once.
    The plain-torch end of the 4-bit dequantize references (ops/nf4.py, ops/fp4.py)."""
    if row_scale is not None:
        values = values * row_scale.float()[:, None]
    if dtype in FP8_MAX:
        values = values.clamp(-FP8_MAX[dtype], FP8_MAX[dtype])
    return values.to(dtype)


ROW_ABSMAX_CACHE = FrozenWeightCache()  # 4-bit storage with FP8 compute: each group's row absmax, made once


def cached_row_absmax(scales: Sequence[Tensor], make: Callable[[], Tensor]) -> Tensor:
    """A group's row absmax (`make()`), computed once from its stored scale tensors and then cached.

    It depends only on the frozen scales, and making it is a gather, a cast and a reduction over 1/16 to 1/64 of
    the weight's size: on Qwen3-8B qfp4 with recompute that was ~40 ms of a 1.3 s step when done on every
    forward, recompute and backward. Keyed on the first scale tensor; the others' addresses and version counters
    ride along as options, so an in-place write to any of them (load_state_dict) makes it anew. The scales are
    module buffers, which FSDP leaves unsharded, so their addresses are stable in every mode."""
    first, *rest = scales
    return ROW_ABSMAX_CACHE.get(first, tuple((t.data_ptr(), t._version) for t in rest), make)


def row_codes(
    row_absmax: Tensor,
    rows: Sequence[int],
    cols: int,
    write: Callable[[int, Tensor, Tensor], None],
    transposed: bool = False,
) -> Fp8Weight:
    """The e4m3 row-code operand of a group of stored weights (row blocks of one [sum rows, cols] tensor) for the FP8
    GEMMs: `write(i, dst, inv_scale)` dequantizes weight i into its row block `dst` times `inv_scale` (448 / row
    absmax, per row); the scale handed to the GEMM is row absmax / 448. The 4-bit recipes read the row absmax off
    their stored block scales, so this is one pass over the codes.

    `transposed`: the codes are laid out as [cols, sum rows] (each `dst` is then a view with unit row stride), the
    orientation the dX GEMM reads, so the backward needs no transpose pass (`transpose_codes` returns it as is)."""
    fmax = FP8_MAX[E4M3]
    if transposed:
        codes = torch.empty(cols, sum(rows), dtype=E4M3, device=row_absmax.device).t()
        blocks = [b.t() for b in codes.t().split(rows, dim=1)]
    else:
        codes = torch.empty(sum(rows), cols, dtype=E4M3, device=row_absmax.device)
        blocks = codes.split(rows)
    for i, (dst, inv) in enumerate(zip(blocks, (fmax / row_absmax).split(rows))):
        write(i, dst, inv)
    return Fp8Weight(codes, (row_absmax / fmax).view(1, -1))


def _fp8_weight(
    weights: Sequence[Tensor], weight_scales: Sequence[Tensor] | None, cache_transposed: bool = True
) -> Fp8Weight:
    if weight_scales is None:
        if weights[0].dtype in FP8_MAX:
            raise RuntimeError("surogate::lora_linear_fp8 got FP8 weight codes without weight_scales")
        return cached_fp8_weight(weights, cache_transposed)
    return _stored_fp8_weight(weights, weight_scales)


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain torch, differentiable).
# ----------------------------------------------------------------------------------------------------------------


class _Fp8LinearReference(torch.autograd.Function):
    """x @ W^T with the op's quantization, in plain torch (fp32 matmuls of dequantized values)."""

    @staticmethod
    def forward(ctx, x2: Tensor, fw: Fp8Weight, grad_dtype: torch.dtype) -> Tensor:
        ctx.fw, ctx.grad_dtype = fw, grad_dtype
        xq = dequantize(*quantize_rows_reference(x2, E4M3), torch.float32)
        return (xq @ dequantize(fw.codes, fw.scale.view(-1), torch.float32).t()).to(x2.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        fw = ctx.fw
        if fw.codes_t is not None:  # fp8: dy quantized, W^T with per-input-column scales
            dyq = dequantize(*quantize_rows_reference(dy, ctx.grad_dtype), torch.float32)
            w = dequantize(fw.codes_t, fw.scale_t.view(-1), torch.float32).t()
        else:  # qfp8: W's row scales folded into dy, then the row codes
            dyq = dequantize(*quantize_rows_reference(dy, ctx.grad_dtype, fw.scale.view(-1)), torch.float32)
            w = fw.codes.float()
        return (dyq @ w).to(dy.dtype), None, None


def lora_linear_fp8_reference(
    x: Tensor,  # [..., in]
    weight: Tensor,  # [out, in] bf16 base (fp8 recipe) or e4m3 codes (with weight_scale)
    lora_A: Tensor,  # [r, in]
    lora_B: Tensor,  # [out, r]
    scaling: float,
    weight_scale: Tensor | None = None,  # [out] fp32 when `weight` holds codes
    grad_format: str = "e5m2",
) -> Tensor:
    """The op's arithmetic in plain torch: base GEMMs on rowwise-quantized operands, LoRA in x.dtype."""
    if weight_scale is None:
        fw = Fp8Weight(*(quantize_rows_reference(t, E4M3)[i] for t in (weight.detach(),) for i in (0, 1)))
        codes_t, scale_t = quantize_rows_reference(weight.detach().t().contiguous(), E4M3)
        fw.scale, fw.codes_t, fw.scale_t = fw.scale.view(1, -1), codes_t, scale_t.view(1, -1)
    else:
        fw = Fp8Weight(weight, weight_scale.view(1, -1))
    x2 = x.reshape(-1, x.shape[-1])
    base = _Fp8LinearReference.apply(x2, fw, GRAD_FORMATS[grad_format]).view(*x.shape[:-1], -1)
    return base + scaling * F.linear(F.linear(x, lora_A), lora_B)


# ----------------------------------------------------------------------------------------------------------------
# Kernels of the op (forward and backward), then registration.
# ----------------------------------------------------------------------------------------------------------------


_OPTIONS_DOC = 'Tensor[]? weight_scales=None, str grad_format="e5m2", str compute="fp8", bool cache_transposed=True'


def _lora_linear_fp8(
    x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, weight_scales=None, grad_format="e5m2", compute="fp8",
    cache_transposed=True,
):  # fmt: skip
    """Returns (y [..., sum out], xa [N, sum r]): `lora_linear`'s LoRA path around the FP8 base GEMM."""
    fw = _fp8_weight(weights, weight_scales, cache_transposed)
    return _lora_forward(
        x, [], bias, lora_As, lora_Bs, scalings, lora_inputs, base_linear=lambda x2: fp8_base_forward(x2, fw, compute)
    )


lora_linear_fp8 = torch.library.custom_op(
    "surogate::lora_linear_fp8",
    _lora_linear_fp8,
    mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor? bias, Tensor[] lora_As, Tensor[] lora_Bs, float[] scalings, "
    f"Tensor[] lora_inputs, {_OPTIONS_DOC}) -> (Tensor, Tensor)",
)


@lora_linear_fp8.register_fake
def _lora_linear_fp8_fake(x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, *options):
    compile_ahead(_lora_linear_fp8, x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, *options)
    n = x.numel() // x.shape[-1]
    out = sum(w.shape[0] for w in weights)
    return x.new_empty(*x.shape[:-1], out), x.new_empty(n, sum(a.shape[0] for a in lora_As))


def _lora_linear_fp8_backward(
    grad_y, lora_inputs, xa, weights, weight_scales, lora_As, lora_Bs, scalings, shared_input, needs_grad_x, fmt,
    compute, cache_transposed,
):  # fmt: skip
    """(grad_x or empty, grad_A_cat, grad_B_full, grad_lora_inputs), as `surogate::lora_linear_grad`, with the base
    dX on FP8 tensor cores."""
    width = grad_y.new_empty(0, weights[0].shape[1])  # _lora_backward reads only the input width of `weights`
    lora_args = (grad_y, lora_inputs, xa, [width], lora_As, lora_Bs, scalings, shared_input, needs_grad_x)
    if not needs_grad_x:
        return _lora_backward(*lora_args)
    fw = _fp8_weight(weights, weight_scales, cache_transposed)
    return _lora_backward(*lora_args, base_grad_x=lambda dy: fp8_base_grad_input(dy, fw, compute, GRAD_FORMATS[fmt]))


lora_linear_fp8_backward = torch.library.custom_op(
    "surogate::lora_linear_fp8_backward",
    _lora_linear_fp8_backward,
    mutates_args=(),
    schema="(Tensor grad_y, Tensor[] lora_inputs, Tensor xa, Tensor[] weights, Tensor[]? weight_scales, "
    "Tensor[] lora_As, Tensor[] lora_Bs, float[] scalings, bool shared_input, bool needs_grad_x, str grad_format, "
    "str compute, bool cache_transposed) -> (Tensor, Tensor, Tensor, Tensor[])",
)


@lora_linear_fp8_backward.register_fake
def _backward_fake(grad_y, lora_inputs, xa, weights, weight_scales, lora_As, lora_Bs, scalings, shared, needs_x, *o):
    args = (grad_y, lora_inputs, xa, weights, weight_scales, lora_As, lora_Bs, scalings, shared, needs_x, *o)
    compile_ahead(_lora_linear_fp8_backward, *args)
    return lora_grad_fake(grad_y, lora_inputs, lora_As, weights[0].shape[1], shared, needs_x, bool(lora_Bs))


def _setup_context(ctx, inputs, output) -> None:
    x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = inputs[:7]
    opts = dict(zip(("weight_scales", "grad_format", "compute", "cache_transposed"), inputs[7:]))
    weight_scales = opts.get("weight_scales")
    if any(w.requires_grad for w in weights) or (bias is not None and bias.requires_grad):
        raise RuntimeError("surogate::lora_linear_fp8 never computes a base weight/bias gradient: freeze the base")
    ctx.shared_input = len(lora_inputs) == 0
    ctx.n_weights = len(weights)
    ctx.has_scales = weight_scales is not None
    ctx.scalings = list(scalings)
    ctx.grad_format = opts.get("grad_format", "e5m2")
    ctx.compute = opts.get("compute", "fp8")
    ctx.cache_transposed = opts.get("cache_transposed", True)
    ctx.ranks = [a.shape[0] for a in lora_As]
    ctx.outs = [b.shape[0] for b in lora_Bs]
    saved_inputs = lora_saved_inputs(x, lora_As, lora_inputs)
    ctx.n_inputs = len(saved_inputs)
    ctx.save_for_backward(output[1], *saved_inputs, *weights, *(weight_scales or []), *lora_As, *lora_Bs)
    mark_xa_non_differentiable(ctx, output, lora_Bs)


def _backward(ctx, grad_y, grad_xa):
    saved = list(ctx.saved_tensors)
    xa, saved = xa_or_its_grad(ctx, saved[0], grad_xa), saved[1:]
    k, n = ctx.n_inputs, ctx.n_weights
    lora_inputs, saved = saved[:k], saved[k:]
    weights, saved = saved[:n], saved[n:]
    scales, saved = (saved[:n], saved[n:]) if ctx.has_scales else (None, saved)
    lora_As, lora_Bs = saved[: len(ctx.ranks)], saved[len(ctx.ranks) :]
    needs_grad_x = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[6])
    # needs_input_grad has one entry per argument as called (options left at their defaults are not passed)
    grad_x, grad_a, grad_b, grad_lora_inputs = lora_linear_fp8_backward(
        grad_y, lora_inputs, xa, weights, scales, lora_As, lora_Bs, ctx.scalings, ctx.shared_input, needs_grad_x,
        ctx.grad_format, ctx.compute, ctx.cache_transposed,
    )  # fmt: skip
    grad_As, grad_Bs = _split_grads(grad_a, grad_b, ctx.ranks, ctx.outs)
    if not needs_grad_x:
        grad_x, grad_lora_inputs = None, [None] * (0 if ctx.shared_input else k)
    options = [[None] * n if ctx.has_scales else None, None, None, None][: len(ctx.needs_input_grad) - 7]
    return grad_x, [None] * n, None, grad_As, grad_Bs, None, grad_lora_inputs, *options


lora_linear_fp8.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# qfp8 storage: the eager module (numerical reference) and the conversion that makes it.
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("surogate::fp8_dequantize", mutates_args=())
def fp8_dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """codes [out, in] e4m3 * scale [out] -> `dtype` (one op, so the pass sees the stored weight behind it)."""
    return dequantize(codes, scale, dtype)


@fp8_dequantize.register_fake
def _(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return codes.new_empty(codes.shape, dtype=dtype)


class FP8LoRALinear(QuantizedLoRALinear):
    """qfp8 storage: e4m3 codes in `weight` with one fp32 scale per output row (`weight_scale`, a buffer)."""

    format_name = "fp8"

    def __init__(self, lora: nn.Module, codes: Tensor, scale: Tensor):
        super().__init__(lora, codes)
        self.register_buffer("weight_scale", scale)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        # the OpOverload itself, so every Dynamo version records one node (the pass looks for exactly this op)
        return torch.ops.surogate.fp8_dequantize.default(self.weight, self.weight_scale, dtype)


class FP8Embedding(nn.Module):
    """A frozen input embedding stored as e4m3 codes + one fp32 scale per token row; looks up and dequantizes
    only the rows it needs (qfp8 with `quantize_embedding`: the table is ~8% of Qwen3-8B)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        codes, scale = quantize_rows(embedding.weight.detach(), E4M3)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.dtype = embedding.weight.dtype
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("weight_scale", scale.view(-1))

    def forward(self, ids: Tensor) -> Tensor:
        return (self.weight[ids].float() * self.weight_scale[ids, None]).to(self.dtype)


def quantize_lora_base_(modules: Sequence[nn.Module]) -> list[FP8LoRALinear]:
    """Quantize the base weights of LoRA modules that share an input (or one module) into one packed storage.

    Codes of a group lie back to back ([sum out, in]) as do their scales, so the fused op reads zero-copy views.
    The bf16 weights are released as each group is done (peak: one group's bf16 + its codes). Returns the new
    modules, to be set in place of the old ones by the caller.
    """
    w = frozen_concat([m.weight.detach() for m in modules])  # a view when parallelize packed the group
    codes, scale = quantize_rows(w, E4M3)
    scale = scale.view(-1)
    new, offset = [], 0
    for m in modules:
        rows = m.out_features
        new.append(FP8LoRALinear(m, codes[offset : offset + rows], scale[offset : offset + rows]))
        m.weight = None  # drop the module's reference to the bf16 tensor
        offset += rows
    return new
