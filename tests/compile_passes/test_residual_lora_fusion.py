"""compile_passes/residual_lora_fusion.py: which residual adds after a LoRA projection it folds into
`surogate::low_rank_add`, which it leaves, and that the rewritten graph computes what eager does (values and LoRA
gradients, the residual's gradient included). Whole compiled blocks are held to eager in test_backend.py."""

from __future__ import annotations

import pytest
import torch
from tiny_block import compiled_run, lora_grads
from torch import nn

from surogate.lora import LoRALinear

LOW_RANK_ADD = torch.ops.surogate.low_rank_add.default
LORA = torch.ops.surogate.lora_linear.default


class Residual(nn.Module):
    """x + proj(x) in the variants the pass must tell apart."""

    def __init__(self, variant: str = "plain", dropout: float = 0.0):
        super().__init__()
        self.variant = variant
        self.proj = LoRALinear(nn.Linear(16, 16, bias=False), 4, 8.0, dropout, torch.float32)
        nn.init.normal_(self.proj.lora_B, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.tanh(x)  # a residual that needs its own gradient
        y = self.proj(x)
        if self.variant == "swapped":
            return y + r
        if self.variant == "reused":  # the projection's output read again: it must be written anyway
            return (r + y) * y.sum(-1, keepdim=True)
        if self.variant == "broadcast":  # a residual of another shape
            return r[..., :1] + y
        return r + y


@pytest.mark.parametrize("variant", ["plain", "swapped"])
def test_folded_and_matches_eager(variant):
    torch.manual_seed(0)
    module = Residual(variant)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = module(x)
    (ref_dx,) = torch.autograd.grad(ref.square().sum(), x, retain_graph=True)
    ref.square().sum().backward()
    want = lora_grads(module)
    module.zero_grad()
    out, stats = compiled_run(module, x)
    (dx,) = torch.autograd.grad(out.square().sum(), x, retain_graph=True)
    out.square().sum().backward()
    assert stats.rewrites["fuse_residual_into_lora"] == 1
    (gm,) = stats.graphs
    (fused,) = [n for n in gm.graph.nodes if n.target is LOW_RANK_ADD]
    assert len(fused.args) == 5  # with the residual
    (call,) = [n for n in gm.graph.nodes if n.target is LORA]
    assert call.args[4] == []  # the projection runs without B
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.isfinite(dx).all() and ((dx - ref_dx).norm() / ref_dx.norm()).item() < 1e-5
    got = lora_grads(module)
    for name, g in want.items():
        assert torch.isfinite(got[name]).all()
        assert ((got[name] - g).norm() / g.norm()).item() < 1e-5, name


@pytest.mark.parametrize("variant", ["reused", "broadcast"])
def test_left_alone(variant):
    torch.manual_seed(0)
    module = Residual(variant)
    x = torch.randn(2, 5, 16)
    out, stats = compiled_run(module, x)
    assert stats.rewrites["fuse_residual_into_lora"] == 0
    assert not [n for n in stats.graphs[0].graph.nodes if n.target is LOW_RANK_ADD]
    ref = module(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_left_alone_with_lora_dropout():
    _, stats = compiled_run(Residual("plain", dropout=0.1).train(), torch.randn(2, 5, 16))
    assert stats.rewrites["rewrite_lora_linears"] == 1 and stats.rewrites["fuse_residual_into_lora"] == 0
