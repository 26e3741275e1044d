"""surogate::lora_linear against its plain-torch reference: forward, every gradient, dtypes, opcheck."""

from __future__ import annotations

import pytest
import torch

from ops.lora_linear import (
    clear_frozen_concat_cache,
    frozen_concat,
    lora_linear_reference,
    pack_frozen_weights,
)

OP = torch.ops.surogate.lora_linear.default
BWD = torch.ops.surogate.lora_linear_grad.default
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (leading dims, in_features, out_features per projection, rank per projection): odd sizes on purpose
SHAPES = [
    ((3, 5), 33, [19], [3]),
    ((1, 17), 70, [130, 65, 65], [8, 8, 8]),
    ((2, 64), 128, [64, 32], [4, 4]),
    ((37,), 48, [24, 200], [2, 6]),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def make_inputs(lead, d_in, outs, ranks, dtype, device="cpu", dropout=0.0, seed=0, lora_dtype=None):
    """Fresh random inputs; B random (not PEFT's zeros) so every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    lora_dtype = lora_dtype or dtype
    x = rand(*lead, d_in).requires_grad_()
    weights = [rand(o, d_in, scale=d_in**-0.5) for o in outs]
    lora_As = [rand(r, d_in, scale=d_in**-0.5, dt=lora_dtype).requires_grad_() for r in ranks]
    lora_Bs = [rand(o, r, scale=r**-0.5, dt=lora_dtype).requires_grad_() for o, r in zip(outs, ranks)]
    scalings = [2.0 * (i + 1) / len(outs) for i in range(len(outs))]
    lora_inputs = []
    if dropout > 0:  # a fixed mask per projection: the op is deterministic, dropout lives outside it
        for _ in outs:
            keep = (torch.rand(*lead, d_in, generator=g) >= dropout).to(device)
            lora_inputs.append((x.detach() * keep / (1 - dropout)).requires_grad_())
    return x, weights, lora_As, lora_Bs, scalings, lora_inputs


def grads_of(y, tensors, grad):
    return torch.autograd.grad(y, tensors, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}")
def test_matches_reference(shape, dropout, dtype, device="cpu"):
    x, weights, As, Bs, scalings, lora_inputs = make_inputs(*shape, dtype, device=device, dropout=dropout)
    y, xa = OP(x, weights, None, As, Bs, scalings, lora_inputs)
    assert y.shape == (*shape[0], sum(shape[2])) and y.dtype == dtype
    assert xa.shape == (x.numel() // x.shape[-1], sum(shape[3])) and not xa.requires_grad
    # Reference in fp32 from the same (possibly bf16) inputs: the op may only differ by its own rounding.
    up = [[t.detach().float().requires_grad_() for t in ts] for ts in ([x], As, Bs, lora_inputs)]
    y_ref = lora_linear_reference(up[0][0], [w.float() for w in weights], None, up[1], up[2], scalings, up[3])
    assert rel_err(y, y_ref) <= TOL[dtype]

    grad = torch.randn_like(y)
    got = grads_of(y, [x, *As, *Bs, *lora_inputs], grad)
    want = grads_of(y_ref, [t for ts in up for t in ts], grad.float())
    for g, w, t in zip(got, want, [x, *As, *Bs, *lora_inputs]):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert rel_err(g, w) <= TOL[dtype]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_group_one_scale_packed_weights(dropout):
    # The common configuration: one LoRA scale for the group (GEMM alpha path) and weights packed back to back
    # (frozen_concat is a view), with an unusual leading shape (reshape/view path).
    x, weights, As, Bs, _, lora_inputs = make_inputs(
        (2, 3, 4), 40, [24, 8, 8], [4, 4, 4], torch.float32, dropout=dropout
    )
    pack_frozen_weights(weights)
    scalings = [0.5] * 3
    y, _ = OP(x, weights, None, As, Bs, scalings, lora_inputs)
    y_ref = lora_linear_reference(x, weights, None, As, Bs, scalings, lora_inputs)
    assert rel_err(y, y_ref) <= 1e-5
    grad = torch.randn_like(y)
    leaves = [x, *As, *Bs, *lora_inputs]
    for g, w in zip(grads_of(y, leaves, grad), grads_of(y_ref, leaves, grad)):
        assert rel_err(g, w) <= 1e-5


def test_grads_in_lora_dtype_given():
    # fp32 A/B with fp32 x, bf16 A/B with bf16 x: dA/dB come back in the dtype the op was given.
    for dtype in (torch.float32, torch.bfloat16):
        x, weights, As, Bs, scalings, _ = make_inputs((4, 3), 40, [24, 8], [4, 4], dtype)
        y, _ = OP(x, weights, None, As, Bs, scalings, [])
        grads = torch.autograd.grad(y.sum(), [*As, *Bs])
        assert all(g.dtype == dtype for g in grads)


def test_bias_and_frozen_input():
    # Bias over the concatenated output, and x not requiring grad (first block: no dX GEMM is run).
    x, weights, As, Bs, scalings, _ = make_inputs((2, 7), 24, [16, 8], [2, 2], torch.float32)
    x = x.detach()
    bias = torch.randn(24)
    y, _ = OP(x, weights, bias, As, Bs, scalings, [])
    y_ref = lora_linear_reference(x, weights, bias, As, Bs, scalings)
    assert rel_err(y, y_ref) <= 1e-5
    grad = torch.randn_like(y)
    for g, w in zip(grads_of(y, [*As, *Bs], grad), grads_of(y_ref, [*As, *Bs], grad)):
        assert rel_err(g, w) <= 1e-5


def test_frozen_weight_refused():
    x, weights, As, Bs, scalings, _ = make_inputs((2, 3), 16, [8], [2], torch.float32)
    weights[0].requires_grad_()
    with pytest.raises(RuntimeError, match="never computes a base weight"):
        OP(x, weights, None, As, Bs, scalings, [])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("n_proj", [1, 3])
def test_opcheck(n_proj, dropout):
    shape = ((2, 5), 24, [16, 8, 8][:n_proj], [2, 3, 2][:n_proj])
    x, weights, As, Bs, scalings, lora_inputs = make_inputs(*shape, torch.float32, dropout=dropout)
    torch.library.opcheck(OP, (x, weights, None, As, Bs, scalings, lora_inputs))
    y, xa = OP(x, weights, None, As, Bs, scalings, lora_inputs)
    grad_y = torch.randn_like(y)
    saved = [x.detach()] if not lora_inputs else [t.detach() for t in lora_inputs]
    for needs_grad_x in (True, False):
        args = (grad_y, saved, xa, weights, [a.detach() for a in As], [b.detach() for b in Bs], scalings)
        torch.library.opcheck(BWD, (*args, not lora_inputs, needs_grad_x))


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_xa_tail(packed):
    """[y | xa] in one output (the q/k/v group's shapes), with and without the weights packed with room for A; the
    backward op with [dy | dxa]."""
    from ops.lora_linear import pack_frozen_weights

    x, weights, As, _, scalings, _ = make_inputs((2, 5), 24, [16, 8, 8], [7, 7, 7], torch.float32)
    if packed:
        pack_frozen_weights(weights, spare_rows=21)
    a = torch.cat(As).detach().requires_grad_()
    torch.library.opcheck(OP, (x, weights, None, [a], [], scalings, [], True))
    y, xa = OP(x, weights, None, [a], [], scalings, [], True)
    assert y.shape == (2, 5, 32 + 21) and xa.shape == (10, 0)
    grad_y = torch.randn_like(y)
    args = (grad_y, [x.detach()], xa.detach(), weights, [a.detach()], [], scalings, True, True, True)
    torch.library.opcheck(BWD, args)


def test_xa_tail_backward_after_another_forward_of_the_group():
    """The backward reuses the A its forward copied next to the weights, unless another forward of the same group
    copied a different A since: then it copies its own again (the gradients stay those of its own A)."""
    from ops.lora_linear import pack_frozen_weights, stats

    x, weights, As, _, scalings, _ = make_inputs((2, 5), 24, [16, 8, 8], [4, 4, 4], torch.float32)
    pack_frozen_weights(weights, spare_rows=12)
    a1, a2 = torch.cat(As).detach(), torch.randn(12, 24) / 24**0.5
    y_ref = torch.cat([x @ w.t() for w in weights] + [x @ a1.t()], dim=-1)
    g = torch.randn_like(y_ref)
    (want,) = torch.autograd.grad(y_ref, x, g)
    copies = stats["weight_tail_copies"]
    y1, _ = OP(x, weights, None, [a1], [], scalings, [], True)
    (alone,) = torch.autograd.grad(y1, x, g)
    assert stats["weight_tail_copies"] - copies == 1  # its backward reused the forward's copy
    y1, _ = OP(x, weights, None, [a1], [], scalings, [], True)
    OP(x, weights, None, [a2], [], scalings, [], True)  # overwrites the rows with a2
    (after_other,) = torch.autograd.grad(y1, x, g)
    assert stats["weight_tail_copies"] - copies == 4  # two forwards, and a1 copied back for the backward
    assert rel_err(y1, y_ref) < 1e-6 and rel_err(alone, want) < 1e-6 and rel_err(after_other, want) < 1e-6


def test_dropout_statistics_through_eager_dropout():
    # p > 0 with a real dropout in front: E[y] over masks equals the p = 0 output (inverted dropout is unbiased).
    torch.manual_seed(0)
    x, weights, As, Bs, scalings, _ = make_inputs((64,), 32, [16], [4], torch.float32)
    x = x.detach()
    y0, _ = OP(x, weights, None, As, Bs, scalings, [])
    ys = torch.stack(
        [OP(x, weights, None, As, Bs, scalings, [torch.nn.functional.dropout(x, 0.25)])[0] for _ in range(200)]
    )
    base = torch.nn.functional.linear(x, weights[0])
    lora0 = y0 - base
    assert rel_err(ys.mean(0) - base, lora0) < 0.15
    assert (ys.std(0) > 0).all()  # masks differ between calls


def test_frozen_concat_is_cached_and_invalidated():
    clear_frozen_concat_cache()
    ws = [torch.randn(8, 16), torch.randn(4, 16)]
    first = frozen_concat(ws)
    assert torch.equal(first, torch.cat(ws)) and frozen_concat(ws) is first  # built once
    ws[1].add_(1.0)  # in-place change bumps the version counter: must not return the stale copy
    second = frozen_concat(ws)
    assert second is not first and torch.equal(second, torch.cat(ws))


def test_pack_frozen_weights_makes_concat_free():
    params = [torch.nn.Parameter(torch.randn(o, 16), requires_grad=False) for o in (8, 4, 4)]
    before = [p.detach().clone() for p in params]
    packed = pack_frozen_weights(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert frozen_concat(params).data_ptr() == packed.data_ptr()


def test_frozen_concat_zero_copy_for_adjacent_weights():
    packed = torch.randn(12, 16)
    ws = [packed[:8], packed[8:]]
    fused = frozen_concat(ws)
    assert fused.data_ptr() == packed.data_ptr() and torch.equal(fused, packed)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matches_reference_cuda_bf16(shape, dropout):
    test_matches_reference(shape, dropout, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_opcheck_cuda():
    x, weights, As, Bs, scalings, _ = make_inputs((2, 64), 256, [128, 64, 64], [16] * 3, torch.bfloat16, "cuda")
    torch.library.opcheck(OP, (x, weights, None, As, Bs, scalings, []))
