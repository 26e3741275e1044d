"""ops/fp8.py: quantization error bounds, the Triton quantize kernel vs its reference, and surogate::lora_linear_fp8
(fp8: bf16 weights quantized by the op; qfp8: stored codes + scales) against the exact LoRA linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_cases import lora_grads as _grads
from lora_cases import lora_inputs as _inputs
from lora_cases import rel
from lora_cases import run_interpreted as _run_interpreted

from ops import fp8
from ops.fp8 import (
    E4M3,
    E5M2,
    dequantize,
    dequantize_blockwise,
    lora_linear_fp8_reference,
    quantize_blockwise,
    quantize_rows,
    quantize_rows_reference,
    quantize_tensorwise,
    transpose_codes,
)
from ops.lora_linear import lora_linear_reference

OP = torch.ops.surogate.lora_linear_fp8.default
TOL = 6e-2  # relative error (Frobenius) vs the unquantized bf16/fp32 LoRA linear
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ------------------------------------------------------------------------------------------------ quantization


def _heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 1, rows)[:, None]  # rows over 3 decades
    x[0, 0] = 0.0
    return x


# Worst-case elementwise error of round-to-nearest (relative to each element's scale block): half an ulp at the top
# of the range: e4m3 (3 mantissa bits) 2^-4, e5m2 (2 bits) 2^-3; plus subnormal flush for tiny values.
@pytest.mark.parametrize("dtype,bound", [(E4M3, 0.035), (E5M2, 0.07)])
def test_rowwise_error_bound(dtype, bound):
    x = _heavy_tailed(64, 300, seed=1)
    codes, scale = quantize_rows_reference(x, dtype)
    assert codes.dtype == dtype and scale.shape == (64, 1)
    assert (codes.float().abs().amax(1) == fp8.FP8_MAX[dtype]).all()  # each row's absmax maps to the format max
    assert rel(dequantize(codes, scale, torch.float32), x) < bound


@pytest.mark.parametrize("dtype,bound", [(E4M3, 0.035), (E5M2, 0.07)])
def test_tensorwise_error_bound_and_worse_on_heavy_tails(dtype, bound):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 300, generator=g)
    codes, scale = quantize_tensorwise(x, dtype)
    assert scale.dim() == 0 and rel(dequantize(codes, scale, torch.float32), x) < bound
    tails = _heavy_tailed(64, 300, seed=2)
    tensorwise = rel(dequantize(*quantize_tensorwise(tails, dtype), torch.float32), tails)
    rowwise = rel(dequantize(*quantize_rows_reference(tails, dtype), torch.float32), tails)
    assert rowwise <= tensorwise


def test_blockwise_roundtrip_and_shapes():
    w = _heavy_tailed(300, 200, seed=3)
    codes, scale = quantize_blockwise(w, block=128)
    assert codes.shape == w.shape and scale.shape == (3, 2)
    assert rel(dequantize_blockwise(codes, scale, 128, torch.float32), w) < 0.035


def test_column_multiplier_folds_into_rows():
    x, col = _heavy_tailed(8, 64, seed=4), torch.rand(64) + 0.5
    codes, scale = quantize_rows_reference(x, E5M2, col_scale=col)
    assert rel(dequantize(codes, scale, torch.float32), x * col) < 0.07


_INTERPRETED = """
import torch
from ops.fp8 import E4M3, E5M2, quantize_rows_triton, quantize_rows_reference
g = torch.Generator().manual_seed(5)
cases = [(5, 300, E4M3, False), (3, 1000, E5M2, True), (4, 64, E4M3, False)]
for (rows, cols, dtype, col), in_registers_max, block in [  # each case through both kernels
    (case, limit, block) for case in cases for limit, block in [(4096, 2048), (16, 128)]
]:
    x = torch.randn(rows, cols, generator=g) * 3
    x[1] *= 0.0
    c = torch.rand(cols, generator=g) + 0.5 if col else None
    q, s = quantize_rows_triton(x, dtype, c, row_in_registers_max=in_registers_max, block=block)
    rq, rs = quantize_rows_reference(x, dtype, c)
    assert torch.equal(s, rs), (s, rs)
    diff = q.float() != rq.float()
    # The interpreter's float->fp8 cast drops the exponent carry when rounding up to a power of two (it yields 64
    # for 127.99 -> 128); the GPU cast does not (test_triton_quantize_on_gpu). Everything else must agree exactly.
    carry = rq.float()[diff] == 2 * q.float()[diff]
    powers = torch.log2(rq.float()[diff].abs()).frac() == 0
    assert bool((carry & powers).all()), (q.float()[diff], rq.float()[diff])
    assert diff.float().mean().item() < 0.05
print("ok")
"""


def test_triton_quantize_kernel_matches_reference_interpreted():
    _run_interpreted(_INTERPRETED)


_TRANSPOSE_INTERPRETED = """
import torch
from ops.fp8 import E4M3, transpose_codes
g = torch.Generator().manual_seed(6)
for rows, cols in [(70, 130), (64, 64), (5, 200)]:
    codes = (torch.randn(rows, cols, generator=g) * 50).to(E4M3)
    out = transpose_codes(codes, block=32)
    assert out.shape == (cols, rows) and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), codes.t().contiguous().view(torch.uint8))
print("ok")
"""


def test_triton_transpose_kernel_matches_torch_interpreted():
    _run_interpreted(_TRANSPOSE_INTERPRETED)


@pytest.mark.gpu
@cuda
def test_triton_transpose_on_gpu():
    codes = (torch.randn(4096 + 3, 1000, device="cuda") * 50).to(E4M3)
    assert torch.equal(transpose_codes(codes).view(torch.uint8), codes.t().contiguous().view(torch.uint8))


# ------------------------------------------------------------------------------------------------ the op

# (leading dims, in, outs per projection, ranks): a single projection and a q/k/v-like group
SHAPES = [((3, 16), 64, [48], [4]), ((2, 24), 96, [96, 32, 32], [8, 8, 8])]


def _check_against_exact(lead, d_in, outs, ranks, stored: bool, grad_format="e5m2", compute="fp8", device="cpu"):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, ws, As, Bs = _inputs(lead, d_in, outs, ranks, dtype, device)
    scalings = [2.0] * len(outs)
    want = lora_linear_reference(x, ws, None, As, Bs, scalings)
    if stored:
        quantized = [quantize_rows(w, E4M3) for w in ws]
        weights, scales = [q for q, _ in quantized], [s.view(-1) for _, s in quantized]
        y, _ = OP(x, weights, None, As, Bs, scalings, [], scales, grad_format, compute)
    else:
        y, _ = OP(x, ws, None, As, Bs, scalings, [], grad_format=grad_format, compute=compute)
    assert y.dtype == dtype and rel(y, want) < TOL
    for got, exact in zip(_grads(y, x, As, Bs), _grads(want, x, As, Bs)):
        assert rel(got, exact) < TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stored", [False, True], ids=["fp8", "qfp8"])
@pytest.mark.parametrize("grad_format", ["e5m2", "e4m3"])
def test_op_vs_exact_lora_linear(shape, stored, grad_format):
    fp8.stats.clear()
    _check_against_exact(*shape, stored=stored, grad_format=grad_format)
    assert fp8.stats["fp8_gemms"] == 2  # forward and dX: the FP8 path ran (emulated on CPU)


def test_qfp8_bf16_compute_dequantizes_in_the_op():
    fp8.stats.clear()
    _check_against_exact(*SHAPES[1], stored=True, compute="bf16")
    assert fp8.stats["fp8_gemms"] == 0


@pytest.mark.parametrize("stored", [False, True], ids=["fp8", "qfp8"])
def test_op_matches_plain_torch_reference_on_cpu(stored):
    x, (w,), (a,), (b,) = _inputs((4, 8), 64, [32], [4])
    if stored:
        codes, scale = quantize_rows(w, E4M3)
        y, _ = OP(x, [codes], None, [a], [b], [2.0], [], [scale.view(-1)])
        want = lora_linear_fp8_reference(x, codes, a, b, 2.0, scale.view(-1))
    else:
        y, _ = OP(x, [w], None, [a], [b], [2.0], [])
        want = lora_linear_fp8_reference(x, w, a, b, 2.0)
    assert rel(y, want) < 1e-6
    for got, ref in zip(_grads(y, x, [a], [b]), _grads(want, x, [a], [b])):
        assert rel(got, ref) < 1e-6


def test_dropout_lora_inputs_and_bias():
    x, ws, As, Bs = _inputs((2, 8), 64, [32, 16], [4, 4])
    drops = [F.dropout(x, 0.3) for _ in ws]
    bias = torch.randn(48)
    want = lora_linear_reference(x, ws, bias, As, Bs, [2.0, 2.0], drops)
    y, _ = OP(x, ws, bias, As, Bs, [2.0, 2.0], drops)
    assert rel(y, want) < TOL
    for got, exact in zip(_grads(y, x, As, Bs), _grads(want, x, As, Bs)):
        assert rel(got, exact) < TOL


def test_weight_quantized_once():
    fp8.clear_fp8_weight_cache()
    fp8.stats.clear()
    x, ws, As, Bs = _inputs((2, 8), 64, [32], [4])
    for _ in range(3):
        OP(x, ws, None, As, Bs, [1.0], [])[0].sum().backward()
    assert fp8.stats["weights_quantized"] == 1 and fp8.stats["fp8_gemms"] == 6
    ws[0].mul_(2)  # an in-place write (version bump) re-quantizes, replacing the entry
    OP(x, ws, None, As, Bs, [1.0], [])
    assert fp8.stats["weights_quantized"] == 2 and len(fp8.WEIGHT_CACHE) == 1


def test_row_codes_only_cache_matches_the_qfp8_arithmetic():
    """cache_transposed=False: only W's row codes are cached and dX folds their scales into dy, exactly as the
    qfp8 reference computes on the same codes."""
    fp8.clear_fp8_weight_cache()
    x, ws, As, Bs = _inputs((2, 8), 64, [32], [4])
    y, _ = OP(x, ws, None, As, Bs, [2.0], [], None, "e5m2", "fp8", False)
    (fw,) = fp8.WEIGHT_CACHE.values()
    assert fw.codes_t is None and fw.codes.dtype == torch.float8_e4m3fn
    want = lora_linear_fp8_reference(x, fw.codes, As[0], Bs[0], 2.0, fw.scale.view(-1))
    assert rel(y, want) < 1e-6
    for got, ref in zip(_grads(y, x, As, Bs), _grads(want, x, As, Bs)):
        assert rel(got, ref) < 1e-6
    # and within FP8 error of the cached-both-orientations op (dX's weight rounding differs)
    both, _ = OP(x, ws, None, As, Bs, [2.0], [])
    assert rel(_grads(y, x, As, Bs)[0], _grads(both, x, As, Bs)[0]) < 6e-2


def test_transposed_budget_caps_the_transposed_codes():
    """`set_transposed_budget`: weights quantized while the cap has room get W^T's own codes, later ones only their
    row codes (dX then runs as qfp8's does); both backwards match their references."""
    fp8.clear_fp8_weight_cache()
    x, ws, As, Bs = _inputs((2, 8), 64, [32], [4])
    x2, ws2, As2, Bs2 = _inputs((2, 8), 64, [32], [4])
    try:
        fp8.set_transposed_budget(ws[0].numel())  # room for the first weight's codes only
        y, _ = OP(x, ws, None, As, Bs, [2.0], [])
        y2, _ = OP(x2, ws2, None, As2, Bs2, [2.0], [])
    finally:
        fp8.set_transposed_budget(None)
    first, second = fp8.WEIGHT_CACHE.values()
    assert first.codes_t is not None and second.codes_t is None
    want = lora_linear_fp8_reference(x2, second.codes, As2[0], Bs2[0], 2.0, second.scale.view(-1))
    for got, ref in zip(_grads(y2, x2, As2, Bs2), _grads(want, x2, As2, Bs2)):
        assert rel(got, ref) < 1e-6
    want = lora_linear_fp8_reference(x, ws[0], As[0], Bs[0], 2.0)  # W^T quantized with its own absmax
    for got, ref in zip(_grads(y, x, As, Bs), _grads(want, x, As, Bs)):
        assert rel(got, ref) < 1e-6


def test_opcheck():
    x, ws, As, Bs = _inputs((2, 4), 32, [16], [2])
    torch.library.opcheck(OP, (x, ws, None, As, Bs, [2.0], []), test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("stored", [False, True], ids=["fp8", "qfp8"])
@pytest.mark.parametrize("grad_format", ["e5m2", "e4m3"])
@pytest.mark.parametrize("fast_dx", [False, True], ids=["precise-dx", "fast-dx"])
def test_op_on_fp8_tensor_cores(stored, grad_format, fast_dx):
    fp8.stats.clear()
    calls = []
    real = torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append((args[0].dtype, kwargs["use_fast_accum"]))
        return real(*args, **kwargs)

    torch._scaled_mm = counting
    fp8.set_dx_fast_accum(fast_dx)
    try:
        _check_against_exact((4, 256), 1024, [1024, 256, 256], [16, 16, 16], stored, grad_format, device="cuda")
    finally:
        torch._scaled_mm = real
        fp8.set_dx_fast_accum(False)
    # forward (x e4m3, fast accumulation) and dX (dy in the grad format, fast accumulation as set)
    assert calls == [(E4M3, True), (fp8.GRAD_FORMATS[grad_format], fast_dx)]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("col", [False, True])
@pytest.mark.parametrize("cols", [3000, 20000])  # the row held in registers; the two-pass kernel
def test_triton_quantize_on_gpu(dtype, col, cols):
    x = (torch.randn(513, cols, device="cuda") * 4).bfloat16()
    c = torch.rand(cols, device="cuda") + 0.5 if col else None
    q, s = fp8.quantize_rows_triton(x, dtype, c)
    rq, rs = quantize_rows_reference(x, dtype, c)
    torch.testing.assert_close(s, rs)
    assert (q.float() != rq.float()).float().mean().item() < 1e-3
