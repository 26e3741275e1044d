"""ops/fp4.py: the e2m1 grid, NVFP4 and MXFP4 scale layouts and round-trip error, our quantizers against torchao's,
stochastic rounding, the Hadamard rotation, the Triton dequantize kernel, and surogate::lora_linear_fp4 (fp4 compute
and stored-FP4 with bf16 compute) against its plain-torch reference and the exact LoRA linear (y, dX, dA, dB)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_cases import lora_grads as _grads
from lora_cases import lora_inputs as _inputs
from lora_cases import rel, row_codes_reference, run_interpreted

from ops import fp4
from ops.fp4 import dequantize_fp4, fake_quantize_fp4, lora_linear_fp4_reference, quantize_fp4
from ops.lora_linear import lora_linear_reference

OP = torch.ops.surogate.lora_linear_fp4.default
FORMATS = ["nvfp4", "mxfp4"]
# e2m1 (OCP MX spec, table 5): sign, 2 exponent bits (bias 1), 1 mantissa bit; written out independently.
E2M1_POSITIVE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _torchao_mx():
    pytest.importorskip("torchao.prototype.mx_formats")
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    return to_mx, to_dtype, nvfp4_quantize, per_tensor_amax_to_scale


def _normal(rows, cols, seed=0, std=0.05):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std


# ------------------------------------------------------------------------------------------------ formats


def test_e2m1_grid_exact_values():
    assert fp4.E2M1.tolist() == E2M1_POSITIVE + [-v for v in E2M1_POSITIVE]
    # every code decodes to its value: one nvfp4 block per code pattern, scale 1 (e4m3 0x38), global 1
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)
    packed = (codes[0::2] | (codes[1::2] << 4)).view(1, 16)  # first element in the low nibble
    scale = torch.full((1, 2), 1.0).to(torch.float8_e4m3fn)
    got = dequantize_fp4(packed, scale, torch.ones(1), "nvfp4", torch.float32)
    assert got.view(-1).tolist() == fp4.E2M1.repeat(2).tolist()


def test_round_to_nearest_even_on_the_grid():
    # one mxfp4 block with amax 3: scale 2^(floor(log2 3) - 2) = 0.5 exactly, so x / 0.5 are grid points or ties
    x = torch.tensor([3.0, 0.125, 0.375, 0.625, 0.875, 1.25, 1.75, 2.5, -0.125, -0.375, 1.0, 1.5, 0.0, 2.0, 0.5, 0.75])
    c, s, g = quantize_fp4(torch.cat([x, x]).view(1, 32), "mxfp4")
    assert s.item() == 127 - 1 and g.item() == 1.0
    got = dequantize_fp4(c, s, g, "mxfp4", torch.float32)[0, :16] / 0.5  # back in grid units
    # ties: 0.25 -> 0 (even), 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    want = [6, 0, 1, 1, 2, 2, 4, 4, -0.0, -1, 2, 3, 0, 4, 1, 1.5]
    assert got.view(-1).tolist() == want


@pytest.mark.parametrize("fp4_format", FORMATS)
def test_scale_layouts(fp4_format):
    x = _normal(48, 256)
    codes, scale, global_scale = quantize_fp4(x, fp4_format)
    block = fp4.FORMATS[fp4_format].block
    assert codes.shape == (48, 128) and codes.dtype == torch.uint8
    assert scale.shape == (48, 256 // block) and global_scale.shape == (1,) and global_scale.dtype == torch.float32
    if fp4_format == "nvfp4":  # e4m3 block scales; fp32 global = amax / (448 * 6): the largest block scale ~448
        assert block == 16 and scale.dtype == torch.float8_e4m3fn
        assert global_scale.item() == pytest.approx(x.abs().max().item() / (448 * 6), rel=1e-6)
        assert scale.float().max().item() == pytest.approx(448, rel=0.07)
    else:  # e8m0: biased exponent, the scale is 2^(floor(log2 amax) - 2), global 1
        assert block == 32 and scale.dtype == torch.uint8 and global_scale.item() == 1.0
        amax = x.view(48, 8, 32).abs().amax(-1)
        assert torch.equal(scale.long() - 127, torch.floor(torch.log2(amax)).long() - 2)


@pytest.mark.parametrize("fp4_format", FORMATS)
def test_roundtrip_error_bounds(fp4_format):
    x = _normal(256, 512, seed=1)
    got = dequantize_fp4(*quantize_fp4(x, fp4_format), fp4_format, torch.float32)
    error = rel(got, x)
    # 4 bits on Gaussian data: ~9.5% (nvfp4: fine e4m3 scales) and ~12% (mxfp4: power-of-two scales, blocks of 32)
    assert (0.07 < error < 0.105) if fp4_format == "nvfp4" else (0.09 < error < 0.135), error
    # per element: at most half the top grid step (4 -> 6) times the block scale; mxfp4's power-of-two scale maps
    # the block amax into [4, 8), so values above 6 saturate: up to 2 scales off
    c, s, g = quantize_fp4(x, fp4_format)
    scale = fp4._scale_values(s, fp4_format).repeat_interleave(fp4.FORMATS[fp4_format].block, 1) * g
    bound = 1.0 if fp4_format == "nvfp4" else 2.0
    assert ((got - x).abs() <= bound * scale * (1.0 + 1e-6)).all()


@pytest.mark.parametrize("fp4_format", FORMATS)
def test_nan_is_not_quantized_away(fp4_format):
    x = _normal(4, 64)
    x[1, 3] = float("nan")
    got = fake_quantize_fp4(x, fp4_format)
    assert torch.isnan(got).any()


def test_nvfp4_matches_torchao():
    _, _, nvfp4_quantize, per_tensor_amax_to_scale = _torchao_mx()
    x = _normal(64, 256, seed=2)
    x[5, :16] = 0.0  # an all-zero block
    codes, scale, global_scale = quantize_fp4(x, "nvfp4")
    t_scale, t_codes = nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().amax()))
    assert torch.equal(codes, t_codes) and torch.equal(scale.view(torch.uint8), t_scale.view(torch.uint8))
    assert global_scale.item() == per_tensor_amax_to_scale(x.abs().amax()).item()


def test_mxfp4_matches_torchao():
    to_mx, to_dtype, _, _ = _torchao_mx()
    x = _normal(64, 256, seed=3).bfloat16()
    x[2, :32] = 0.0
    codes, scale, global_scale = quantize_fp4(x, "mxfp4")
    t_scale, t_codes = to_mx(x, torch.float4_e2m1fn_x2, 32)
    assert torch.equal(codes, t_codes.view(torch.uint8)) and torch.equal(scale, t_scale.view(torch.uint8))
    want = to_dtype(t_codes, t_scale, torch.float4_e2m1fn_x2, 32, torch.float32)
    assert torch.equal(dequantize_fp4(codes, scale, global_scale, "mxfp4", torch.float32), want)


@pytest.mark.parametrize("fp4_format", FORMATS)
def test_stochastic_rounding_is_unbiased(fp4_format):
    torch.manual_seed(0)
    x = _normal(8, 64, seed=4)
    nearest = fake_quantize_fp4(x, fp4_format)
    samples = torch.stack([fake_quantize_fp4(x, fp4_format, stochastic=True) for _ in range(400)])
    # the mean of the samples converges to x, unlike nearest rounding; except where mxfp4 saturates (|x| > 6 scales)
    _, s, g = quantize_fp4(x, fp4_format)
    scale = fp4._scale_values(s, fp4_format).repeat_interleave(fp4.FORMATS[fp4_format].block, 1) * g
    inside = x.abs() <= 6 * scale
    assert inside.float().mean() > 0.9
    assert rel(samples.mean(0)[inside], x[inside]) < 0.25 * rel(nearest[inside], x[inside])
    assert (samples != nearest).any()


def test_storage_bytes_vs_bf16():
    w = _normal(1024, 1024).bfloat16()
    for fp4_format, bits in (("nvfp4", 4 + 8 / 16), ("mxfp4", 4 + 8 / 32)):
        ratio = fp4.fp4_nbytes(*quantize_fp4(w, fp4_format)) / (w.numel() * 2)
        assert ratio == pytest.approx(bits / 16, abs=1e-5)  # 0.281x and 0.266x of bf16


def test_hadamard_rotation_is_orthonormal_and_spreads_outliers():
    r = fp4.hadamard_rotation()
    assert torch.allclose(r @ r.t(), torch.eye(16), atol=1e-6)
    assert set(r.abs().view(-1).tolist()) == {0.25}
    x = torch.zeros(1, 32)
    x[0, 3] = 8.0  # one outlier per block: after the rotation every element of its block has magnitude 2
    assert torch.allclose(fp4.rht(x)[0, :16].abs(), torch.full((16,), 2.0))
    a, w = _normal(5, 32, seed=5), _normal(7, 32, seed=6)
    assert torch.allclose(fp4.rht(a) @ fp4.rht(w).t(), a @ w.t(), atol=1e-6)


_INTERPRETED = """
import torch
from ops.fp4 import dequantize_fp4_reference, dequantize_fp4_triton, quantize_fp4
g = torch.Generator().manual_seed(5)
for fmt in ("nvfp4", "mxfp4"):
    for rows, cols, tile in [(5, 64, (4, 32)), (16, 256, (16, 512)), (3, 96, (64, 64))]:  # partial tiles
        stored = quantize_fp4(torch.randn(rows, cols, generator=g) * 0.05, fmt)
        want = dequantize_fp4_reference(*stored, fmt, torch.float32)
        f32 = dequantize_fp4_triton(*stored, fmt, torch.float32, tile=tile)
        assert torch.equal(f32, want), fmt
        # The interpreter's fp32->bf16 cast truncates; the GPU's rounds to nearest even (test_triton_dequantize_on_gpu).
        bf16 = dequantize_fp4_triton(*stored, fmt, torch.bfloat16, tile=tile)
        assert torch.equal(bf16, (f32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16))
        # Transposed, into a column block of a wider buffer (the dX operand of a q/k/v group).
        buf = torch.full((cols, rows + 8), float("nan"))
        dequantize_fp4_triton(*stored, fmt, torch.float32, out=buf[:, 3 : 3 + rows].t(), tile=tile)
        assert torch.equal(buf[:, 3 : 3 + rows], want.t()), fmt
        assert buf[:, :3].isnan().all() and buf[:, 3 + rows :].isnan().all()
print("ok")
"""


def test_triton_dequantize_kernel_matches_reference_interpreted():
    pytest.importorskip("triton")
    run_interpreted(_INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp4_format", FORMATS)
def test_triton_dequantize_on_gpu(fp4_format):
    stored = quantize_fp4(torch.randn(1000, 2048, device="cuda").bfloat16(), fp4_format)
    for dtype in (torch.float32, torch.bfloat16):
        got = fp4.dequantize_fp4_triton(*stored, fp4_format, dtype)
        assert torch.equal(got, fp4.dequantize_fp4_reference(*stored, fp4_format, dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp4_format", FORMATS)
def test_op_on_gpu_matches_cpu(fp4_format):
    """The CUDA path (Triton dequantize, cuBLAS bf16 GEMMs) against the same op on CPU in fp32."""
    x, ws, As, Bs = _inputs((4, 64), 256, [256, 128], [8, 8], dtype=torch.bfloat16)
    args = (ws, None, As, Bs, [2.0, 2.0], [], None, None, fp4_format, "fp4", False, True)
    y_cpu = OP(x.float(), [w.float() for w in ws], *args[1:2], [a.float() for a in As], [b.float() for b in Bs],
               *args[4:])[0]  # fmt: skip
    y_gpu = OP(x.cuda(), [w.cuda() for w in ws], None, [a.cuda() for a in As], [b.cuda() for b in Bs], *args[4:])[0]
    assert rel(y_gpu.float().cpu(), y_cpu) < 2e-2


# ------------------------------------------------------------------------------------------------ the op

# (leading dims, in, outs per projection, ranks): a single projection and a q/k/v-like group
SHAPES = [((3, 16), 64, [64], [4]), ((2, 24), 128, [128, 64, 64], [8, 8, 8])]


def _reference(x, ws, As, Bs, scalings, fp4_format, compute="fp4", hadamard=True):
    return lora_linear_fp4_reference(x, ws, None, As, Bs, scalings, (), fp4_format, compute, False, hadamard)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fp4_format", FORMATS)
@pytest.mark.parametrize("hadamard", [True, False])
def test_fp4_compute_vs_reference_and_exact(shape, fp4_format, hadamard):
    fp4.clear_fp4_weight_cache()
    x, ws, As, Bs = _inputs(*shape)
    scalings = [2.0] * len(ws)
    fp4.stats.clear()
    y = OP(x, ws, None, As, Bs, scalings, [], None, None, fp4_format, "fp4", False, hadamard)[0]
    assert fp4.stats["fp4_gemms"] == 1 and fp4.stats["weights_quantized"] == len(ws)
    ref = _reference(x, ws, As, Bs, scalings, fp4_format, hadamard=hadamard)
    assert rel(y, ref) < 1e-5  # same FP4 operands, fp32 GEMMs in another order
    got, want = _grads(y, x, As, Bs), _grads(ref, x, As, Bs)
    assert fp4.stats["fp4_gemms"] == 2  # + the dX GEMM (dA/dB read the exact dy)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5
    # against the unquantized LoRA linear: 4-bit operands in y and dX; dA and dB never see the base
    exact = lora_linear_reference(x, ws, None, As, Bs, scalings)
    got, want = _grads(y, x, As, Bs), _grads(exact, x, As, Bs)
    assert rel(y, exact) < 0.2 and rel(got[0], want[0]) < 0.2
    for g_lora, w_lora in zip(got[1:], want[1:]):
        assert rel(g_lora, w_lora) < 1e-5


def test_stochastic_dx_is_unbiased_and_lora_grads_exact():
    x, ws, As, Bs = _inputs((4, 8), 64, [64], [4])
    torch.manual_seed(0)
    args = (None, As, Bs, [2.0], [], None, None, "nvfp4", "fp4", True, True)
    runs = [_grads(OP(x, ws, *args)[0], x, As, Bs) for _ in range(64)]
    nearest = _grads(OP(x, ws, *args[:-2], False, True)[0], x, As, Bs)
    # dX with the FP4 (rotated) weight but dy not rounded at all: what stochastic rounding converges to
    dy = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(1)).view(-1, 64)
    wtq = dequantize_fp4(*quantize_fp4(fp4.rht(ws[0].t()), "nvfp4"), "nvfp4", torch.float32)
    unrounded = (fp4.rht(dy) @ wtq.t() + 2.0 * (dy @ Bs[0]) @ As[0]).view(4, 8, 64)
    mean_dx = torch.stack([r[0] for r in runs]).mean(0)
    assert not torch.equal(runs[0][0], runs[1][0])  # each run draws its own rounding
    assert rel(mean_dx, unrounded) < 0.5 * rel(nearest[0], unrounded)
    exact_y = lora_linear_reference(x, ws, None, As, Bs, [2.0])
    for g_lora, w_lora in zip(runs[0][1:], _grads(exact_y, x, As, Bs)[1:]):  # dA, dB: exact every run
        assert rel(g_lora, w_lora) < 1e-5


@pytest.mark.parametrize("fp4_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_fp4_bf16_compute_vs_dequantized_reference(fp4_format, dtype):
    x, ws, As, Bs = _inputs(*SHAPES[1], dtype=dtype)
    stored = [quantize_fp4(w, fp4_format) for w in ws]
    codes, scales, globals_ = (list(t) for t in zip(*stored))
    scalings = [2.0] * len(ws)
    y = OP(x, codes, None, As, Bs, scalings, [], scales, globals_, fp4_format, "bf16", True, True)[0]
    deq = [dequantize_fp4(*s, fp4_format, dtype) for s in stored]
    ref = lora_linear_reference(x, deq, None, As, Bs, scalings)
    tight = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and rel(y, ref) < tight
    for got, want in zip(_grads(y, x, As, Bs), _grads(ref, x, As, Bs)):
        assert rel(got, want) < tight
    exact = lora_linear_reference(x, ws, None, As, Bs, scalings)
    assert rel(y, exact) < 0.15 and rel(_grads(y, x, As, Bs)[0], _grads(exact, x, As, Bs)[0]) < 0.15


@pytest.mark.parametrize("fp4_format", FORMATS)
def test_fp4_to_fp8_row_codes(fp4_format):
    _, ws, _, _ = _inputs(*SHAPES[1])
    stored = [quantize_fp4(w, fp4_format) for w in ws]
    fw = fp4.fp4_to_fp8(*(list(t) for t in zip(*stored)), fp4_format)
    assert fw.codes.dtype == torch.float8_e4m3fn and list(fw.codes.shape) == [256, 128]
    deq = torch.cat([dequantize_fp4(*s, fp4_format, torch.float32) for s in stored])
    # e2m1 times a block scale needs up to 5 significant bits; e4m3 keeps 4: <= 2^-4 per element
    assert 0 < rel(fw.codes.float() * fw.scale.view(-1, 1), deq) < 0.04
    assert fw.codes.float().abs().max() <= 448 and (fw.codes.float().abs().amax(dim=1) > 200).all()


@pytest.mark.parametrize("fp4_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_fp4_fp8_compute(fp4_format, dtype):
    from ops.fp8 import stats

    x, ws, As, Bs = _inputs(*SHAPES[1], dtype=dtype)
    stored = [quantize_fp4(w, fp4_format) for w in ws]
    codes, scales, globals_ = (list(t) for t in zip(*stored))
    scalings = [2.0] * len(ws)
    before = stats["fp8_gemms"]
    y = OP(x, codes, None, As, Bs, scalings, [], scales, globals_, fp4_format, "fp8", True, True, "e4m3")[0]
    grads = _grads(y, x, As, Bs)
    assert stats["fp8_gemms"] == before + 2  # forward and dX ran as FP8 GEMMs
    fw = fp4.fp4_to_fp8(codes, scales, globals_, fp4_format)
    ref = row_codes_reference(x, fw, [w.shape[0] for w in ws], As, Bs, 2.0)
    tight = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(y, ref) < tight
    bf16 = OP(x, codes, None, As, Bs, scalings, [], scales, globals_, fp4_format, "bf16", True, True)[0]
    want = _grads(bf16, x, As, Bs)
    assert rel(y, bf16) < 6e-2 and rel(grads[0], want[0]) < 6e-2  # FP8 rounding of x, W and dy
    for g_lora, w_lora in zip(grads[1:], want[1:]):  # dA, dB read the exact dy and x
        assert rel(g_lora, w_lora) < tight


def test_fp8_compute_needs_stored_weights():
    x, ws, As, Bs = _inputs(*SHAPES[0])
    with pytest.raises(ValueError, match="FP4-stored"):
        OP(x, ws, None, As, Bs, [2.0], [], None, None, "nvfp4", "fp8", True, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp4_format", FORMATS)
def test_fp4_to_fp8_kernel_on_gpu(fp4_format):
    stored = quantize_fp4(torch.randn(1024, 2048, device="cuda").bfloat16() * 0.02, fp4_format)
    inv = 448.0 / fp4.fp4_row_absmax(stored[1], stored[2], fp4_format)
    got = fp4.dequantize_fp4_triton(*stored, fp4_format, torch.float8_e4m3fn, row_scale=inv)
    want = fp4.dequantize_fp4_reference(*stored, fp4_format, torch.float8_e4m3fn, row_scale=inv)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    # the dX orientation: written transposed into a column block of a wider buffer
    buf = torch.zeros(2048, 1024 + 256, dtype=torch.float8_e4m3fn, device="cuda")
    fp4.dequantize_fp4_triton(*stored, fp4_format, torch.float8_e4m3fn, row_scale=inv, out=buf[:, 128:1152].t())
    assert torch.equal(buf[:, 128:1152].view(torch.uint8), want.t().view(torch.uint8))


def test_stored_fp4_with_fp4_compute_vs_reference():
    x, ws, As, Bs = _inputs(*SHAPES[0])
    stored = quantize_fp4(ws[0], "nvfp4")
    y = OP(x, [stored[0]], None, As, Bs, [2.0], [], [stored[1]], [stored[2]], "nvfp4", "fp4", False, True)[0]
    deq = dequantize_fp4(*stored, "nvfp4", torch.float32)
    ref = _reference(x, [deq], As, Bs, [2.0], "nvfp4")
    assert rel(y, ref) < 1e-5
    for got, want in zip(_grads(y, x, As, Bs), _grads(ref, x, As, Bs)):
        assert rel(got, want) < 1e-5


def test_bias_and_dropout_inputs():
    x, (w,), (a,), (b,) = _inputs((4, 8), 64, [32], [4])
    bias = torch.randn(32)
    drop = F.dropout(x, 0.3)
    y = OP(x, [w], bias, [a], [b], [2.0], [drop], None, None, "nvfp4", "fp4", False, True)[0]
    want = lora_linear_fp4_reference(x, [w], bias, [a], [b], [2.0], [drop], "nvfp4", "fp4", False, True)
    assert rel(y, want) < 1e-5
    got, ref = _grads(y, x, [a], [b]), _grads(want, x, [a], [b])
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-5


def test_refuses_unaligned_shapes_and_codes_without_scales():
    x, ws, As, Bs = _inputs((2, 3), 64, [24], [2])  # out 24: not a multiple of the 16-element block
    with pytest.raises(ValueError, match="divisible by 16"):
        OP(x, ws, None, As, Bs, [1.0], [])
    codes = quantize_fp4(_normal(32, 64), "nvfp4")[0]
    with pytest.raises(RuntimeError, match="without their block scales"):
        OP(x, [codes], None, As, [torch.zeros(32, 2)], [1.0], [])


def test_module_stores_only_fp4():
    from surogate.lora import LoRALinear

    lora = LoRALinear(torch.nn.Linear(128, 64, bias=False), rank=4, alpha=8.0)
    torch.nn.init.normal_(lora.lora_B, std=0.02)
    x = torch.randn(2, 5, 128)
    dense = lora(x)
    module = fp4.quantize_lora_base_fp4_(lora, "mxfp4")
    assert lora.weight is None and module.weight.dtype == torch.uint8 and not module.weight.requires_grad
    assert module.weight_scale.shape == (64, 4) and module.fp4_format == "mxfp4"
    assert [p.dtype for p in module.parameters() if not p.requires_grad] == [torch.uint8]
    assert rel(module(x), dense) < 0.15


def test_opcheck():
    x, ws, As, Bs = _inputs((2, 4), 64, [32], [2])
    # test_schema compares inputs with allclose, which CPU e4m3 tensors do not support: nvfp4 gets the fake test only
    for fp4_format, tests in (("mxfp4", ("test_schema", "test_faketensor")), ("nvfp4", ("test_faketensor",))):
        codes, scale, global_scale = quantize_fp4(ws[0], fp4_format)
        stored = (x, [codes], None, As, Bs, [2.0], [], [scale], [global_scale], fp4_format, "bf16", True, True)
        for args in (stored, (x, ws, None, As, Bs, [2.0], [], None, None, fp4_format, "fp4", False, True)):
            torch.library.opcheck(OP, args, test_utils=tests)
        torch.library.opcheck(
            torch.ops.surogate.fp4_dequantize.default, (codes, scale, global_scale, fp4_format, torch.bfloat16),
            test_utils=tests,
        )  # fmt: skip
