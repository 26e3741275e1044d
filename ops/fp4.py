"""FP4 LoRA linear: NVFP4 / MXFP4 block formats for the frozen base (`surogate::lora_linear_fp4`, recipes fp4, qfp4).

Two recipes share this op family:

    fp4   base weights stay bf16 in memory; the base GEMMs run on FP4 operands: activations and weights in the
          forward, output gradient and weights in dX. Each frozen weight is quantized once, on first use, in both
          orientations, and the codes are cached (~1.1 bytes per weight for the two; see `_cached_fp4_weight`).
    qfp4  base weights are stored only in FP4 (`FP4LoRALinear`, made by `quantize_lora_base_fp4_`): 4.5 bits per
          weight with nvfp4 (0.28x bf16), 4.25 with mxfp4 (0.27x); the bf16 copy is gone. compute: fp8 (the
          recipe's default) dequantizes inside the op, forward and dX, straight to e4m3 codes with one scale per
          output row (`fp4_to_fp8`; the row scale is read off the stored block scales) and runs the FP8 GEMMs of
          `ops.fp8` (as qfp8 on its stored codes); compute: bf16 dequantizes to bf16 operands instead; compute: fp4
          quantizes activations and gradients as fp4 does.

Formats (the element is always e2m1: values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; code = sign << 3 | index):
    nvfp4   one e4m3 scale per 16 consecutive elements of a row and one fp32 scale per tensor (NVIDIA's two-level
            scaling, as torchao's `nvfp4_quantize` with a per-tensor scale): global = amax / (448 * 6), block scale =
            e4m3(block_amax / 6 / global). Dequantized value = e2m1 * block_scale * global.
    mxfp4   one e8m0 scale (a power of two, stored as its biased exponent in a uint8) per 32 elements (OCP MX, as
            torchao's `to_mx` FLOOR mode): scale = 2^(floor(log2 block_amax) - 2). The global scale is 1.
Layout: codes [rows, cols/2] uint8, two per byte, the first element in the low nibble (torch.float4_e2m1fn_x2 and
cuBLAS order); block scales [rows, cols/block]; global scale [1] fp32. Blocks run along the GEMM's reduction axis:
along `in` for the forward operand of W [out, in]; along `out` for the dX operand, so that orientation is W^T
[in, out] quantized row by row.

Backward (dX = dy W): both operands go through a random Hadamard transform along the reduction axis (`fp4_hadamard`,
NVIDIA's NVFP4 training recipe): dy W = (dy R)(R^T W) for the orthonormal block-diagonal R = diag(signs) H16 / 4,
which spreads outliers over each 16-block before quantizing. dy is rounded stochastically (`fp4_stochastic_rounding`:
unbiased, so rounding errors average out over steps instead of accumulating); weights and activations round to
nearest even. The LoRA products (x A^T, (x A^T) B^T and their gradients) stay in the activation dtype: the op
quantizes only what the frozen base GEMMs read, and dA/dB see the exact dy.

Compute: there is no FP4 tensor core before Blackwell (sm_100), so every device here *emulates* the FP4 GEMMs:
quantize -> dequantize to the activation dtype -> bf16 GEMM (fp32 accumulation). The operands are exactly the FP4
values (up to the bf16 rounding of value * scale * global), so accuracy studies run anywhere, but an fp4 step is
slower than bf16, not faster. Real FP4 GEMMs (`torch._scaled_mm` on float4_e2m1fn_x2 with swizzled scales) are not
implemented: there was no Blackwell GPU to test them on. `stats["fp4_gemms"]` counts emulated FP4 GEMMs.

Kernels: dequantization is one Triton kernel on CUDA (`ops/dequant_kernels.py`, shared with NF4: unpack, look up
the e2m1 value and the block scale, scale, cast; it can write W^T's layout for dX), `dequantize_fp4_reference`
elsewhere; they agree bit for bit (tested under TRITON_INTERPRET=1). Quantization
is plain torch (it runs once per weight at load, and per call on activations only in the emulated fp4 compute).
torchao is not needed; the tests check our quantizers against torchao's `nvfp4_quantize` and `to_mx`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    "E2M1",
    "FORMATS",
    "HADAMARD_SIZE",
    "FP4LoRALinear",
    "can_quantize_fp4",
    "dequantize_fp4",
    "dequantize_fp4_reference",
    "dequantize_fp4_triton",
    "fake_quantize_fp4",
    "fp4_dequantize",
    "fp4_nbytes",
    "hadamard_rotation",
    "lora_linear_fp4",
    "lora_linear_fp4_reference",
    "quantize_fp4",
    "quantize_lora_base_fp4_",
    "rht",
    "stats",
]


@dataclass(frozen=True)
class Fp4Format:
    name: str
    block: int  # elements per block scale
    scale_dtype: torch.dtype  # how the block scales are stored


FORMATS = {
    "nvfp4": Fp4Format("nvfp4", 16, torch.float8_e4m3fn),
    "mxfp4": Fp4Format("mxfp4", 32, torch.uint8),  # e8m0: the biased exponent (torchao: float8_e8m0fnu, same bits)
}
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # magnitudes, by code & 7
E2M1 = torch.cat([E2M1_GRID, -E2M1_GRID])  # value of each 4-bit code (code 8 is -0)
_MIDPOINTS = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2  # round-to-nearest decision boundaries
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_TINY = torch.finfo(torch.float8_e4m3fn).tiny  # smallest normal e4m3 block scale (torchao's E4M3_EPS)
F32_MIN_NORMAL = 2.0**-126
EPS = 1e-12  # per-tensor amax floor: an all-zero tensor gets a tiny scale, not a division by zero
HADAMARD_SIZE = 16
HADAMARD_SEED = 0x5EED  # the random signs are fixed: any orthonormal R gives dy W exactly; these are ours
# fp32 value of every stored scale byte: e4m3 bit patterns, and e8m0 exponents (2^(b - 127); 255 is NaN)
_SCALE_TABLES = {
    "nvfp4": torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float(),
    "mxfp4": torch.tensor([2.0 ** (b - 127) for b in range(255)] + [float("nan")], dtype=torch.float32),
}
_CONSTANTS: dict[tuple[str, torch.device], Tensor] = {}
stats = OpCounts()  # "fp4_gemms" (emulated), "weights_quantized" (fp4 cache), "fp4_dequantized" (stored)


def _on(name: str, device: torch.device) -> Tensor:
    """A constant table on `device`, copied there once (a host-to-device copy per call would sync the host)."""
    t = _CONSTANTS.get((name, device))
    if t is None:
        tables = {"e2m1": E2M1, "grid": E2M1_GRID, "mid": _MIDPOINTS, "hadamard": hadamard_rotation()}
        tables.update({f"scale_{k}": v for k, v in _SCALE_TABLES.items()})
        t = _CONSTANTS[(name, device)] = tables[name].to(device)
    return t


def _format(name: str) -> Fp4Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"fp4_format={name!r}: use one of {sorted(FORMATS)}") from None


# ----------------------------------------------------------------------------------------------------------------
# e2m1 rounding and packing.
# ----------------------------------------------------------------------------------------------------------------


def _e2m1_codes(y: Tensor, stochastic: bool) -> Tensor:
    """fp32 values already scaled into [-6, 6] -> 4-bit codes (uint8, one per element).

    Nearest with ties to the even code (IEEE, as torchao and the hardware cast), or stochastic: up to the next grid
    value with probability (|y| - lo) / (hi - lo), so the expected value is y (unbiased)."""
    grid = _on("grid", y.device)
    a = y.abs()
    if stochastic:
        lo = (torch.bucketize(a, grid, right=True) - 1).clamp(0, 6)
        g_lo = grid[lo]
        idx = lo + (torch.rand_like(a) * (grid[lo + 1] - g_lo) < a - g_lo).to(lo.dtype)
    else:
        mid = _on("mid", y.device)
        idx = torch.bucketize(a, mid)  # a tie goes to the lower value...
        tie = (a == mid[idx.clamp(max=6)]) & (idx % 2 == 1)  # ...unless its code is odd: then to the even one above
        idx = idx + tie.to(idx.dtype)
    return (idx | (torch.signbit(y).to(idx.dtype) << 3)).to(torch.uint8)


def _pack(codes: Tensor) -> Tensor:
    """[rows, cols] codes -> [rows, cols/2] bytes, the first element in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack(packed: Tensor) -> Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], packed.shape[1] * 2)


# ----------------------------------------------------------------------------------------------------------------
# Quantization (references: plain torch) and dequantization (reference + Triton kernel).
# ----------------------------------------------------------------------------------------------------------------


def _nvfp4_scales(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """blocks [rows, n, 16] fp32 -> (e4m3 block scales [rows, n], global [1], fp32 multiplier into e2m1 range)."""
    g = blocks.abs().amax().clamp_min(EPS) / (E4M3_MAX * E2M1_MAX)
    block_scale = (blocks.abs().amax(dim=-1) / E2M1_MAX / g).clamp(E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn)
    # torchao's order of operations (reciprocal of the combined scale, then multiply), so the codes match it exactly
    return block_scale, g.reshape(1), (1.0 / g) / block_scale.float()


def _mxfp4_scales(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """blocks [rows, n, 32] fp32 -> (e8m0 biased exponents [rows, n] uint8, global [1] = 1, fp32 multiplier)."""
    amax = blocks.abs().amax(dim=-1)
    exponent = ((amax.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2 amax) from the fp32 bits (0 -> -127)
    biased = ((exponent - 2).clamp(-127, 127) + 127).to(torch.uint8)  # 2 = log2(6) rounded down: amax -> [4, 8)
    biased = torch.where(torch.isnan(amax), 255, biased).to(torch.uint8)  # NaN stays NaN through the scale
    scale = (biased.to(torch.int32) << 23).view(torch.float32).clamp_min(F32_MIN_NORMAL)
    return biased, torch.ones(1, device=blocks.device), 1.0 / scale


def quantize_fp4(
    x: Tensor,  # [rows, cols]; cols a multiple of the format's block
    fp4_format: str = "nvfp4",
    stochastic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:  # codes [rows, cols/2] uint8, block scales [rows, cols/block], global [1] fp32
    """Blocks run along each row. Computed in fp32 whatever the input dtype."""
    fmt = _format(fp4_format)
    if x.dim() != 2 or x.shape[1] % fmt.block:
        raise ValueError(f"{fmt.name} needs a 2-D tensor with rows divisible by {fmt.block}; got {list(x.shape)}")
    blocks = x.detach().float().reshape(x.shape[0], -1, fmt.block).contiguous()  # dy may be an expanded view
    block_scale, global_scale, multiplier = (_nvfp4_scales if fmt.name == "nvfp4" else _mxfp4_scales)(blocks)
    scaled = blocks * multiplier[..., None]  # mxfp4: times 1 / 2^k, exactly torchao's division by 2^k
    codes = _e2m1_codes(scaled.clamp(-E2M1_MAX, E2M1_MAX).view(x.shape[0], -1), stochastic)
    return _pack(codes), block_scale, global_scale


def _scale_values(block_scale: Tensor, fp4_format: str) -> Tensor:
    if fp4_format == "nvfp4":
        return block_scale.float()
    return _on("scale_mxfp4", block_scale.device)[block_scale.long()]


def dequantize_fp4_reference(
    codes: Tensor,  # [rows, cols/2] uint8
    block_scale: Tensor,  # [rows, cols/block]
    global_scale: Tensor,  # [1] fp32
    fp4_format: str = "nvfp4",
    dtype: torch.dtype = torch.bfloat16,
    row_scale: Tensor | None = None,  # [rows] fp32 multiplier per row (FP8 compute: 448 / row absmax)
) -> Tensor:  # [rows, cols] `dtype`: (e2m1 * block scale) * global in fp32, rounded once
    fmt = _format(fp4_format)
    values = _on("e2m1", codes.device)[_unpack(codes).long()].view(-1, fmt.block)
    out = values * _scale_values(block_scale, fmt.name).reshape(-1, 1) * global_scale.float()
    return cast_rows(out.view(codes.shape[0], codes.shape[1] * 2), row_scale, dtype)


def dequantize_fp4_triton(
    codes: Tensor, block_scale: Tensor, global_scale: Tensor, fp4_format: str = "nvfp4",
    dtype: torch.dtype = torch.bfloat16, row_scale: Tensor | None = None, out: Tensor | None = None,
    tile: tuple[int, int] | None = None,
) -> Tensor:  # fmt: skip
    """The fused kernel, one program per [BR, BC] tile of the output (CUDA, or CPU tensors under TRITON_INTERPRET=1
    in tests; no FP8 loads: any GPU, the interpreter). `out`: a [rows, cols] view of `dtype` to write into, with
    unit stride along cols (a row block of a group's buffer) or along rows (a row block of a buffer laid out as
    W^T: the dX operand)."""
    from ops.dequant_kernels import fp4_dequantize_kernel, tile_launch

    fmt = _format(fp4_format)
    tiles = tile_launch(codes, dtype, out, tile)
    values = _on("e2m1", codes.device)
    row = row_scale.float().contiguous() if row_scale is not None else values  # dummy pointer when unused
    if codes.numel():
        launch(
            fp4_dequantize_kernel, tiles.grid, codes.contiguous(), block_scale.contiguous().view(torch.uint8),
            global_scale.float(), values, _on(f"scale_{fmt.name}", codes.device), row, tiles.out, codes.shape[0],
            codes.shape[1] * 2, tiles.ld, BLOCK=fmt.block, BR=tiles.br, BC=tiles.bc, HAS_ROW=row_scale is not None,
            FMAX=FP8_MAX.get(dtype, 0.0), TRANSPOSED=tiles.transposed, num_warps=4,
        )  # fmt: skip
    return tiles.out


def dequantize_fp4(
    codes: Tensor, block_scale: Tensor, global_scale: Tensor, fp4_format: str = "nvfp4",
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:  # fmt: skip
    """FP4 -> `dtype`: the Triton kernel on CUDA, the reference elsewhere (bit-identical results)."""
    if on_gpu(codes):
        return dequantize_fp4_triton(codes, block_scale, global_scale, fp4_format, dtype)
    return dequantize_fp4_reference(codes, block_scale, global_scale, fp4_format, dtype)


def fp4_row_absmax(block_scale: Tensor, global_scale: Tensor, fp4_format: str) -> Tensor:
    """[rows] fp32: the largest |dequantized weight| a row can hold (6, the largest e2m1, times its largest block
    scale times the global scale), read off the stored scales without a pass over the weight."""
    rows = block_scale.shape[0]
    return (_scale_values(block_scale, fp4_format).view(rows, -1).amax(dim=1) * 6.0 * global_scale.float()).clamp_min(
        1e-12
    )


def fp4_to_fp8(
    codes: Sequence[Tensor],
    block_scales: Sequence[Tensor],
    global_scales: Sequence[Tensor],
    fp4_format: str,
    transposed: bool = False,
) -> Fp8Weight:
    """FP4-stored weights (a shared-input group: row blocks of one result) as e4m3 codes with one fp32 scale per
    output row, the operand of the FP8 GEMMs (`precision.compute: fp8`, qfp4's default): one kernel per weight
    writes its row block, the dense bf16 weight is never made. `transposed`: laid out for dX (`row_codes`)."""
    rows = [c.shape[0] for c in codes]
    amax = cached_row_absmax(
        [*block_scales, *global_scales],
        lambda: torch.cat([fp4_row_absmax(b, g, fp4_format) for b, g in zip(block_scales, global_scales)]),
    )

    def write(i: int, dst: Tensor, inv: Tensor) -> None:
        stored = (codes[i], block_scales[i], global_scales[i], fp4_format, E4M3)
        if on_gpu(dst):
            dequantize_fp4_triton(*stored, row_scale=inv, out=dst)
        else:
            dst.copy_(dequantize_fp4_reference(*stored, row_scale=inv))

    stats["fp4_dequantized"] += len(codes)
    return row_codes(amax, rows, codes[0].shape[1] * 2, write, transposed)


def fake_quantize_fp4(x: Tensor, fp4_format: str = "nvfp4", stochastic: bool = False, dtype=None) -> Tensor:
    """x [rows, cols] rounded to FP4 and back (to `dtype`, default x's): what an FP4 GEMM sees of it."""
    return dequantize_fp4(*quantize_fp4(x, fp4_format, stochastic), fp4_format, dtype or x.dtype)


def fp4_nbytes(codes: Tensor, block_scale: Tensor, global_scale: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (codes, block_scale, global_scale))


def can_quantize_fp4(module: nn.Module, fp4_format: str = "nvfp4") -> bool:
    block = _format(fp4_format).block
    return module.in_features % block == 0 and module.out_features % block == 0


# ----------------------------------------------------------------------------------------------------------------
# Random Hadamard transform (dX operands).
# ----------------------------------------------------------------------------------------------------------------


def hadamard_rotation(size: int = HADAMARD_SIZE, seed: int = HADAMARD_SEED) -> Tensor:
    """diag(random signs) @ H / sqrt(size): an orthonormal [size, size] fp32 matrix (R R^T = I)."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:  # Sylvester's construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return signs[:, None] * h / size**0.5


def rht(x: Tensor) -> Tensor:  # [rows, cols] -> fp32 [rows, cols]: every 16 columns times R
    r = _on("hadamard", x.device)
    return (x.float().reshape(-1, HADAMARD_SIZE) @ r).view(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# The base weight as the op sees it.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Fp4Weight:
    """One frozen weight quantized for both GEMMs (each a (codes, block scales, global scale) triple)."""

    fwd: tuple[Tensor, Tensor, Tensor]  # W [out, in], blocks along in
    bwd: tuple[Tensor, Tensor, Tensor]  # W^T R [in, out] (R: Hadamard or identity), blocks along out


def quantize_weight_fp4(w: Tensor, fp4_format: str, hadamard: bool) -> _Fp4Weight:
    w = w.detach()
    wt = rht(w.t()) if hadamard else w.t().contiguous()
    return _Fp4Weight(quantize_fp4(w, fp4_format), quantize_fp4(wt, fp4_format))


WEIGHT_CACHE = FrozenWeightCache()  # fp4 recipe: each frozen bf16 weight quantized once, per format


def _cached_fp4_weight(w: Tensor, fp4_format: str, hadamard: bool) -> _Fp4Weight:
    """A bf16 frozen weight quantized once (fp4 recipe; keying: `ops.lora_linear.FrozenWeightCache`)."""

    def quantize() -> _Fp4Weight:
        stats["weights_quantized"] += 1
        return quantize_weight_fp4(w, fp4_format, hadamard)

    return WEIGHT_CACHE.get(w, (fp4_format, hadamard), quantize)


def clear_fp4_weight_cache() -> None:
    WEIGHT_CACHE.clear()


@dataclass
class _Base:
    """The op's base weights and options, with the two dense matrices its GEMMs need."""

    weights: Sequence[Tensor]  # bf16 [out_i, in], or stored codes [out_i, in/2] with `stored`
    stored: tuple[Sequence[Tensor], Sequence[Tensor]] | None  # (block scales, global scales) per weight
    fp4_format: str
    compute: str  # "fp4": emulated FP4 GEMMs; "bf16" / "fp8": stored weights dequantized to bf16 / e4m3 operands
    stochastic: bool
    hadamard: bool
    grad_format: str = "e5m2"  # compute fp8: dy's format in the dX GEMM

    def check(self, in_features: int) -> None:
        block = _format(self.fp4_format).block
        if self.compute not in ("fp4", "bf16", "fp8"):
            raise ValueError(f"compute={self.compute!r}: use fp4, bf16 or fp8")
        if self.stored is None and self.weights[0].dtype == torch.uint8:
            raise RuntimeError("surogate::lora_linear_fp4 got FP4 codes without their block scales")
        if self.compute == "fp8" and self.stored is None:
            raise ValueError("compute=fp8 runs on FP4-stored weights (qfp4); for bf16 weights use the fp8 recipe")
        if self.compute == "fp4" and (in_features % block or any(w.shape[0] % block for w in self.weights)):
            raise ValueError(f"{self.fp4_format} GEMMs need in and out features divisible by {block}")

    def _rows(self, dense: Callable[[int], Tensor]) -> Tensor:
        """Per-weight dense row blocks ([out_i, in] each, made by `dense(i)`) as one [sum out, in] tensor."""
        if len(self.weights) == 1:
            return dense(0)
        rows = [w.shape[0] for w in self.weights]
        first = dense(0)
        out = first.new_empty(sum(rows), first.shape[1])
        out[: rows[0]].copy_(first)
        for i, dst in enumerate(out.split(rows)[1:], start=1):
            dst.copy_(dense(i))
        return out

    def _stored_dense(self, i: int, dtype: torch.dtype) -> Tensor:
        stats["fp4_dequantized"] += 1
        scales, globals_ = self.stored
        return dequantize_fp4(self.weights[i], scales[i], globals_[i], self.fp4_format, dtype)

    def forward_weight(self, dtype: torch.dtype) -> Tensor:  # [sum out, in]: y = x' W'^T
        if self.stored is not None:
            return self._rows(lambda i: self._stored_dense(i, dtype))
        if self.compute == "bf16":
            return frozen_concat(self.weights)
        fwd = [_cached_fp4_weight(w, self.fp4_format, self.hadamard).fwd for w in self.weights]
        return self._rows(lambda i: dequantize_fp4(*fwd[i], self.fp4_format, dtype))

    def fp8_weight(self, transposed: bool = False) -> Fp8Weight:  # compute fp8: stored weights as e4m3 row codes
        return fp4_to_fp8(self.weights, *self.stored, self.fp4_format, transposed)

    def linear(self, x2: Tensor) -> Tensor:
        """The forward base GEMM x' W'^T [N, sum out] of x [N, in]."""
        if self.compute == "fp8":
            return fp8_base_forward(x2, self.fp8_weight())
        xq = self.quantized_input(x2)
        return F.linear(x2 if xq is None else xq, self.forward_weight(x2.dtype))

    def grad_weight_t(self, dtype: torch.dtype) -> Tensor:  # [in, sum out]: dX = dy' (W'')
        if self.compute == "bf16":
            return self.forward_weight(dtype).t()
        if self.stored is None:
            bwd = [_cached_fp4_weight(w, self.fp4_format, self.hadamard).bwd for w in self.weights]
            parts = [dequantize_fp4(*b, self.fp4_format, dtype) for b in bwd]
        else:  # stored codes: W dequantized, then the dX orientation quantized per backward (memory over speed)
            parts = []
            for i in range(len(self.weights)):
                wt = self._stored_dense(i, torch.float32).t()
                wt = rht(wt) if self.hadamard else wt.contiguous()
                parts.append(fake_quantize_fp4(wt, self.fp4_format, dtype=dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def quantized_input(self, x2: Tensor) -> Tensor | None:
        """What the forward base GEMM reads of x [N, in]: FP4-rounded with fp4 compute, else x itself (None)."""
        if self.compute != "fp4":
            return None
        stats["fp4_gemms"] += 1
        return fake_quantize_fp4(x2, self.fp4_format)

    def grad_input(self, dy: Tensor) -> Tensor:
        """Base dX [N, in] from dy [N, sum out]: (dy R)_fp4 (W^T R)_fp4^T with fp4 compute, else dy W."""
        if self.compute == "fp8":
            return fp8_base_grad_input(dy, self.fp8_weight(transposed=True), "fp8", GRAD_FORMATS[self.grad_format])
        w = self.grad_weight_t(dy.dtype)  # [in, sum out]
        if self.compute != "fp4":
            return torch.mm(dy, w.t())
        stats["fp4_gemms"] += 1
        d = rht(dy) if self.hadamard else dy
        return torch.mm(fake_quantize_fp4(d, self.fp4_format, self.stochastic, dtype=dy.dtype), w.t())


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain torch, differentiable).
# ----------------------------------------------------------------------------------------------------------------


class _Fp4LinearReference(torch.autograd.Function):
    """x [W_1; ...; W_n]^T with the op's rounding, written out: dequantized FP4 operands, fp32 matmuls.

    A group (q/k/v) is one GEMM: x and dy are quantized once over the group (one nvfp4 tensor scale), each weight
    on its own (its own tensor scale), as the op does."""

    @staticmethod
    def forward(ctx, x2: Tensor, weights: list, fp4_format: str, compute: str, stochastic: bool, hadamard: bool):
        ctx.weights, ctx.options = weights, (fp4_format, compute, stochastic, hadamard)
        w = torch.cat(weights)
        if compute == "bf16":
            return x2 @ w.t().to(x2.dtype)
        xq = dequantize_fp4_reference(*quantize_fp4(x2, fp4_format), fp4_format, torch.float32)
        wq = torch.cat(
            [dequantize_fp4_reference(*quantize_fp4(w, fp4_format), fp4_format, torch.float32) for w in weights]
        )
        return (xq @ wq.t()).to(x2.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        fp4_format, compute, stochastic, hadamard = ctx.options
        if compute == "bf16":
            return dy @ torch.cat(ctx.weights).to(dy.dtype), None, None, None, None, None
        rotate = rht if hadamard else (lambda t: t.float())
        dyq = dequantize_fp4_reference(*quantize_fp4(rotate(dy), fp4_format, stochastic), fp4_format, torch.float32)
        wtq = [
            dequantize_fp4_reference(*quantize_fp4(rotate(w.t()), fp4_format), fp4_format, torch.float32)
            for w in ctx.weights
        ]
        return (dyq @ torch.cat(wtq, dim=1).t()).to(dy.dtype), None, None, None, None, None


def lora_linear_fp4_reference(
    x: Tensor,  # [..., in]
    weights: Sequence[Tensor],  # [out_i, in] each: bf16, or the dequantized stored weights (qfp4)
    bias: Tensor | None,  # [sum out_i]
    lora_As: Sequence[Tensor],  # [r_i, in]
    lora_Bs: Sequence[Tensor],  # [out_i, r_i]
    scalings: Sequence[float],
    lora_inputs: Sequence[Tensor] = (),  # dropped x per projection; empty = x
    fp4_format: str = "nvfp4",
    compute: str = "fp4",
    stochastic: bool = False,
    hadamard: bool = True,
) -> Tensor:  # [..., sum out_i]
    """The op's arithmetic in plain torch: base GEMMs on FP4-rounded operands (compute fp4), LoRA in x.dtype.

    qfp4 with compute fp4 re-quantizes the dequantized stored weights: pass those as `weights` (FP4 rounding of
    FP4 values with the same forward blocks is exact, so the forward matches; dX re-blocks along out)."""
    x2 = x.reshape(-1, x.shape[-1])
    frozen = [w.detach() for w in weights]
    base = _Fp4LinearReference.apply(x2, frozen, fp4_format, compute, stochastic, hadamard)
    y = base.view(*x.shape[:-1], -1)
    if bias is not None:
        y = y + bias
    lora = [
        s * F.linear(F.linear(lora_inputs[i] if lora_inputs else x, a), b)
        for i, (a, b, s) in enumerate(zip(lora_As, lora_Bs, scalings, strict=True))
    ]
    return y + torch.cat(lora, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# The op: forward, backward, fakes, autograd.
# ----------------------------------------------------------------------------------------------------------------

_OPTIONS = (
    'Tensor[]? block_scales=None, Tensor[]? global_scales=None, str fp4_format="nvfp4", str compute="fp4", '
    'bool stochastic_rounding=True, bool hadamard=True, str grad_format="e5m2"'
)


def _base(weights, block_scales, global_scales, fp4_format, compute, stochastic, hadamard, grad_format) -> _Base:
    stored = None if block_scales is None else (block_scales, global_scales)
    return _Base(weights, stored, fp4_format, compute, stochastic, hadamard, grad_format)


def _in_features(weights, block_scales) -> int:
    return weights[0].shape[1] * (2 if block_scales is not None else 1)


def _lora_linear_fp4(
    x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, block_scales=None, global_scales=None,
    fp4_format="nvfp4", compute="fp4", stochastic_rounding=True, hadamard=True, grad_format="e5m2",
):  # fmt: skip
    """Returns (y [..., sum out], xa [N, sum r]); `weights` are FP4 codes when `block_scales` are given."""
    base = _base(weights, block_scales, global_scales, fp4_format, compute, stochastic_rounding, hadamard, grad_format)
    base.check(x.shape[-1])
    return _lora_forward(x, [], bias, lora_As, lora_Bs, scalings, lora_inputs, base_linear=base.linear)


lora_linear_fp4 = torch.library.custom_op(
    "surogate::lora_linear_fp4",
    _lora_linear_fp4,
    mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor? bias, Tensor[] lora_As, Tensor[] lora_Bs, float[] scalings, "
    f"Tensor[] lora_inputs, {_OPTIONS}) -> (Tensor, Tensor)",
)


@lora_linear_fp4.register_fake
def _(x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, block_scales=None, global_scales=None, *options):
    args = (x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, block_scales, global_scales, *options)
    compile_ahead(_lora_linear_fp4, *args)  # ops/compile_ahead.py
    n = x.numel() // x.shape[-1]
    out = sum(w.shape[0] for w in weights)
    return x.new_empty(*x.shape[:-1], out), x.new_empty(n, sum(a.shape[0] for a in lora_As))


def _lora_linear_fp4_grad(
    grad_y, lora_inputs, xa, weights, block_scales, global_scales, lora_As, lora_Bs, scalings, shared_input,
    needs_grad_x, fp4_format, compute, stochastic_rounding, hadamard, grad_format,
):  # fmt: skip
    """(grad_x or empty, grad_A_cat, grad_B_full, grad_lora_inputs), as `surogate::lora_linear_grad`; the base dX
    runs through `_Base.grad_input` (FP4 operands with fp4 compute); dA and dB see the exact dy."""
    base = _base(weights, block_scales, global_scales, fp4_format, compute, stochastic_rounding, hadamard, grad_format)
    width = grad_y.new_empty(0, _in_features(weights, block_scales))  # _lora_backward reads only its width
    return _lora_backward(
        grad_y, lora_inputs, xa, [width], lora_As, lora_Bs, scalings, shared_input, needs_grad_x,
        base_grad_x=base.grad_input,
    )  # fmt: skip


lora_linear_fp4_grad = torch.library.custom_op(
    "surogate::lora_linear_fp4_grad",
    _lora_linear_fp4_grad,
    mutates_args=(),
    schema="(Tensor grad_y, Tensor[] lora_inputs, Tensor xa, Tensor[] weights, Tensor[]? block_scales, "
    "Tensor[]? global_scales, Tensor[] lora_As, Tensor[] lora_Bs, float[] scalings, bool shared_input, "
    "bool needs_grad_x, str fp4_format, str compute, bool stochastic_rounding, bool hadamard, str grad_format) "
    "-> (Tensor, Tensor, Tensor, Tensor[])",
)


@lora_linear_fp4_grad.register_fake
def _(grad_y, lora_inputs, xa, weights, block_scales, global_scales, lora_As, lora_Bs, scalings, shared, needs_x, *o):
    args = (grad_y, lora_inputs, xa, weights, block_scales, global_scales, lora_As, lora_Bs, scalings, shared, needs_x)
    compile_ahead(_lora_linear_fp4_grad, *args, *o)
    in_features = _in_features(weights, block_scales)
    return lora_grad_fake(grad_y, lora_inputs, lora_As, in_features, shared, needs_x, bool(lora_Bs))


_DEFAULTS = (None, None, "nvfp4", "fp4", True, True, "e5m2")  # the options, in schema order


def _setup_context(ctx, inputs, output) -> None:
    x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = inputs[:7]
    options = list(inputs[7:]) + list(_DEFAULTS[len(inputs) - 7 :])
    if any(w.requires_grad for w in weights) or (bias is not None and bias.requires_grad):
        raise RuntimeError("surogate::lora_linear_fp4 never computes a base weight/bias gradient: freeze the base")
    ctx.shared_input = len(lora_inputs) == 0
    ctx.n = len(weights)
    ctx.has_stored = options[0] is not None
    ctx.options = options[2:]
    ctx.scalings = list(scalings)
    ctx.ranks = [a.shape[0] for a in lora_As]
    ctx.outs = [b.shape[0] for b in lora_Bs]
    saved_inputs = lora_saved_inputs(x, lora_As, lora_inputs)
    ctx.k = len(saved_inputs)
    stored = [*options[0], *options[1]] if ctx.has_stored else []
    ctx.save_for_backward(output[1], *saved_inputs, *weights, *stored, *lora_As, *lora_Bs)
    mark_xa_non_differentiable(ctx, output, lora_Bs)


def _backward(ctx, grad_y, grad_xa):
    xa, *saved = ctx.saved_tensors
    xa = xa_or_its_grad(ctx, xa, grad_xa)
    k, n = ctx.k, ctx.n
    lora_inputs, saved = saved[:k], saved[k:]
    weights, saved = saved[:n], saved[n:]
    if ctx.has_stored:
        block_scales, global_scales, saved = saved[:n], saved[n : 2 * n], saved[2 * n :]
    else:
        block_scales = global_scales = None
    lora_As, lora_Bs = saved[: len(ctx.ranks)], saved[len(ctx.ranks) :]
    needs_grad_x = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[6])
    grad_x, grad_a, grad_b, grad_lora_inputs = lora_linear_fp4_grad(
        grad_y, lora_inputs, xa, weights, block_scales, global_scales, lora_As, lora_Bs, ctx.scalings,
        ctx.shared_input, needs_grad_x, *ctx.options,
    )  # fmt: skip
    grad_As, grad_Bs = _split_grads(grad_a, grad_b, ctx.ranks, ctx.outs)
    if not needs_grad_x:
        grad_x, grad_lora_inputs = None, [None] * (0 if ctx.shared_input else k)
    # needs_input_grad has one entry per argument as called (trailing options equal to their defaults are dropped)
    stored = [[None] * n if ctx.has_stored else None] * 2
    options = [*stored, None, None, None, None, None][: len(ctx.needs_input_grad) - 7]
    return grad_x, [None] * n, None, grad_As, grad_Bs, None, grad_lora_inputs, *options


lora_linear_fp4.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# qfp4 storage: the eager module (numerical reference) and the conversion that makes it.
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("surogate::fp4_dequantize", mutates_args=())
def fp4_dequantize(
    codes: Tensor, block_scale: Tensor, global_scale: Tensor, fp4_format: str, dtype: torch.dtype
) -> Tensor:
    """One FP4 weight back to `dtype` (one op, so the pass sees the stored tensors behind it)."""
    return dequantize_fp4(codes, block_scale, global_scale, fp4_format, dtype)


@fp4_dequantize.register_fake
def _(codes: Tensor, block_scale: Tensor, global_scale: Tensor, fp4_format: str, dtype: torch.dtype) -> Tensor:
    return codes.new_empty(codes.shape[0], codes.shape[1] * 2, dtype=dtype)


class FP4LoRALinear(QuantizedLoRALinear):
    """qfp4 storage: FP4 codes [out, in/2] uint8 in `weight`, the buffers `weight_scale` (block scales [out,
    in/block]: e4m3 for nvfp4, e8m0 exponents in uint8 for mxfp4) and `weight_global_scale` ([1] fp32; 1 for
    mxfp4)."""

    def __init__(self, lora: nn.Module, codes: Tensor, block_scale: Tensor, global_scale: Tensor, fp4_format: str):
        super().__init__(lora, codes)
        self.fp4_format = self.format_name = fp4_format
        self.register_buffer("weight_scale", block_scale)
        self.register_buffer("weight_global_scale", global_scale)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        # the OpOverload itself, so every Dynamo version records one node (the pass looks for exactly this op)
        return torch.ops.surogate.fp4_dequantize.default(
            self.weight, self.weight_scale, self.weight_global_scale, self.fp4_format, dtype
        )


def quantize_lora_base_fp4_(module: nn.Module, fp4_format: str = "nvfp4") -> FP4LoRALinear:
    """The FP4 replacement of one LoRA module (to be set in its place by the caller); releases the module's
    reference to its dense weight (freed once nothing else, e.g. a packed group, holds it)."""
    new = FP4LoRALinear(module, *quantize_fp4(module.weight.detach(), fp4_format), fp4_format)
    module.weight = None
    return new
