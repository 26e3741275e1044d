"""compile_passes/qkv_rope_lora_fusion.py: which q/k/v groups it rewrites (Qwen3 with its q/k norm, Llama without),
which it leaves, and that the rewritten graph computes what eager does (values and LoRA gradients). The
Inductor-compiled Qwen3 blocks with the rewrite are held to eager in test_backend.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_block import lora_grads

from compile_passes import make_backend
from surogate.lora import LoRAConfig, apply_lora
from surogate.models.presets import PRESETS
from surogate.models.qwen3 import Attention, rope_cos_sin, rope_inv_freq

FUSED = torch.ops.surogate.qkv_rope_lora.default


def lora_attention(qk_norm: bool = True, dropout: float = 0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    args = dataclasses.replace(
        PRESETS["tiny"], hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=qk_norm
    )
    torch.manual_seed(0)
    attn = Attention(args, "sdpa")
    apply_lora(attn, LoRAConfig(rank=4, alpha=8.0, dropout=dropout, target_modules=list(targets)))
    for name, p in attn.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0.0, 0.3)
    for norm in (attn.q_norm, attn.k_norm) if qk_norm else ():
        norm.weight.data.normal_(1.0, 0.2)
    return attn, args


def run(attn, args, compiled: bool):
    torch.manual_seed(1)
    x = torch.randn(2, 6, args.hidden_size)
    position_ids = torch.arange(6).repeat(2, 1) + torch.tensor([[0], [3]])
    cos, sin = rope_cos_sin(position_ids, rope_inv_freq(args), x.dtype)
    backend = make_backend("bf16", keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    fn = torch.compile(attn, backend=backend, fullgraph=True) if compiled else attn
    out = fn(x, cos, sin, None)
    out.square().sum().backward()
    grads = lora_grads(attn)
    attn.zero_grad()
    return out, grads, backend.stats


@pytest.mark.parametrize("qk_norm", [True, False])
def test_rewritten_and_matches_eager(qk_norm):
    attn, args = lora_attention(qk_norm)
    ref, want, _ = run(attn, args, compiled=False)
    out, got, stats = run(attn, args, compiled=True)
    assert stats.rewrites["fuse_qkv_rope_lora"] == 1
    (gm,) = stats.graphs
    (fused,) = [n for n in gm.graph.nodes if n.target is FUSED]
    assert len(fused.args[4]) == (2 if qk_norm else 0)  # the q/k norm weights
    # the q/k/v group now runs without B, so its three A's arrive as one concatenated tensor (lora_a_concat.py)
    assert stats.rewrites["concat_lora_as"] == 1
    (group,) = [n for n in gm.graph.nodes if n.target is torch.ops.surogate.lora_linear.default and len(n.args[1]) == 3]
    (a,) = group.args[3]
    assert a.target is torch.cat and len(a.args[0]) == 3
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("chunk", "pow")]
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    assert got.keys() == want.keys() and len(want) == 8
    for name, g in want.items():
        assert torch.isfinite(got[name]).all()
        assert ((got[name] - g).norm() / g.norm()).item() < 1e-5, name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dropout": 0.1},  # each projection's A reads its own dropped input
        {"targets": ("q_proj", "v_proj", "o_proj")},  # no q/k/v group of three
    ],
)
def test_left_alone(kwargs):
    attn, args = lora_attention(**kwargs)
    _, _, stats = run(attn, args, compiled=True)
    assert stats.rewrites["fuse_qkv_rope_lora"] == 0
    assert not [n for n in stats.graphs[0].graph.nodes if n.target is FUSED]


def test_trainable_norm_left_alone():
    attn, args = lora_attention()
    attn.q_norm.weight.requires_grad_(True)  # the op computes no norm-weight gradient
    _, _, stats = run(attn, args, compiled=True)
    assert stats.rewrites["fuse_qkv_rope_lora"] == 0
