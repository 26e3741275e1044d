"""A small self-contained Qwen3-like decoder block for pass tests (the real model lives in surogate/models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compile_passes import make_backend  # (also registers our ops)
from surogate.lora import LoRAConfig, apply_lora


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyBlock(nn.Module):
    def __init__(self, hidden: int = 40, inter: int = 72, heads: int = 4, kv_heads: int = 2, head_dim: int = 12):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads, kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = MLP(hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


def make_lora_block(
    dtype: torch.dtype = torch.float32, dropout: float = 0.0, seed: int = 0, rank: int = 4, lora_dtype=torch.float32
) -> TinyBlock:
    """A TinyBlock with LoRA on all seven projections and B randomised (PEFT init is B = 0, which hides bugs)."""
    torch.manual_seed(seed)
    block = TinyBlock()
    for p in block.parameters():  # nn.init leaves norms at exactly 1: randomise them too
        p.data.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)
    block.to(dtype)
    apply_lora(block, LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=dropout, dtype=lora_dtype))
    for name, p in block.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0.0, 0.2)
    return block


def lora_grads(block: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in block.named_parameters() if p.requires_grad}


def compiled_run(module: nn.Module, *inputs: torch.Tensor):
    """`module(*inputs)` compiled with the bf16 recipe's passes (no Inductor), and the backend's stats (graphs kept)."""
    backend = make_backend("bf16", keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, fullgraph=True)(*inputs)
    return out, backend.stats


def assert_compiled_matches_eager(module: nn.Module, x: torch.Tensor, tol: float = 1e-5):
    """Eager, then compiled (`compiled_run`): output and every LoRA gradient of `out.square().sum()` within `tol`
    (relative, NaN refused). Returns the backend's stats for the test's own checks of the rewritten graph."""
    ref = module(x)
    ref.square().sum().backward()
    want = lora_grads(module)
    module.zero_grad()
    out, stats = compiled_run(module, x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and ((out - ref).norm() / ref.norm()).item() < tol
    got = lora_grads(module)
    for name, g in want.items():
        assert torch.isfinite(got[name]).all() and ((got[name] - g).norm() / g.norm()).item() < tol, name
    return stats
