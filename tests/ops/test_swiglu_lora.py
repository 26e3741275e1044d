"""surogate::swiglu_lora against its plain-torch reference (torch path, Triton under the interpreter, CUDA), opcheck,
and the gate/up LoRA op without B composed with it against eager LoRA + SwiGLU."""

import pytest
import torch
import torch.nn.functional as F
from lora_cases import deterministic, lora_grads, lora_inputs, rel, run_interpreted

import ops.fp8  # noqa: F401  (registers surogate::lora_linear_fp8)
import ops.low_rank_add  # noqa: F401  (registers surogate::low_rank_add)
from ops.lora_linear import lora_linear_reference, pack_frozen_weights, weight_with_tail
from ops.swiglu_lora import swiglu_lora, swiglu_lora_down, swiglu_lora_down_reference, swiglu_lora_reference

OP = torch.ops.surogate.swiglu_lora.default
LORA = torch.ops.surogate.lora_linear.default
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def swiglu_inputs(lead, inter, ranks, dtype=torch.float32, device="cpu", seed=0):
    """y [*lead, 2 inter], xa [N, r_g + r_u], B_g, B_u (nonzero) and the scalings, all on fresh random values."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in lead:
        n *= d
    y = torch.randn(*lead, 2 * inter, generator=g).to(device, dtype).requires_grad_()
    xa = torch.randn(n, sum(ranks), generator=g).to(device, dtype).requires_grad_()
    Bs = [(torch.randn(inter, r, generator=g) * 0.3).to(device, dtype).requires_grad_() for r in ranks]
    return y, xa, Bs, [1.5, 0.75]


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dh = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, dh)


@pytest.mark.parametrize("lead,inter,ranks", [((2, 7), 24, (4, 4)), ((33,), 40, (8, 3))])
def test_matches_reference_cpu(lead, inter, ranks):
    y, xa, Bs, s = swiglu_inputs(lead, inter, ranks)
    ref = swiglu_lora_reference(y, xa, Bs, s)
    out = swiglu_lora(y, xa, Bs, s)
    assert out.shape == (*lead, inter)
    assert rel(out, ref) < 1e-6
    for got, want in zip(grads(out, [y, xa, *Bs]), grads(ref, [y, xa, *Bs])):
        assert rel(got, want) < 1e-5


def test_opcheck():
    y, xa, Bs, s = swiglu_inputs((3, 5), 16, (4, 4))
    torch.library.opcheck(OP, (y, xa, Bs, s))


def test_wrong_widths_refused():
    y, xa, Bs, s = swiglu_inputs((4,), 16, (4, 4))
    with pytest.raises(ValueError, match=r"y \[\.\.\., 2I\]"):
        swiglu_lora(y[:, :30], xa, Bs, s)


_INTERPRETED = """
import torch
import ops.swiglu_lora as sl
from ops.swiglu_lora import swiglu_lora, swiglu_lora_down, swiglu_lora_down_reference, swiglu_lora_reference
torch.manual_seed(0)
# M not a multiple of the row tile, I not of the column tile, unequal ranks under 16 (padded), and in both kernels
# several row tiles per program (the backward's dB summed in registers across them; the last program's run past M);
# each case also with the down projection's A (swiglu_lora_down), of a rank under 16 in the second
sl._FWD_CONFIG, sl._BWD_CONFIG, sl._PROGRAMS = (16, 32, 4), (16, 32, 4), 8
sl._BWD_DOWN_CONFIG = (16, 32, 4)
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
# the wide tiles through TMA descriptors where y's up half starts 16-byte aligned (inter 200, 48), through pointers
# where it does not (inter 50: 200 bytes in)
from ops._launch import tile_sources
assert tile_sources([torch.empty(8, 400)[:, 200:]], (16, 32))[1]
assert not tile_sources([torch.empty(8, 100)[:, 50:]], (16, 32))[1]
assert not tile_sources([torch.empty(0, 64)], (16, 32))[1]  # TMA takes no empty tensor: pointers (nothing to load)
for m, inter, rg, ru, rd in [(150, 200, 8, 16, 16), (70, 48, 16, 16, 5), (40, 50, 8, 8, 4)]:
    y = torch.randn(m, 2 * inter, requires_grad=True)
    xa = torch.randn(m, rg + ru, requires_grad=True)
    Bs = [(torch.randn(inter, r) * 0.3).requires_grad_() for r in (rg, ru)]
    down_A = (torch.randn(rd, inter) / inter**0.5).requires_grad_()
    s = [1.5, 0.5]
    down_args = (y, xa, Bs, s, down_A)
    for inputs, ref, out in [
        ([y, xa, *Bs], swiglu_lora_reference(y, xa, Bs, s), swiglu_lora(y, xa, Bs, s)),
        ([y, xa, *Bs, down_A], swiglu_lora_down_reference(*down_args), swiglu_lora_down(*down_args)),
    ]:
        refs, outs = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
        ups = [torch.randn_like(r) for r in refs]
        want = torch.autograd.grad(refs, inputs, ups)
        got = torch.autograd.grad(outs, inputs, ups)
        for o, r in zip(outs, refs):
            assert torch.isfinite(o).all() and rel(o, r) < 1e-5, rel(o, r)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all() and rel(g, w) < 1e-5, rel(g, w)
    # xa in y's tail (a LoRA op with xa_tail=True): the gradient of [y | xa] is [dy | dxa]
    y_ext, xa0 = torch.cat([y.detach(), xa.detach()], 1).requires_grad_(), xa.detach()[:, :0]
    for op, extra in [(swiglu_lora, ()), (swiglu_lora_down, (down_A,))]:
        ref = op(y, xa, Bs, s, *extra)
        out = op(y_ext, xa0, Bs, s, *extra)
        refs, outs = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
        ups = [torch.randn_like(r) for r in refs]
        want = torch.autograd.grad(refs, [y, xa, *Bs], ups)
        got = torch.autograd.grad(outs, [y_ext, *Bs], ups)
        for o, r in zip(outs, refs):
            assert rel(o, r) < 1e-6, rel(o, r)
        for g, w in zip(got, [torch.cat(want[:2], 1), *want[2:]]):
            assert torch.isfinite(g).all() and rel(g, w) < 1e-6, rel(g, w)
print("ok")
"""


def test_triton_kernels_match_reference_interpreted():
    run_interpreted(_INTERPRETED)


def test_lora_op_without_b_then_swiglu_matches_eager():
    """The graph the fusion pass writes: the gate/up group with no B, then swiglu_lora, against eager LoRA + SwiGLU;
    every gradient (x, A_g, A_u, B_g, B_u)."""
    inter = 24
    x, ws, As, Bs = lora_inputs((2, 5), 16, (inter, inter), (4, 4))
    s = [2.0, 2.0]
    y_ref = lora_linear_reference(x, ws, None, As, Bs, s)
    g, u = y_ref.chunk(2, dim=-1)
    ref = F.silu(g) * u
    y, xa = LORA(x, ws, None, As, [], s, [])
    out = swiglu_lora(y, xa, Bs, s)
    assert rel(out, ref) < 1e-5
    for got, want in zip(lora_grads(out, x, As, Bs), lora_grads(ref, x, As, Bs)):
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_lora_op_with_xa_in_tail_then_swiglu_matches_eager(packed):
    """`xa_tail` (compile_passes/lora_xa_tail.py): the gate/up group returns [y | xa] and SwiGLU reads xa from y's
    tail. With the weights packed with spare rows the op runs one GEMM against [W; A] each way (checked), else the
    two GEMMs into one buffer; both against eager LoRA + SwiGLU, every gradient."""
    inter = 24
    x, ws, As, Bs = lora_inputs((2, 5), 16, (inter, inter), (4, 4))
    s = [2.0, 2.0]
    if packed:
        pack_frozen_weights(ws, spare_rows=8)
    g, u = lora_linear_reference(x, ws, None, As, Bs, s).chunk(2, dim=-1)
    ref = F.silu(g) * u
    assert (weight_with_tail(ws, torch.cat(As).detach()) is not None) == packed
    y, xa = LORA(x, ws, None, [torch.cat(As)], [], s, [], True)
    assert y.shape == (2, 5, 2 * inter + 8) and xa.shape == (10, 0)
    out = swiglu_lora(y, xa, Bs, s)
    assert rel(out, ref) < 1e-5
    for got, want in zip(lora_grads(out, x, As, Bs), lora_grads(ref, x, As, Bs)):
        assert rel(got, want) < 1e-5


def test_lora_op_without_b_opcheck():
    x, ws, As, _ = lora_inputs((3, 4), 16, (8, 8), (4, 4))
    torch.library.opcheck(LORA, (x, ws, None, As, [], [2.0, 2.0], []))


def test_bs_in_master_dtype_cpu():
    """The B's (and the down projection's A) in fp32 with bf16 activations (compile_passes/lora_master_dtype.py):
    cast on use, their gradients returned in fp32, xa's in bf16."""
    y, xa, Bs, s, down_A = down_inputs((2, 7), 24, (4, 4), 4, torch.bfloat16)
    masters = [t.detach().float().requires_grad_() for t in (*Bs, down_A)]
    fp32 = [t.detach().float().requires_grad_() for t in (y, xa, *Bs, down_A)]
    ref = swiglu_lora_down_reference(fp32[0], fp32[1], fp32[2:4], s, fp32[4])
    out = swiglu_lora_down(y, xa, masters[:2], s, masters[2])
    got = down_grads(out, [y, xa, *masters])
    assert [g.dtype for g in got] == [torch.bfloat16] * 2 + [torch.float32] * 3
    for o, r in zip(out, ref):
        assert rel(o, r) < 1e-2
    for g, w in zip(got, down_grads(ref, fp32)):
        assert rel(g, w) < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,inter,rank", [(4096, 1536, 16), (1000, 700, 8), (513, 3072, 32)])
@pytest.mark.parametrize("b_dtype", [torch.bfloat16, torch.float32])  # fp32: the masters (lora_master_dtype.py)
def test_cuda_bf16_matches_fp32_reference(m, inter, rank, b_dtype):
    y, xa, Bs, s = swiglu_inputs((m,), inter, (rank, rank), torch.bfloat16, "cuda")
    Bs = [b.detach().to(b_dtype).requires_grad_() for b in Bs]
    fp32 = [t.detach().float().requires_grad_() for t in (y, xa, *Bs)]
    ref = swiglu_lora_reference(fp32[0], fp32[1], fp32[2:], s)
    out = swiglu_lora(y, xa, Bs, s)
    assert rel(out, ref) < 1e-2
    for got, want in zip(grads(out, [y, xa, *Bs]), grads(ref, fp32)):
        assert rel(got, want) < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_opcheck_cuda():
    y, xa, Bs, s = swiglu_inputs((64,), 256, (16, 16), torch.bfloat16, "cuda")
    torch.library.opcheck(OP, (y, xa, Bs, s))
    with deterministic():  # fp32 masters
        torch.library.opcheck(OP, (y, xa, [b.detach().float().requires_grad_() for b in Bs], s))


@pytest.mark.gpu
@needs_cuda
def test_cuda_deterministic_mode_repeats_bit_for_bit():
    """The kernel's atomics make the last bits of dxa and dB vary run to run; deterministic mode avoids them."""
    y, xa, Bs, s = swiglu_inputs((4096,), 3072, (16, 16), torch.bfloat16, "cuda")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = (grads(swiglu_lora(y, xa, Bs, s), [y, xa, *Bs]) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- swiglu_lora_down: SwiGLU that also makes (and differentiates) the down projection's LoRA product ----


def down_inputs(lead, inter, ranks, rank_d, dtype=torch.float32, device="cpu", seed=0):
    y, xa, Bs, s = swiglu_inputs(lead, inter, ranks, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 7)
    down_A = (torch.randn(rank_d, inter, generator=g) / inter**0.5).to(device, dtype).requires_grad_()
    return y, xa, Bs, s, down_A


def down_grads(outs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, ups)


@pytest.mark.parametrize("lead,inter,ranks,rank_d", [((2, 7), 24, (4, 4), 4), ((33,), 40, (8, 3), 6)])
def test_down_matches_reference_cpu(lead, inter, ranks, rank_d):
    y, xa, Bs, s, down_A = down_inputs(lead, inter, ranks, rank_d)
    ref = swiglu_lora_down_reference(y, xa, Bs, s, down_A)
    out = swiglu_lora_down(y, xa, Bs, s, down_A)
    assert out[0].shape == (*lead, inter) and out[1].shape == (xa.shape[0], rank_d)
    for o, r in zip(out, ref):
        assert rel(o, r) < 1e-6
    inputs = [y, xa, *Bs, down_A]
    for got, want in zip(down_grads(out, inputs), down_grads(ref, inputs)):
        assert rel(got, want) < 1e-5


def test_down_opcheck():
    y, xa, Bs, s, down_A = down_inputs((3, 5), 16, (4, 4), 4)
    torch.library.opcheck(torch.ops.surogate.swiglu_lora_down.default, (y, xa, Bs, s, down_A))


@pytest.mark.parametrize("recipe_op", ["bf16", "fp8"])
def test_mlp_with_down_lora_in_swiglu_matches_eager(recipe_op):
    """The graph the fusion pass writes for a whole MLP: gate/up without B, swiglu_lora_down, the down projection's
    base alone (the recipe's op with no A and no B), then low_rank_add (+ s xa_down B_down^T); against eager LoRA,
    every gradient."""
    inter, hidden = 24, 16
    x, ws, As, Bs = lora_inputs((2, 5), hidden, (inter, inter), (4, 4))
    _, (w_d,), (a_d,), (b_d,) = lora_inputs((1,), inter, (hidden,), (4,), seed=3)
    s = [2.0, 2.0]
    g, u = lora_linear_reference(x, ws, None, As, Bs, s).chunk(2, dim=-1)
    ref = lora_linear_reference(F.silu(g) * u, [w_d], None, [a_d], [b_d], [2.0])
    y, xa = LORA(x, ws, None, As, [], s, [])
    h, xa_d = swiglu_lora_down(y, xa, Bs, s, a_d)
    if recipe_op == "bf16":
        base, xa_none = LORA(h, [w_d], None, [], [], [2.0], [])
    else:
        base, xa_none = torch.ops.surogate.lora_linear_fp8.default(h, [w_d], None, [], [], [2.0], [])
    assert xa_none.shape == (10, 0)
    out = torch.ops.surogate.low_rank_add.default(base, xa_d, b_d, 2.0)
    assert rel(out, ref) < (1e-5 if recipe_op == "bf16" else 6e-2)
    tol = 1e-5 if recipe_op == "bf16" else 6e-2
    for got, want in zip(lora_grads(out, x, [*As, a_d], [*Bs, b_d]), lora_grads(ref, x, [*As, a_d], [*Bs, b_d])):
        assert rel(got, want) < tol


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mat_dtype", [torch.bfloat16, torch.float32])  # fp32: the masters (lora_master_dtype.py)
def test_down_cuda_bf16_matches_fp32_reference(mat_dtype):
    y, xa, Bs, s, down_A = down_inputs((2048,), 1536, (16, 16), 16, torch.bfloat16, "cuda")
    mats = [t.detach().to(mat_dtype).requires_grad_() for t in (*Bs, down_A)]
    fp32 = [t.detach().float().requires_grad_() for t in (y, xa, *Bs, down_A)]
    ref = swiglu_lora_down_reference(fp32[0], fp32[1], fp32[2:4], s, fp32[4])
    out = swiglu_lora_down(y, xa, mats[:2], s, mats[2])
    for o, r in zip(out, ref):
        assert rel(o, r) < 1e-2
    got = down_grads(out, [y, xa, *mats])
    assert [g.dtype for g in got[2:]] == [mat_dtype] * 3
    for g, w in zip(got, down_grads(ref, fp32)):
        assert rel(g, w) < 2e-2
    with deterministic():
        torch.library.opcheck(torch.ops.surogate.swiglu_lora_down.default, (y, xa, mats[:2], s, mats[2]))
