"""The Triton kernels of the 4-bit dequantize (NF4: `ops.nf4`, FP4: `ops.fp4`; their plain-torch references live
there). Imported lazily by those modules' launchers: this module needs triton at import. The two kernels share their
tile stages, and Triton's interpreter (the CPU tests) resolves a kernel's helpers only among module globals, hence
one module for both.

Both kernels work on [BR, BC] tiles of the [rows, cols] output and load the packed codes as a [BR, BC / 2] byte
tile: one contiguous run of bytes per row, which Triton vectorizes (8-byte loads, 16-byte stores on an H100). An
earlier 1-D kernel indexed every element by its flat position (`codes[e // 2]`, `scale[e // block]`, `row[e // K]`),
which hides the contiguity and ran at 1.1-1.75 TB/s. The tile's two nibble halves come here as two [BR, BC / 2]
value tiles and are interleaved back into element order.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def store_dequantized_tile(
    out_ptr, first, second, rows, R, K, ld, row_ptr,
    HAS_ROW: tl.constexpr, FMAX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """Write a tile whose element 2j of each row is first[:, j] and 2j + 1 is second[:, j] (fp32 values).

    HAS_ROW: times the row's multiplier (FP8 output: 448 / row absmax), saturated to +-FMAX, rounded to nearest
    even as torch's cast does. TRANSPOSED: store into out [K, ld] at out[col, row] (the dX GEMM's operand; the tile
    is transposed through shared memory so that the stores stay contiguous along rows), else into out [R, ld]."""
    out = tl.join(first, second).reshape(BR, BC)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    if HAS_ROW:
        out = out * tl.load(row_ptr + rows, mask=rows < R, other=0.0)[:, None]
        out = tl.minimum(tl.maximum(out, -FMAX), FMAX).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    else:
        out = out.to(out_ptr.dtype.element_ty)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    if TRANSPOSED:
        tl.store(out_ptr + cols[:, None].to(tl.int64) * ld + rows[None, :], tl.trans(out), mask=tl.trans(mask))
    else:
        tl.store(out_ptr + rows[:, None].to(tl.int64) * ld + cols[None, :], out, mask=mask)


@triton.jit
def load_packed_tile(codes_ptr, rows, R, K, BR: tl.constexpr, BC: tl.constexpr):
    """The tile's [BR, BC / 2] code bytes as int32 (codes [R, K / 2], row-major)."""
    pair = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
    mask = (rows[:, None] < R) & (pair[None, :] < K // 2)
    return tl.load(codes_ptr + rows[:, None].to(tl.int64) * (K // 2) + pair[None, :], mask=mask, other=0).to(tl.int32)


@triton.jit
def load_block_tile(ptr, rows, R, K, BLOCK: tl.constexpr, BC: tl.constexpr, other):
    """The tile's per-block entries [BR, BC / BLOCK] of a [R, K / BLOCK] row-major tensor (block scales), with the
    flat block index (for a second level of scales)."""
    blocks = tl.program_id(1) * (BC // BLOCK) + tl.arange(0, BC // BLOCK)
    mask = (rows[:, None] < R) & (blocks[None, :] < K // BLOCK)
    index = rows[:, None].to(tl.int64) * (K // BLOCK) + blocks[None, :]
    return tl.load(ptr + index, mask=mask, other=other), index, mask


@triton.jit
def times_block_scale(values, scale, BR: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr):
    """values [BR, BC / 2] (one nibble half) times scale [BR, BC / BLOCK], each scale over its block's values."""
    return (values.reshape(BR, BC // BLOCK, BLOCK // 2) * scale[:, :, None]).reshape(BR, BC // 2)


@triton.jit
def fp4_dequantize_kernel(
    codes_ptr, scale_ptr, global_ptr, values_ptr, scale_table_ptr, row_ptr, out_ptr, R, K, ld,
    BLOCK: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, HAS_ROW: tl.constexpr, FMAX: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """NVFP4 / MXFP4 codes [R, K / 2] (first element in the low nibble) -> (e2m1 * block scale) * global, as the
    reference computes it. Codes are decoded through a 16-entry table (an L1 hit: on an H100 faster than decoding
    the e2m1 bits, which left this kernel ALU-bound at ~1.3 TB/s), scale bytes through a 256-entry one (e4m3 or
    e8m0), so no FP8 loads."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    packed = load_packed_tile(codes_ptr, rows, R, K, BR, BC)
    scale_byte, _, _ = load_block_tile(scale_ptr, rows, R, K, BLOCK, BC, 0)
    scale = tl.load(scale_table_ptr + scale_byte.to(tl.int32))
    g = tl.load(global_ptr)
    low = times_block_scale(tl.load(values_ptr + (packed & 0xF)), scale, BR, BC, BLOCK) * g
    high = times_block_scale(tl.load(values_ptr + (packed >> 4)), scale, BR, BC, BLOCK) * g
    store_dequantized_tile(out_ptr, low, high, rows, R, K, ld, row_ptr, HAS_ROW, FMAX, BR, BC, TRANSPOSED)


@triton.jit
def nf4_dequantize_kernel(
    codes_ptr, absmax_ptr, factor_ptr, mean_ptr, table_ptr, row_ptr, out_ptr, R, K, ld,
    BLOCK: tl.constexpr, GROUP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, HAS_ROW: tl.constexpr,
    FMAX: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """NF4 codes [R, K / 2] (first element in the high nibble) -> codebook value * block absmax, the absmax back
    from its double quantization as the reference computes it (q / factor + mean, fp32). Needs K % BLOCK == 0."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    packed = load_packed_tile(codes_ptr, rows, R, K, BR, BC)
    q, block, mask = load_block_tile(absmax_ptr, rows, R, K, BLOCK, BC, 0)
    factor = tl.load(factor_ptr + block // GROUP, mask=mask, other=1.0)
    absmax = tl.math.div_rn(q.to(tl.float32), factor) + tl.load(mean_ptr)
    high = times_block_scale(tl.load(table_ptr + (packed >> 4)), absmax, BR, BC, BLOCK)
    low = times_block_scale(tl.load(table_ptr + (packed & 0xF)), absmax, BR, BC, BLOCK)
    store_dequantized_tile(out_ptr, high, low, rows, R, K, ld, row_ptr, HAS_ROW, FMAX, BR, BC, TRANSPOSED)


class TileLaunch(NamedTuple):
    out: torch.Tensor  # [rows, cols], row-major or W^T's layout (column-major)
    ld: int  # out's leading stride
    transposed: bool
    br: int
    bc: int
    grid: tuple[int, int]


def tile_launch(codes: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None, tile) -> TileLaunch:
    """How a dequantize of codes [rows, cols / 2] launches: its output (new when `out` is None; else a [rows, cols]
    view with unit stride along cols, or along rows for W^T's layout), tile and grid. A transposed store writes BR
    contiguous bytes per output row (FP8), so it takes taller tiles ([64, 128]); a plain one [16, 512]: best or
    within 10% of the best in an H100 sweep, both formats."""
    rows, cols = codes.shape[0], codes.shape[1] * 2
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    transposed = out.stride(1) != 1
    if out.shape != (rows, cols) or out.stride(0 if transposed else 1) != 1:
        raise ValueError(f"out must be a [{rows}, {cols}] view with unit stride along one axis")
    br, bc = tile or ((64, 128) if transposed else (16, 512))
    grid = (-(-rows // br), -(-cols // bc))
    return TileLaunch(out, out.stride(1 if transposed else 0), transposed, br, bc, grid)
