"""compile_passes/swiglu_lora_fusion.py: which SwiGLUs over a gate/up LoRA group it rewrites, which it leaves, and
that the rewritten graph computes what eager does (values and LoRA gradients). The Inductor-compiled block with the
rewrite is held to eager in test_backend.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_block import assert_compiled_matches_eager, compiled_run
from torch import nn

from surogate.lora import LoRALinear

SWIGLU = torch.ops.surogate.swiglu_lora.default
SWIGLU_DOWN = torch.ops.surogate.swiglu_lora_down.default
LOW_RANK_ADD = torch.ops.surogate.low_rank_add.default


class MLP(nn.Module):
    def __init__(self, variant: str = "plain", dropout: float = 0.0, inter: int = 24):
        super().__init__()
        self.variant = variant
        self.gate = LoRALinear(nn.Linear(16, inter, bias=False), 4, 8.0, dropout, torch.float32)
        self.up = LoRALinear(nn.Linear(16, inter, bias=False), 4, 8.0, dropout, torch.float32)
        self.down = LoRALinear(nn.Linear(inter, 16, bias=False), 4, 8.0, dropout, torch.float32)
        for m in (self.gate, self.up, self.down):
            nn.init.normal_(m.lora_B, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate(x), self.up(x)
        if self.variant == "swapped":
            return self.down(u * F.silu(g))
        if self.variant == "silu_reused":  # silu(g) read twice: fusing would have to write it anyway
            act = F.silu(g)
            return self.down(act * u) + act.sum(-1, keepdim=True)
        return self.down(F.silu(g) * u)


@pytest.mark.parametrize("variant", ["plain", "swapped"])
def test_rewritten_and_matches_eager(variant):
    torch.manual_seed(0)
    module = MLP(variant)
    stats = assert_compiled_matches_eager(module, torch.randn(2, 5, 16))
    assert stats.rewrites["fuse_swiglu_lora"] == 1
    assert stats.rewrites["fuse_down_lora_into_swiglu"] == 1  # the down projection has LoRA: down_lora_fusion.py
    (gm,) = stats.graphs
    assert [n.target for n in gm.graph.nodes if n.target in (SWIGLU, SWIGLU_DOWN)] == [SWIGLU_DOWN]
    assert [n.target for n in gm.graph.nodes if n.target is LOW_RANK_ADD] == [LOW_RANK_ADD]  # down's B product
    assert not [n for n in gm.graph.nodes if n.target is F.silu]
    (group,) = [n for n in gm.graph.nodes if n.target is torch.ops.surogate.lora_linear.default and len(n.args[1]) == 2]
    assert [a.target for a in group.args[3]] == [torch.cat]  # gate/up's A's concatenated in the graph


@pytest.mark.parametrize("variant,dropout", [("silu_reused", 0.0), ("plain", 0.1)])
def test_left_alone(variant, dropout):
    torch.manual_seed(0)
    module = MLP(variant, dropout)
    _, stats = compiled_run(module, torch.randn(2, 5, 16))
    assert stats.rewrites["fuse_swiglu_lora"] == 0
    assert not [n for n in stats.graphs[0].graph.nodes if n.target in (SWIGLU, SWIGLU_DOWN)]
