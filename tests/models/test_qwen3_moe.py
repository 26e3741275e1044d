"""Qwen3-MoE: logit parity with transformers' Qwen3MoeForCausalLM (CPU, fp32), the grouped expert path against a
loop over experts (forward and LoRA gradients), routing edge cases, checkpoint layouts and expert LoRA merge."""

import copy
import dataclasses
import gc
import json
import weakref

import pytest
import torch
import transformers
from safetensors.torch import save_file

from ops import grouped_mm as grouped_mm_mod
from surogate.distributed import base_weight_bytes
from surogate.export import merge_lora_, peft_state_dict
from surogate.lora import LoRAConfig, apply_lora
from surogate.models import PRESETS, load_model, save_hf_checkpoint
from surogate.models import moe as moe_mod
from surogate.models.moe import (
    GroupedExperts,
    SparseMoeBlock,
    grouped_mm,
    grouped_mm_masked,
    grouped_mm_reference,
    moe_reference,
)
from surogate.models.qwen3 import ModelArgs

TOL = 1e-4


def _hf_config(**extra):
    kw = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_theta=1e6,
    )
    return transformers.Qwen3MoeConfig(**{**kw, **extra})


def _hf_model(config):
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():  # norms start at one and the router at zero: perturb so mistakes show up
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)
    return hf


def _inputs(vocab, batch=2, seq=24):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.arange(seq).repeat(batch, 1)


def _assert_logits_match(model, hf, vocab):
    ids, pos = _inputs(vocab)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        out = model(ids, pos)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "extra",
    [{}, {"norm_topk_prob": False}, {"mlp_only_layers": [1]}, {"decoder_sparse_step": 2, "tie_word_embeddings": True}],
    ids=["norm-topk", "no-norm-topk", "mlp-only-layer", "sparse-step-2-tied"],
)
def test_logits_match_transformers(tmp_path, extra):
    hf = _hf_model(_hf_config(**extra))
    hf.save_pretrained(tmp_path)
    model, args = load_model(tmp_path, "cpu", dtype=torch.float32)
    assert args.num_experts == 8 and args.norm_topk_prob == extra.get("norm_topk_prob", True)
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers]
    assert sparse == [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers]
    assert any(sparse)
    _assert_logits_match(model, hf, args.vocab_size)


def test_checkpoint_layouts(tmp_path):
    """Per-expert keys split over shards (as save_pretrained writes them) and transformers 5's fused layout."""
    hf = _hf_model(_hf_config())
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in index
    shards_of_layer0 = {f for k, f in index.items() if k.startswith("model.layers.0.mlp.experts.")}
    assert len(shards_of_layer0) > 1  # experts of one layer span shards
    model, args = load_model(tmp_path / "sharded", "cpu", dtype=torch.float32)
    _assert_logits_match(model, hf, args.vocab_size)

    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    save_file(state, str(fused / "model.safetensors"), {"format": "pt"})
    (fused / "config.json").write_text(hf.config.to_json_string())
    model, args = load_model(fused, "cpu", dtype=torch.float32)
    _assert_logits_match(model, hf, args.vocab_size)


def test_missing_expert_is_reported(tmp_path):
    hf = _hf_model(_hf_config())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    gate_up = state.pop("model.layers.1.mlp.experts.gate_up_proj")
    gate, up = gate_up.chunk(2, dim=1)
    for j in range(7):  # expert 7 of layer 1's gate_proj is missing
        state[f"model.layers.1.mlp.experts.{j}.gate_proj.weight"] = gate[j].clone()
    for j in range(8):
        state[f"model.layers.1.mlp.experts.{j}.up_proj.weight"] = up[j].clone()
    save_file(state, str(tmp_path / "model.safetensors"), {"format": "pt"})
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    with pytest.raises(ValueError, match=r"1 missing.*layers\.1\.mlp\.experts\.gate_proj \(7/8 experts\)"):
        load_model(tmp_path, "cpu", dtype=torch.float32)


def test_save_hf_checkpoint_round_trip(tmp_path):
    args = ModelArgs.from_hf_config(_hf_config(mlp_only_layers=[0]).to_dict())
    model, _ = load_model(args, "cpu", dtype=torch.float32)
    save_hf_checkpoint(model, args, tmp_path)
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    _assert_logits_match(model, hf, args.vocab_size)
    again, _ = load_model(tmp_path, "cpu", dtype=torch.float32)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_from_hf_config_and_preset():
    cfg = _hf_config(mlp_only_layers=[2], norm_topk_prob=False).to_dict()
    args = ModelArgs.from_hf_config(cfg)
    assert (args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size) == (8, 2, 32)
    assert args.qk_norm and args.mlp_only_layers == (2,) and not args.norm_topk_prob
    assert ModelArgs.from_hf_config(transformers.Qwen3MoeConfig(**args.to_hf_config()).to_dict()) == args
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        dataclasses.replace(args, num_experts_per_tok=9)
    big = PRESETS["qwen3-30b-a3b"]
    with torch.device("meta"):
        from surogate.models.qwen3 import Qwen3ForCausalLM

        n = sum(p.numel() for p in Qwen3ForCausalLM(big).parameters())
    assert 30.4e9 < n < 30.6e9  # Qwen3-30B-A3B: 30.5B parameters
    assert base_weight_bytes(big, torch.bfloat16) == 2 * n  # what decides replicating vs sharding the base


# --- the grouped expert path against a loop over experts ---------------------------------------------------------


def _experts(E=6, hidden=32, inter=24, rank=4, seed=0):
    torch.manual_seed(seed)
    ex = GroupedExperts(E, hidden, inter)
    with torch.no_grad():
        for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
            p.normal_(std=0.2)
    ex.add_lora({"gate_proj", "up_proj", "down_proj"}, rank=rank, alpha=8)
    with torch.no_grad():
        for name, p in ex.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.2)
    return ex


def _routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    return moe_mod.route(logits, k, norm_topk_prob=True)


def _grads(ex, x, ids, w, fn):
    ex.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(ex, x, ids, w)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in ex.named_parameters() if p.requires_grad}


def _grouped(ex, x, ids, w):
    return ex(x, ids, w)


@pytest.mark.parametrize("force_fallback", [False, True], ids=["grouped_mm", "segment-loop"])
@pytest.mark.parametrize(
    "case", ["random", "empty-experts", "one-expert", "one-expert-k1"], ids=lambda c: c.replace("_", "-")
)
def test_grouped_matches_loop_reference(monkeypatch, force_fallback, case):
    if force_fallback:
        monkeypatch.setattr(grouped_mm_mod, "_grouped_mm_supported", lambda x, w: False)
    E, T = 6, 40
    ex = _experts(E)
    x = torch.randn(T, 32)
    k = 1 if case == "one-expert-k1" else 2
    w, ids = _routing(T, E, k)
    if case == "empty-experts":  # experts 0, 2, 3 and 5 get no token
        ids = torch.stack([torch.full((T,), 1), torch.full((T,), 4)], dim=1)[:, :k]
        ids[::3] = ids[::3].flip(-1)
    elif case.startswith("one-expert"):  # every slot routed to expert 3 (k=2: both slots of a token, as a stress)
        ids = torch.full((T, k), 3)
    y, gx, g = _grads(ex, x, ids, w, _grouped)
    y_ref, gx_ref, g_ref = _grads(ex, x, ids, w, moe_reference)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert set(g) == set(g_ref) == {f"{p}_lora.lora_{ab}" for p in ("gate_proj", "up_proj", "down_proj") for ab in "AB"}
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5)
    if case != "random":
        unused = sorted(set(range(E)) - set(ids.unique().tolist()))
        assert all(g[n][unused].abs().max() == 0 for n in g)  # no gradient into unrouted experts


def test_grouped_mm_matches_segment_loop():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, 16, generator=g), torch.randn(4, 8, 16, generator=g)
    offs = torch.tensor([0, 5, 5, 11], dtype=torch.int32)  # empty first and third groups
    torch.testing.assert_close(grouped_mm(x, w, offs), grouped_mm_reference(x, w, offs))
    torch.testing.assert_close(grouped_mm_reference(x, w, offs)[:5], x[:5] @ w[1].T)
    torch.testing.assert_close(grouped_mm_masked(x, w, offs), grouped_mm_reference(x, w, offs))
    short = torch.tensor([2, 2, 6, 9], dtype=torch.int32)  # rows 9 and 10 belong to no group: zero
    torch.testing.assert_close(grouped_mm_masked(x, w, short), grouped_mm_reference(x, w, short))
    # bf16 with a rank-4 operand (8-byte rows): torch._grouped_mm refuses it, the segment loop runs instead
    xb, a = x.bfloat16(), torch.randn(4, 4, 16, generator=g).bfloat16()
    torch.testing.assert_close(grouped_mm(xb, a, offs), grouped_mm_reference(xb, a, offs))


def test_grouped_mm_compiles_in_fp32():
    """_grouped_mm's meta kernel takes bf16 only: compiled fp32 must take the masked path, in one graph."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, 16, generator=g), torch.randn(4, 8, 16, generator=g)
    offs = torch.tensor([0, 5, 5, 11], dtype=torch.int32)
    compiled = torch.compile(grouped_mm, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, offs), grouped_mm_reference(x, w, offs))


def test_route_matches_transformers_router():
    cfg = _hf_config()
    torch.manual_seed(0)
    router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(cfg)
    router.weight.data.normal_()
    h = torch.randn(30, cfg.hidden_size)
    _, ref_w, ref_ids = router(h)
    w, ids = moe_mod.route(torch.nn.functional.linear(h, router.weight), cfg.num_experts_per_tok, True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)


# --- LoRA on a whole MoE model -----------------------------------------------------------------------------------


def test_lora_on_moe_model_and_merge(tmp_path):
    args = ModelArgs.from_hf_config(_hf_config(mlp_only_layers=[1]).to_dict())
    model, _ = load_model(args, "cpu", dtype=torch.float32)
    ids, pos = _inputs(args.vocab_size)
    with torch.no_grad():
        base = model(ids, pos)
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(wrapped) == 7 * args.num_layers
    assert "model.layers.0.mlp.experts.gate_proj" in wrapped and "model.layers.1.mlp.gate_proj" in wrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("mlp.gate.weight") or n.endswith("experts.down_proj") for n in trainable)
    assert "model.layers.0.mlp.experts.down_proj_lora.lora_A" in trainable
    block = model.model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock) and block.experts.up_proj_lora.lora_A.shape == (8, 4, 64)
    with torch.no_grad():
        assert torch.equal(model(ids, pos), base)  # B == 0: exactly the base model
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
        lora_out = model(ids, pos)
    assert (lora_out - base).abs().max().item() > 1e-3

    # Gradients reach every expert LoRA tensor of the routed experts and nothing frozen.
    labels = torch.roll(ids, -1, dims=1)
    loss, n = model(ids, pos, labels)
    (loss / n).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.model.layers[0].mlp.experts.gate_proj.grad is None

    with pytest.raises(ValueError, match="dense MLP layers"):  # PEFT would drop layer 1's MLP LoRA on load
        peft_state_dict(model)
    assert merge_lora_(model) == 7 * args.num_layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos), lora_out, rtol=1e-4, atol=1e-4)
    save_hf_checkpoint(model, args, tmp_path)  # merged: a plain checkpoint again


# --- expert stacks stored in FP8 / NF4 (qfp8, qnf4) ----------------------------------------------------------------

EXPERT = ("gate_proj", "up_proj", "down_proj")
# Relative error through the three quantized GEMMs of an expert (gate, up, down): each adds its format's rounding
# (~3% for e4m3, ~9% for NF4 on normal weights), so the composite allows about twice the single-GEMM tolerance.
QUANT_TOL = {"fp8": 6e-2, "nf4": 2e-1}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_quantized_experts_match_references(fmt):
    """Forward, dX and every expert LoRA gradient: exactly the loop over the dequantized experts, and within the
    format's tolerance of the unquantized (fp32) experts."""
    E, T = 6, 40
    ex = _experts(E, hidden=64, inter=64)
    dense = copy.deepcopy(ex)
    ex.quantize_(fmt)
    assert ex.weight_format == fmt and ex.gate_proj.dtype != torch.float32
    x = torch.randn(T, 64)
    w, ids = _routing(T, E, 2)
    y, gx, g = _grads(ex, x, ids, w, _grouped)
    y_ref, gx_ref, g_ref = _grads(ex, x, ids, w, moe_reference)  # moe_reference dequantizes the stored stacks
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert set(g) == set(g_ref) and len(g) == 6
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5)

    y32, gx32, g32 = _grads(dense, x, ids, w, _grouped)
    assert 1e-5 < _rel(y, y32) < QUANT_TOL[fmt]  # quantized, within the format's rounding
    assert _rel(gx, gx32) < QUANT_TOL[fmt]
    for name in g:
        assert _rel(g[name], g32[name]) < QUANT_TOL[fmt], name


@pytest.mark.parametrize("fmt,ratio", [("fp8", 0.5), ("nf4", 0.257)])
def test_quantized_experts_keep_only_the_quantized_bytes(fmt, ratio):
    ex = _experts(4, hidden=128, inter=64)
    ex.to(torch.bfloat16)
    dense_bytes = sum(getattr(ex, n).numel() * 2 for n in moe_mod.EXPERT_PROJS)
    old = weakref.ref(ex.up_proj)
    stored = ex.quantize_(fmt)
    gc.collect()
    assert old() is None  # the bf16 stack is gone, not merely unreferenced by the module
    base = [t for n, t in [*ex.named_parameters(), *ex.named_buffers()] if "_lora" not in n]
    assert sum(t.numel() * t.element_size() for t in base) == stored
    assert ratio < stored / dense_bytes < ratio + 0.04  # codes + fp32 row scales (4 bytes per 64-wide row here)
    assert not any(t.dtype == torch.bfloat16 for t in base)
    assert not any(p.requires_grad for p in base)
    assert {n for n, _ in ex.named_buffers()} >= {f"{p}_{'scale' if fmt == 'fp8' else 'absmax'}" for p in EXPERT}


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_merge_dequantizes_quantized_experts(fmt):
    ex = _experts(4, hidden=64, inter=64)
    ex.quantize_(fmt)
    x = torch.randn(20, 64)
    w, ids = _routing(20, 4, 2)
    with torch.no_grad():
        before = ex(x, ids, w)
        expected = {n: ex.dense_weight(n) for n in EXPERT}
        merged = merge_lora_(torch.nn.ModuleList([ex]))
        after = ex(x, ids, w)
    assert merged == 3 and ex.weight_format == "bf16" and ex.gate_proj.dtype == torch.float32
    assert ex.gate_proj_lora is None and not list(ex.buffers())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert (ex.gate_proj - expected["gate_proj"]).abs().max() > 0  # the LoRA update went into the weight


def _quantized_moe_model(args, recipe, compile):
    """The tiny MoE model, LoRA B nonzero, through `parallelize` as training runs it (last block unquantized)."""
    from surogate.config import recipe_precision
    from surogate.parallelize import parallelize

    torch.manual_seed(0)
    model, _ = load_model(args, "cpu", dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    precision = dataclasses.replace(recipe_precision(recipe), skip_quant_last_layers=1)
    return parallelize(model, recipe=recipe, precision=precision, compile=compile)


@pytest.mark.parametrize(
    "recipe,fmt,compile",
    [("qfp8", "fp8", False), ("qnf4", "nf4", False), ("fp8", "bf16", False), ("qfp8", "fp8", True)],
    ids=["qfp8", "qnf4", "fp8", "qfp8-compiled"],
)
def test_parallelize_quantizes_the_experts_of_quantized_blocks(recipe, fmt, compile):
    from ops import quantized_experts

    torch._dynamo.reset()
    args = ModelArgs.from_hf_config(_hf_config(moe_intermediate_size=64).to_dict())
    ids, pos = _inputs(args.vocab_size)
    labels = torch.roll(ids, -1, dims=1)
    model = _quantized_moe_model(args, recipe, compile)
    formats = [layer.mlp.experts.weight_format for layer in model.model.layers]
    assert formats == [fmt, fmt, "bf16"]  # the last block is left in bf16 by skip_quant_last_layers
    quantized_experts.stats.clear()
    loss, n = model(ids, pos, labels)
    (loss / n).backward()
    assert torch.isfinite(loss)
    assert quantized_experts.stats["experts_dequantized"] == (12 if fmt != "bf16" else 0)  # 2 blocks x 3 x (fwd, dX)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    if compile:  # the eager module is the reference (compiled: the attention GEMMs run in FP8 instead of emulated)
        with torch.no_grad():
            eager = _quantized_moe_model(args, recipe, compile=False)(ids, pos, labels)[0]
        torch.testing.assert_close(loss, eager, rtol=2e-2, atol=0)
