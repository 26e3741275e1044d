"""surogate::qkv_rope_lora against its plain-torch reference (torch path, Triton under the interpreter, CUDA), opcheck,
and the q/k/v LoRA op without B composed with it against eager LoRA + RMSNorm + RoPE."""

import pytest
import torch
from lora_cases import deterministic, lora_grads, lora_inputs, rel, run_interpreted

from ops.lora_linear import lora_linear_reference
from ops.qkv_rope_lora import qkv_rope_lora, qkv_rope_lora_reference

OP = torch.ops.surogate.qkv_rope_lora.default
LORA = torch.ops.surogate.lora_linear.default
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rope_cos_sin(batch, seq, head_dim, dtype, device, offset=0, half=False):
    """HF's cos/sin ([B, S, 1, D], rotate-half layout: equal halves), or with `half` the one half both share (the
    model's, [B, S, 1, D/2]); positions offset per row so rows differ."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    pos = torch.arange(seq).float()[None, :] + offset * torch.arange(batch).float()[:, None]
    freqs = pos[..., None] * inv_freq
    emb = (freqs if half else torch.cat((freqs, freqs), dim=-1))[:, :, None, :]
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def qkv_inputs(
    batch, seq, heads, kv_heads, head_dim, ranks, norm=True, dtype=torch.float32, device="cpu", seed=0, half=False
):
    """y [B, S, Nq + Nk + Nv], xa, B_q/B_k/B_v (nonzero), scalings, norm weights (not ones), cos, sin."""
    g = torch.Generator().manual_seed(seed)
    outs = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    y = torch.randn(batch, seq, sum(outs), generator=g).to(device, dtype).requires_grad_()
    xa = torch.randn(batch * seq, sum(ranks), generator=g).to(device, dtype).requires_grad_()
    Bs = [(torch.randn(o, r, generator=g) * 0.3).to(device, dtype).requires_grad_() for o, r in zip(outs, ranks)]
    ws = [(1 + 0.2 * torch.randn(head_dim, generator=g)).to(device, dtype) for _ in range(2)] if norm else []
    cos, sin = rope_cos_sin(batch, seq, head_dim, dtype, device, offset=3, half=half)
    return y, xa, Bs, [1.5, 0.75, 2.0], ws, cos, sin


def grads(outs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dos = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, dos)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("shape", [(2, 7, 4, 2, 16, (4, 4, 2)), (1, 9, 2, 1, 8, (3, 5, 4))])
def test_matches_reference_cpu(norm, shape, half):
    """Against the reference with HF's full cos/sin, also when the op gets the one half (the model's layout)."""
    *dims, ranks = shape
    y, xa, Bs, s, ws, cos, sin = qkv_inputs(*dims, ranks, norm=norm)
    head_dim = dims[4]
    ref = qkv_rope_lora_reference(y, xa, Bs, s, ws, cos, sin, head_dim, 1e-6)
    if half:
        cos, sin = rope_cos_sin(dims[0], dims[1], head_dim, torch.float32, "cpu", offset=3, half=True)
    out = qkv_rope_lora(y, xa, Bs, s, ws, cos, sin, head_dim, 1e-6)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and rel(o, r) < 1e-6
    for got, want in zip(grads(out, [y, xa, *Bs]), grads(ref, [y, xa, *Bs])):
        assert rel(got, want) < 1e-5


def test_opcheck():
    y, xa, Bs, s, ws, cos, sin = qkv_inputs(2, 3, 2, 1, 8, (4, 4, 4))
    torch.library.opcheck(OP, (y, xa, Bs, s, ws, cos, sin, 8, 1e-6))


def test_wrong_widths_refused():
    y, xa, Bs, s, ws, cos, sin = qkv_inputs(1, 4, 2, 1, 8, (4, 4, 4))
    with pytest.raises(ValueError, match="whole heads"):
        qkv_rope_lora(y, xa, Bs, s, ws, cos, sin, 6, 1e-6)
    with pytest.raises(ValueError, match="Nq \\+ Nk \\+ Nv"):
        qkv_rope_lora(y[..., :30], xa, Bs, s, ws, cos, sin, 8, 1e-6)
    with pytest.raises(ValueError, match="cos/sin"):
        qkv_rope_lora(y, xa, Bs, s, ws, cos[..., :3], sin[..., :3], 8, 1e-6)


_INTERPRETED = """
import sys
import torch
import ops.qkv_rope_lora as op
sys.path.insert(0, "tests/ops")
from test_qkv_rope_lora import qkv_inputs
# rows not a multiple of the row tile, ranks under 16 (padded), several row tiles per backward program (the last
# running past M), and output gradients in attention's [B, H, S, D] memory layout (strided rows: pointer tiles) as
# well as in [B, S, H, D] order (TMA descriptors)
op._FWD_CONFIG, op._BWD_CONFIG, op._BWD_ROW_TILES = (16, 4, 2), (16, 4, 2), (4, 2)
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
# cos/sin as HF's full rows and as the one half both halves share (the model's layout; reference from full rows)
for batch, seq, norm, ranks, half in [(2, 21, True, (8, 16, 4), True), (1, 37, False, (16, 16, 16), False)]:
    y, xa, Bs, s, ws, cos, sin = qkv_inputs(batch, seq, 4, 2, 32, ranks, norm=norm)
    ref = op.qkv_rope_lora_reference(y, xa, Bs, s, ws, cos, sin, 32, 1e-6)
    if half:
        cos, sin = qkv_inputs(batch, seq, 4, 2, 32, ranks, norm=norm, half=True)[5:]
    out = op.qkv_rope_lora(y, xa, Bs, s, ws, cos, sin, 32, 1e-6)
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all() and rel(o, r) < 1e-5, rel(o, r)
    dos_bshd = [torch.randn_like(o) for o in out]
    for dos in (dos_bshd, [d.transpose(1, 2).contiguous().transpose(1, 2) for d in dos_bshd]):
        want = torch.autograd.grad(ref, [y, xa, *Bs], dos, retain_graph=True)
        got = torch.autograd.grad(out, [y, xa, *Bs], dos, retain_graph=True)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all() and rel(g, w) < 1e-5, rel(g, w)
    # xa in y's tail (a LoRA op with xa_tail=True): the gradient of [y | xa] is [dy | dxa]
    y_ext = torch.cat([y.detach(), xa.detach().view(batch, seq, -1)], -1).requires_grad_()
    tail = op.qkv_rope_lora(y_ext, xa.detach()[:, :0], Bs, s, ws, cos, sin, 32, 1e-6)
    for o, r in zip(tail, out):
        assert rel(o, r) < 1e-6, rel(o, r)
    got_tail = torch.autograd.grad(tail, [y_ext, *Bs], dos)
    for g, w in zip(got_tail, [torch.cat([got[0], got[1].view(batch, seq, -1)], -1), *got[2:]]):
        assert torch.isfinite(g).all() and rel(g, w) < 1e-6, rel(g, w)
print("ok")
"""


def test_triton_kernels_match_reference_interpreted():
    run_interpreted(_INTERPRETED)


def test_lora_op_without_b_then_qkv_rope_lora_matches_eager():
    """The graph the fusion pass writes: the q/k/v group with no B, then qkv_rope_lora, against eager LoRA, the
    model's RMSNorm and apply_rope with the model's one-half cos/sin; every gradient (x, A_q/k/v, B_q/k/v)."""
    from surogate.models.qwen3 import RMSNorm, apply_rope

    batch, seq, heads, kv_heads, head_dim = 2, 5, 4, 2, 8
    outs = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    x, ws, As, Bs = lora_inputs((batch, seq), 16, outs, (4, 4, 4))
    s = [2.0, 2.0, 2.0]
    norms = [RMSNorm(head_dim, 1e-6) for _ in range(2)]
    for n in norms:
        n.weight.requires_grad_(False).mul_(1.3)
    cos, sin = rope_cos_sin(batch, seq, head_dim, torch.float32, "cpu", offset=2, half=True)
    y_ref = lora_linear_reference(x, ws, None, As, Bs, s)
    q, k, v = (t.view(batch, seq, -1, head_dim) for t in y_ref.split(outs, dim=-1))
    ref = apply_rope(norms[0](q), cos, sin), apply_rope(norms[1](k), cos, sin), v
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    for tail in (False, True):  # xa_tail: [y | xa] from the op, xa read from y's last columns (unpacked weights)
        y, xa = LORA(x, ws, None, [torch.cat(As)] if tail else As, [], s, [], tail)
        assert xa.shape == (batch * seq, 0 if tail else 12)
        out = qkv_rope_lora(y, xa, Bs, s, [n.weight for n in norms], cos, sin, head_dim, 1e-6)
        for o, r in zip(out, ref):
            assert rel(o, r) < 1e-5
        for got, want in zip(lora_grads(flat(out), x, As, Bs), lora_grads(flat(ref), x, As, Bs)):
            assert rel(got, want) < 1e-5


def test_bs_in_master_dtype_cpu():
    """The B's in fp32 with bf16 activations (compile_passes/lora_master_dtype.py): cast on use, their gradients
    (fp32 sums) returned in fp32, xa's in bf16."""
    y, xa, Bs, s, ws, cos, sin = qkv_inputs(2, 7, 4, 2, 16, (4, 4, 2), dtype=torch.bfloat16)
    masters = [b.detach().float().requires_grad_() for b in Bs]
    fp32 = [t.detach().float().requires_grad_() for t in (y, xa, *Bs)]
    ref = qkv_rope_lora_reference(fp32[0], fp32[1], fp32[2:], s, [w.float() for w in ws], cos.float(), sin.float(),
                                  16, 1e-6)  # fmt: skip
    out = qkv_rope_lora(y, xa, masters, s, ws, cos, sin, 16, 1e-6)
    got = grads(out, [y, xa, *masters])
    assert [g.dtype for g in got] == [torch.bfloat16] * 2 + [torch.float32] * 3
    for o, r in zip(out, ref):
        assert rel(o, r) < 1e-2
    for g, w in zip(got, grads(ref, fp32)):
        assert rel(g, w) < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(2, 2048, 32, 8, 128, 16, True, True), (1, 1000, 16, 8, 64, 8, False, False)])
@pytest.mark.parametrize("b_dtype", [torch.bfloat16, torch.float32])  # fp32: the masters (lora_master_dtype.py)
def test_cuda_bf16_matches_fp32_reference(shape, b_dtype):
    *dims, rank, norm, half = shape
    y, xa, Bs, s, ws, cos, sin = qkv_inputs(*dims, (rank,) * 3, norm, torch.bfloat16, "cuda", half=half)
    Bs = [b.detach().to(b_dtype).requires_grad_() for b in Bs]
    head_dim = dims[4]
    fp32 = [t.detach().float().requires_grad_() for t in (y, xa, *Bs)]
    ref = qkv_rope_lora_reference(fp32[0], fp32[1], fp32[2:], s, [w.float() for w in ws], cos.float(), sin.float(),
                                  head_dim, 1e-6)  # fmt: skip
    out = qkv_rope_lora(y, xa, Bs, s, ws, cos, sin, head_dim, 1e-6)
    for o, r in zip(out, ref):
        assert o.is_contiguous() and rel(o, r) < 1e-2
    for got, want in zip(grads(out, [y, xa, *Bs]), grads(ref, fp32)):
        assert rel(got, want) < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_opcheck_cuda():
    y, xa, Bs, s, ws, cos, sin = qkv_inputs(1, 64, 4, 2, 128, (16, 16, 16), True, torch.bfloat16, "cuda")
    torch.library.opcheck(OP, (y, xa, Bs, s, ws, cos, sin, 128, 1e-6))
    masters = [b.detach().float().requires_grad_() for b in Bs]  # compile_passes/lora_master_dtype.py
    with deterministic():
        torch.library.opcheck(OP, (y, xa, masters, s, ws, cos, sin, 128, 1e-6))


@pytest.mark.gpu
@needs_cuda
def test_cuda_deterministic_mode_repeats_bit_for_bit():
    """The kernel's atomics make the last bits of dxa and dB vary run to run; deterministic mode avoids them."""
    y, xa, Bs, s, ws, cos, sin = qkv_inputs(2, 1024, 16, 4, 128, (16, 16, 16), True, torch.bfloat16, "cuda")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = (grads(qkv_rope_lora(y, xa, Bs, s, ws, cos, sin, 128, 1e-6), [y, xa, *Bs]) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
