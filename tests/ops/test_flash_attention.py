"""ops.flash_attention: FlashAttention-4's causal kernels as custom ops (GPU: against the fp32 reference, compiled
and CUDA-graph-captured, and in the model against cuDNN), and how the causal kernel is chosen (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from ops import flash_attention
from ops.flash_attention import available, flash_causal_attention, reference
from surogate.attention import resolve_causal_kernel

needs_flash4 = pytest.mark.skipif(
    not (torch.cuda.is_available() and available("cuda", 128)), reason="needs flash-attn-4 and a Hopper GPU"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_causal_kernel_choice():
    assert not available("cpu", 128)
    assert resolve_causal_kernel("cudnn", "cpu", 128) == "cudnn"  # CPU tensors take SDPA whatever the name
    assert resolve_causal_kernel("auto", "cpu", 128) == "cudnn"  # flash4 only where it can run
    with pytest.raises(ValueError, match="flash-attn-4"):
        resolve_causal_kernel("flash4", "cpu", 128)
    with pytest.raises(ValueError, match="one of auto, cudnn, flash4"):
        resolve_causal_kernel("flash5", "cpu", 128)


@pytest.mark.skipif(flash_attention.installed(), reason="checks the case without the package")
def test_background_compile_needs_the_package():
    flash_attention.compile_in_background(2, 2048, 32, 8, 128)
    assert not flash_attention._background


@pytest.mark.gpu
@needs_flash4
def test_auto_picks_flash4_in_one_process_only(monkeypatch):
    assert resolve_causal_kernel("auto", "cuda", 128) == "flash4"
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: a slower first step for a small gain (surogate/attention.py)
    assert resolve_causal_kernel("auto", "cuda", 128) == "cudnn"
    assert resolve_causal_kernel("flash4", "cuda", 128) == "flash4"  # asked for by name, it runs


@pytest.mark.gpu
@needs_flash4
def test_background_compile_fills_the_disk_cache(tmp_path, monkeypatch):
    """The separate process compiles the layout's forward and backward kernels into the cache directory it is given
    (the training process then loads them instead of compiling)."""
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(tmp_path))
    flash_attention.compile_in_background(1, 384, 4, 2, 64)
    layout = flash_attention._layout((1, 384, 4, 64), (1, 384, 2, 64), torch.bfloat16)
    assert flash_attention._wait_for_background(layout) == 0
    assert len(list(tmp_path.rglob("*.o"))) >= 2
    assert flash_attention._wait_for_background(layout) is None  # waited for once


def test_reference_is_causal_attention_with_shared_kv_heads():
    g = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D = 2, 7, 4, 2, 8
    q, k, v = (
        torch.randn(B, S, Hq, D, generator=g),
        torch.randn(B, S, Hkv, D, generator=g),
        torch.randn(B, S, Hkv, D, generator=g),
    )
    want = torch.empty(B, S, Hq, D)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for h in range(Hq):
        kv = h // (Hq // Hkv)  # consecutive q heads share a kv head (Hugging Face's repeat_kv)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)
        want[:, :, h] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, kv]
    torch.testing.assert_close(reference(q, k, v), want, rtol=1e-5, atol=1e-6)


def _qkv(B, S, Hq, Hkv, D, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    return [
        torch.randn(B, S, h, D, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for h in (Hq, Hkv, Hkv)
    ]


def _grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.gpu
@needs_flash4
@pytest.mark.parametrize(
    "shape", [(2, 1000, 32, 8, 128), (1, 2048, 40, 8, 128), (2, 777, 4, 2, 64), (1, 300, 8, 8, 96)]
)
def test_forward_and_gradients_match_reference(shape):
    q, k, v = _qkv(*shape)
    dout = torch.randn_like(q)
    got = _grads(flash_causal_attention, q, k, v, dout)
    want = _grads(reference, *(t.detach().float().requires_grad_() for t in (q, k, v)), dout.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))


@pytest.mark.gpu
@needs_flash4
def test_compiled_and_graph_captured_match_eager():
    q, k, v = _qkv(2, 512, 8, 2, 128, seed=1)
    dout = torch.randn_like(q)
    eager = _grads(flash_causal_attention, q, k, v, dout)
    compiled = torch.compile(flash_causal_attention, fullgraph=True)
    for a, b in zip(_grads(compiled, q, k, v, dout), eager):
        assert _rel(a, b) < 1e-3
    # replayed from a CUDA graph (as training's micro-steps are), on inputs copied in after the capture
    qs, ks, vs = (torch.randn_like(t).detach() for t in (q, k, v))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            flash_causal_attention(qs, ks, vs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_causal_attention(qs, ks, vs)
    for dst, src in zip((qs, ks, vs), (q, k, v)):
        dst.copy_(src.detach())
    graph.replay()
    assert _rel(out, eager[0]) < 1e-3


@pytest.mark.gpu
@needs_flash4
def test_opcheck():
    q, k, v = _qkv(1, 256, 4, 2, 64, seed=2)
    torch.library.opcheck(
        torch.ops.surogate.flash_causal_fwd.default,
        (q, k, v),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.gpu
@needs_flash4
def test_model_with_flash4_matches_cudnn():
    from surogate.lora import LoRAConfig, apply_lora
    from surogate.models.checkpoint import load_model

    results = []
    for kernel in ("cudnn", "flash4"):
        torch.manual_seed(0)
        model, args = load_model("tiny", device="cuda", dtype=torch.bfloat16)
        assert model.set_causal_kernel(kernel) == kernel
        apply_lora(model, LoRAConfig(rank=8, alpha=16, dtype=torch.float32))
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.02)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, args.vocab_size, (2, 257), generator=g).cuda()
        loss_sum, n = model(ids[:, :-1], None, ids[:, 1:])
        loss_sum.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss_sum.detach() / n, grads))
    (loss_c, grads_c), (loss_f, grads_f) = results
    assert torch.isfinite(loss_f) and _rel(loss_f, loss_c) < 1e-3
    for name, g in grads_f.items():
        assert torch.isfinite(g).all() and _rel(g, grads_c[name]) < 2e-2, name
