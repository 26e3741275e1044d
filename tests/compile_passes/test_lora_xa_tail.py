"""compile_passes/lora_xa_tail.py: which B-less groups hand their consumer [y | xa] as one tensor, which it leaves,
and that the rewritten graph computes what eager does. Whole compiled Qwen3 blocks, with the weights packed for the
one-GEMM path, are held to eager in test_backend.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny_block import MLP, assert_compiled_matches_eager, compiled_run
from torch import nn

from compile_passes import make_backend
from surogate.lora import LoRAConfig, apply_lora

LORA = torch.ops.surogate.lora_linear.default
SWIGLU = (torch.ops.surogate.swiglu_lora.default, torch.ops.surogate.swiglu_lora_down.default)


class GateUpReadTwice(nn.Module):
    """SwiGLU whose gate output is also read elsewhere: the gate/up group keeps its B (no consumer op to hand xa)."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.mlp.gate_proj(x)
        return self.mlp.down_proj(F.silu(g) * self.mlp.up_proj(x)) + g.sum(-1, keepdim=True)


def _with_lora(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    apply_lora(module, LoRAConfig(rank=4, alpha=8.0, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, p in module.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0.0, 0.3)
    return module


def test_gate_up_xa_in_tail_and_matches_eager():
    stats = assert_compiled_matches_eager(_with_lora(nn.Sequential(MLP(16, 24))), torch.randn(2, 5, 16))
    assert stats.rewrites["put_xa_in_tail"] == 1
    (gm,) = stats.graphs
    (group,) = [n for n in gm.graph.nodes if n.target is LORA and len(n.args) == 8]
    assert group.args[7] is True and len(group.args[1]) == 2
    (consumer,) = [n for n in gm.graph.nodes if n.target in SWIGLU]
    assert consumer.args[1].meta["example_value"].shape == (10, 0)  # xa comes in y's tail


def test_left_alone_when_y_is_read_elsewhere():
    module = _with_lora(GateUpReadTwice())
    x = torch.randn(2, 5, 16)
    out, stats = compiled_run(module, x)
    assert stats.rewrites["put_xa_in_tail"] == 0
    assert ((out - module(x)).norm() / module(x).norm()).item() < 1e-5


def test_left_alone_for_fp8():
    """The FP8 op would quantize A with W: its groups keep the separate `x A^T`."""
    module = _with_lora(nn.Sequential(MLP(16, 24)))
    backend = make_backend("fp8", keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True)(torch.randn(2, 5, 16))
    assert backend.stats.rewrites["fuse_swiglu_lora"] == 1 and backend.stats.rewrites["put_xa_in_tail"] == 0
