"""ops/nf4.py: the NF4 codebook, quantization and dequantization against the QLoRA table and torchao's NF4Tensor,
round-trip error, storage bytes, and surogate::lora_linear_nf4 against its eager reference and the exact LoRA
linear (y, dX, dA, dB)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_cases import lora_grads as _grads
from lora_cases import lora_inputs as _inputs
from lora_cases import rel, row_codes_reference, run_interpreted

from ops import nf4
from ops.lora_linear import lora_linear_reference
from ops.nf4 import dequantize_nf4, lora_linear_nf4_reference, quantize_nf4

OP = torch.ops.surogate.lora_linear_nf4.default
# The QLoRA paper's NF4 values (appendix E; bitsandbytes' table), written out independently of ops/nf4.py.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# torchao's table (the same values rounded to 4 decimals), for exact comparisons with NF4Tensor.
TORCHAO_NF4 = torch.tensor(
    [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626,
     0.7230, 1.0]
)  # fmt: skip


def _torchao():
    quantization = pytest.importorskip("torchao.quantization")
    return quantization.to_nf4


# ------------------------------------------------------------------------------------------------ format


def test_codebook_is_the_paper_table():
    assert nf4.NF4.dtype == torch.float32 and nf4.NF4.tolist() == torch.tensor(PAPER_NF4).tolist()


def test_dequantize_each_code_exactly():
    # one block holding every code twice; absmax quantized exactly (a single block: mean = absmax, factor from 0)
    idx = torch.arange(16, dtype=torch.uint8).repeat(4)  # 64 codes = one block
    codes = ((idx[0::2] << 4) | idx[1::2]).view(1, 32)
    absmax_q, factor, mean = torch.zeros(1, dtype=torch.int8), torch.ones(1), torch.tensor([0.5])
    got = dequantize_nf4(codes, absmax_q, factor, mean, torch.float32)
    assert torch.equal(got.view(-1), 0.5 * torch.tensor(PAPER_NF4).repeat(4))


def test_quantize_roundtrip_error_on_normal_weights():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, absmax_q, factor, mean = quantize_nf4(w)
    assert codes.shape == (256, 256) and codes.dtype == torch.uint8
    assert absmax_q.shape == (256 * 512 // 64,) and absmax_q.dtype == torch.int8
    assert factor.shape == (256 * 512 // 64 // 256,) and factor.dtype == torch.float32 and mean.shape == (1,)
    error = rel(dequantize_nf4(codes, absmax_q, factor, mean, torch.float32), w)
    assert 0.05 < error < 0.11  # 4 bits: ~9% relative (Frobenius) on Gaussian weights; fp8 e4m3 is ~2.5%


def test_partial_last_scale_group_and_bf16():
    w = torch.randn(3, 192, generator=torch.Generator().manual_seed(1)).bfloat16()  # 9 blocks: one partial group
    stored = quantize_nf4(w)
    got = dequantize_nf4(*stored, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and rel(got, w) < 0.11
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize_nf4(torch.randn(3, 10))


def test_matches_torchao_nf4tensor():
    to_nf4 = _torchao()
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    t = to_nf4(w, 64, 256)
    components = (t.quantized_data.view(128, 128), t.quantized_scalers, t.quantization_factor, t.scaler_mean.view(1))
    # our dequantization of torchao's components is torchao's dequantization, bit for bit
    assert torch.equal(dequantize_nf4(*components, torch.float32, codebook=TORCHAO_NF4), t.get_original_weight())
    # our quantization (with torchao's rounded table) gives torchao's components, bit for bit
    for ours, theirs in zip(quantize_nf4(w, codebook=TORCHAO_NF4), components):
        assert torch.equal(ours, theirs)
    # with the exact table: the same scales, codes differ only where the 4-decimal rounding moves a boundary
    codes, *scales = quantize_nf4(w)
    assert all(torch.equal(a, b) for a, b in zip(scales, components[1:]))
    assert (codes != components[0]).float().mean().item() < 1e-3


def test_storage_bytes_vs_bf16():
    w = torch.randn(1024, 1024).bfloat16()
    stored = quantize_nf4(w)
    ratio = nf4.nf4_nbytes(*stored) / (w.numel() * w.element_size())
    assert ratio == pytest.approx((4 + 8 / 64 + 32 / 64 / 256) / 16, abs=1e-5)  # 4.127 bits: 0.258x


_INTERPRETED = """
import torch
from ops.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, quantize_nf4
g = torch.Generator().manual_seed(5)
# partial tiles, and scale groups (256 blocks) that end mid-row and mid-tile
for rows, cols, tile in [(5, 192, (4, 128)), (64, 512, (16, 512)), (3, 64, (64, 64)), (37, 1024, (16, 256))]:
    stored = quantize_nf4(torch.randn(rows, cols, generator=g) * 0.05)
    want = dequantize_nf4_reference(*stored, torch.float32)
    f32 = dequantize_nf4_triton(*stored, torch.float32, tile=tile)
    assert torch.equal(f32, want)
    # The interpreter's fp32->bf16 cast truncates; the GPU's rounds to nearest even (test_triton_dequantize_on_gpu).
    bf16 = dequantize_nf4_triton(*stored, torch.bfloat16, tile=tile)
    assert torch.equal(bf16, (f32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16))
    # Transposed, into a column block of a wider buffer (the dX operand of a q/k/v group).
    buf = torch.full((cols, rows + 8), float("nan"))
    dequantize_nf4_triton(*stored, torch.float32, out=buf[:, 3 : 3 + rows].t(), tile=tile)
    assert torch.equal(buf[:, 3 : 3 + rows], want.t())
    assert buf[:, :3].isnan().all() and buf[:, 3 + rows :].isnan().all()
print("ok")
"""


def test_triton_dequantize_kernel_matches_reference_interpreted():
    run_interpreted(_INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_dequantize_on_gpu():
    stored = quantize_nf4(torch.randn(1000, 2048, device="cuda").bfloat16())
    for dtype in (torch.float32, torch.bfloat16):
        got = nf4.dequantize_nf4_triton(*stored, dtype)
        assert torch.equal(got, nf4.dequantize_nf4_reference(*stored, dtype))


# ------------------------------------------------------------------------------------------------ the op

# (leading dims, in, outs per projection, ranks): a single projection and a q/k/v-like group
SHAPES = [((3, 16), 64, [48], [4]), ((2, 24), 128, [128, 64, 64], [8, 8, 8])]


def _call(x, stored, As, Bs, scalings, lora_inputs=()):
    codes, absmax_q, factors, means = (list(t) for t in zip(*stored))
    return OP(x, codes, None, As, Bs, scalings, list(lora_inputs), absmax_q, factors, means)[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_vs_dequantized_reference_and_exact(shape, dtype):
    x, ws, As, Bs = _inputs(*shape, dtype=dtype)
    stored = [quantize_nf4(w) for w in ws]
    scalings = [2.0] * len(ws)
    y = _call(x, stored, As, Bs, scalings)
    # the eager reference: the same dequantized weight in a plain LoRA linear (tight: same arithmetic, other order)
    deq = [dequantize_nf4(*s, dtype) for s in stored]
    ref = lora_linear_reference(x, deq, None, As, Bs, scalings)
    tight = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and rel(y, ref) < tight
    for got, want in zip(_grads(y, x, As, Bs), _grads(ref, x, As, Bs)):
        assert rel(got, want) < tight
    # against the unquantized LoRA linear: the 4-bit error (~9% on the base) shows in y and dX; dA and dB
    # depend on the base only through nothing (dB = s dy^T xA, dA = s (dy B)^T x): exact up to rounding
    exact = lora_linear_reference(x, ws, None, As, Bs, scalings)
    assert rel(y, exact) < 0.12
    got, want = _grads(y, x, As, Bs), _grads(exact, x, As, Bs)
    assert rel(got[0], want[0]) < 0.12
    for g_lora, w_lora in zip(got[1:], want[1:]):
        assert rel(g_lora, w_lora) < tight


def test_op_matches_module_reference_with_bias_and_dropout():
    x, (w,), (a,), (b,) = _inputs((4, 8), 64, [32], [4])
    stored = quantize_nf4(w)
    bias = torch.randn(32)
    drop = F.dropout(x, 0.3)
    codes, absmax_q, factor, mean = stored
    y = OP(x, [codes], bias, [a], [b], [2.0], [drop], [absmax_q], [factor], [mean])[0]
    want = lora_linear_reference(x, [dequantize_nf4(*stored, x.dtype)], bias, [a], [b], [2.0], [drop])
    assert rel(y, want) < 1e-6
    for got, ref in zip(_grads(y, x, [a], [b]), _grads(want, x, [a], [b])):
        assert rel(got, ref) < 1e-6
    plain = lora_linear_nf4_reference(x, *stored, a, b, 2.0, bias)
    y_plain = OP(x, [codes], bias, [a], [b], [2.0], [], [absmax_q], [factor], [mean])[0]
    assert rel(y_plain, plain) < 1e-6


def test_module_stores_only_nf4():
    from surogate.lora import LoRALinear

    base = torch.nn.Linear(128, 64, bias=False)
    lora = LoRALinear(base, rank=4, alpha=8.0)
    torch.nn.init.normal_(lora.lora_B, std=0.02)
    x = torch.randn(2, 5, 128)
    dense = lora(x)
    module = nf4.quantize_lora_base_nf4_(lora)
    assert lora.weight is None and module.weight.dtype == torch.uint8 and not module.weight.requires_grad
    assert [p.dtype for p in module.parameters() if not p.requires_grad] == [torch.uint8]
    assert rel(module(x), dense) < 0.12


def test_opcheck():
    x, ws, As, Bs = _inputs((2, 4), 64, [16], [2])
    codes, absmax_q, factor, mean = quantize_nf4(ws[0])
    args = (x, [codes], None, As, Bs, [2.0], [], [absmax_q], [factor], [mean])
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(
        torch.ops.surogate.nf4_dequantize.default, (codes, absmax_q, factor, mean, torch.bfloat16),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ compute: fp8


def _fp8_options(shape_seed=0, dtype=torch.float32):
    x, ws, As, Bs = _inputs((2, 24), 128, [128, 64, 64], [8, 8, 8], dtype=dtype, seed=shape_seed)
    return x, ws, As, Bs, [quantize_nf4(w) for w in ws]


def test_nf4_to_fp8_row_codes():
    _, ws, _, _, stored = _fp8_options()
    fw = nf4.nf4_to_fp8(*(list(t) for t in zip(*stored)))
    assert fw.codes.dtype == torch.float8_e4m3fn and list(fw.codes.shape) == [256, 128]
    deq = torch.cat([dequantize_nf4(*s, torch.float32) for s in stored])
    got = fw.codes.float() * fw.scale.view(-1, 1)
    # one e4m3 rounding on top of NF4: <= 2^-4 per element, ~2% in norm; the row's largest weight maps near 448
    assert 0 < rel(got, deq) < 0.04
    assert (fw.codes.float().abs().amax(dim=1) > 300).all() and fw.codes.float().abs().max() <= 448


def test_nf4_to_fp8_row_absmax_made_once_and_remade_after_a_write():
    from ops.fp8 import ROW_ABSMAX_CACHE, clear_fp8_weight_cache

    clear_fp8_weight_cache()
    _, ws, _, _, stored = _fp8_options()
    codes, absmax_q, factors, means = (list(t) for t in zip(*stored))
    first = nf4.nf4_to_fp8(codes, absmax_q, factors, means)
    assert len(ROW_ABSMAX_CACHE) == 1
    again = nf4.nf4_to_fp8(codes, absmax_q, factors, means)
    assert torch.equal(again.scale, first.scale) and len(ROW_ABSMAX_CACHE) == 1
    # an in-place write to any scale tensor of the group (here the last weight's factors) is seen
    factors[2].mul_(0.5)  # a smaller factor: larger block absmax for that weight
    remade = nf4.nf4_to_fp8(codes, absmax_q, factors, means)
    rows = [w.shape[0] for w in ws]
    old, new = first.scale.view(-1).split(rows), remade.scale.view(-1).split(rows)
    assert torch.equal(old[0], new[0]) and not torch.equal(old[2], new[2])
    fresh = torch.cat([nf4.nf4_row_absmax(a, f, m, r) for a, f, m, r in zip(absmax_q, factors, means, rows)])
    assert torch.allclose(remade.scale.view(-1) * 448.0, fresh)
    clear_fp8_weight_cache()
    assert len(ROW_ABSMAX_CACHE) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_fp8_compute(dtype):
    from ops.fp8 import stats

    x, ws, As, Bs, stored = _fp8_options(dtype=dtype)
    codes, absmax_q, factors, means = (list(t) for t in zip(*stored))
    scalings = [2.0] * 3
    before = stats["fp8_gemms"]
    y = OP(x, codes, None, As, Bs, scalings, [], absmax_q, factors, means, "fp8", "e4m3")[0]
    grads = _grads(y, x, As, Bs)
    assert stats["fp8_gemms"] == before + 2  # forward and dX ran as FP8 GEMMs
    # against the qfp8 reference on the same e4m3 row codes: the same arithmetic (tight)
    fw = nf4.nf4_to_fp8(codes, absmax_q, factors, means)
    ref = row_codes_reference(x, fw, [w.shape[0] for w in ws], As, Bs, 2.0)
    tight = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(y, ref) < tight
    # against the bf16-compute op on the same NF4 weights: FP8 rounding of x, W and dy (<= 6e-2); dA and dB read
    # the exact dy and x (the LoRA path stays in the activation dtype), so they agree to rounding
    bf16 = OP(x, codes, None, As, Bs, scalings, [], absmax_q, factors, means)[0]
    assert rel(y, bf16) < 6e-2
    want = _grads(bf16, x, As, Bs)
    assert rel(grads[0], want[0]) < 6e-2
    for g_lora, w_lora in zip(grads[1:], want[1:]):
        assert rel(g_lora, w_lora) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_to_fp8_kernel_on_gpu():
    stored = quantize_nf4(torch.randn(1024, 2048, device="cuda").bfloat16() * 0.02)
    inv = 448.0 / nf4.nf4_row_absmax(*stored[1:], 1024)
    got = nf4.dequantize_nf4_triton(*stored, torch.float8_e4m3fn, row_scale=inv)
    want = nf4.dequantize_nf4_reference(*stored, torch.float8_e4m3fn, row_scale=inv)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    # the dX orientation: written transposed into a column block of a wider buffer
    buf = torch.zeros(2048, 1024 + 256, dtype=torch.float8_e4m3fn, device="cuda")
    nf4.dequantize_nf4_triton(*stored, torch.float8_e4m3fn, row_scale=inv, out=buf[:, 128:1152].t())
    assert torch.equal(buf[:, 128:1152].view(torch.uint8), want.t().view(torch.uint8))


def test_fp8_compute_refuses_rows_that_split_a_block():
    stored = quantize_nf4(torch.randn(64, 96))  # 96 inputs: blocks of 64 straddle rows
    with pytest.raises(ValueError, match="divisible by 64"):
        nf4.nf4_to_fp8(*([t] for t in stored))
