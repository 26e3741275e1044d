"""The passes on their own (no Inductor: fast): what they match, what they leave alone, exactness in eager."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from tiny_block import lora_grads, make_lora_block
from torch import fx, nn

from compile_passes import make_backend, recipe_ops, run_passes
from surogate.lora import LoRALinear

OP = torch.ops.surogate.lora_linear.default


def op_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]


def linear_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch._C._nn.linear, F.linear)]


def rewritten_graph(module: nn.Module, *inputs: torch.Tensor) -> tuple[fx.GraphModule, nn.Module]:
    """(the post-pass Dynamo graph, the compiled module running it eagerly)."""
    backend = make_backend("bf16", keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled(*inputs)
    (gm,) = backend.stats.graphs
    return gm, compiled


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return ((a - b).abs().max() / b.abs().max()).item()


class QKV(nn.Module):
    """Three projections of one input, as in attention; optional bias (attention_bias models)."""

    def __init__(self, bias: bool = False, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0, lora_dtype=None):
        super().__init__()
        lora_dtype = lora_dtype or torch.float32
        self.q = LoRALinear(nn.Linear(24, 32, bias=bias), rank, alpha, dropout, lora_dtype)
        self.k = LoRALinear(nn.Linear(24, 16, bias=bias), rank, alpha, dropout, lora_dtype)
        self.v = LoRALinear(nn.Linear(24, 16, bias=bias), rank, alpha, dropout, lora_dtype)
        for m in (self.q, self.k, self.v):
            nn.init.normal_(m.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        return q.sin() + self.k(x).sum(-1, keepdim=True) * self.v(x).mean(-1, keepdim=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(bias=True),
        dict(rank=8, alpha=8.0),  # scaling 1.0
        dict(dropout=0.1),
    ],
    ids=["plain", "bias", "scale1", "dropout"],
)
def test_qkv_becomes_one_op_and_matches_eager(kwargs):
    torch.manual_seed(0)
    module = QKV(**kwargs)
    x = torch.randn(3, 5, 24, requires_grad=True)
    gm, compiled = rewritten_graph(module, x)
    (call,) = op_calls(gm)
    assert len(call.args[1]) == 3 and not linear_calls(gm)
    assert (call.args[2] is not None) == kwargs.get("bias", False)
    assert len(call.args[6]) == (3 if kwargs.get("dropout") else 0)  # a dropped input per projection

    reference = copy.deepcopy(module)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y = compiled(x)
    torch.manual_seed(1)  # the dropout nodes stay in the graph, in eager order: same seed, same masks
    y_ref = reference(x_ref)
    assert rel_err(y, y_ref) <= 1e-5
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert rel_err(x.grad, x_ref.grad) <= 1e-5
    got, want = lora_grads(module), lora_grads(reference)
    assert got.keys() == want.keys() and all(rel_err(got[k], want[k]) <= 1e-5 for k in want)


def test_bf16_lora_same_dtype_as_activations():
    # LoRA dtype == activation dtype: the .to() casts are no-ops (Dynamo keeps them); the match must not care.
    torch.manual_seed(0)
    module = QKV(lora_dtype=torch.bfloat16).to(torch.bfloat16)
    x = torch.randn(2, 7, 24, dtype=torch.bfloat16)
    gm, compiled = rewritten_graph(module, x)
    assert len(op_calls(gm)) == 1 and not linear_calls(gm)
    assert rel_err(compiled(x).float(), module(x).float()) <= 2e-2


def test_eval_dropout_is_looked_through():
    torch.manual_seed(0)
    module = QKV(dropout=0.3).eval()
    x = torch.randn(2, 4, 24)
    gm, compiled = rewritten_graph(module, x)
    (call,) = op_calls(gm)
    assert call.args[6] == []  # no-op dropout folded: one shared LoRA-A GEMM
    assert not any(n.target is F.dropout for n in gm.graph.nodes)


def test_trainable_base_weight_is_not_rewritten():
    torch.manual_seed(0)
    module = QKV()
    module.k.weight.requires_grad_(True)  # the op never returns a weight gradient: must leave k alone
    gm, compiled = rewritten_graph(module, torch.randn(2, 4, 24))
    (call,) = op_calls(gm)
    assert len(call.args[1]) == 2 and len(linear_calls(gm)) == 3


class _InlineAllTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):  # inline Dropout/Identity too, like Dynamo
        return False


def test_get_attr_parameters():
    # Parameters as get_attr nodes (what symbolic tracing, or Dynamo without module inlining, produces).
    torch.manual_seed(0)
    module = QKV()
    gm = fx.GraphModule(module, _InlineAllTracer().trace(module))
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    counts = run_passes(gm, recipe_ops("bf16"))
    assert counts == {
        "rewrite_lora_linears": 3,
        "fuse_shared_input_lora_linears": 1,
        "fuse_swiglu_lora": 0,
        "fuse_down_lora_into_swiglu": 0,
        "fuse_qkv_rope_lora": 0,
        "fuse_residual_into_lora": 0,
        "concat_lora_as": 0,  # the fused q/k/v group keeps its B's
        "put_xa_in_tail": 0,
        "pass_lora_masters": 0,  # no epilogue op (no SwiGLU, no RoPE, no residual)
    }
    x = torch.randn(2, 3, 24)
    assert rel_err(gm(x), module(x)) <= 1e-5


def test_tiny_block_op_structure_and_stats():
    block = make_lora_block()
    backend = make_backend("bf16", keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    torch.compile(block, backend=backend, fullgraph=True)(torch.randn(2, 6, 40))
    (gm,) = backend.stats.graphs
    sizes = sorted(len(n.args[1]) for n in op_calls(gm))
    assert sizes == [1, 1, 2, 3]  # o, down; gate/up; q/k/v
    assert not linear_calls(gm)  # no leftover LoRA (or base) linear
    assert backend.stats.rewrites == {
        "rewrite_lora_linears": 7,
        "fuse_shared_input_lora_linears": 2,
        "fuse_swiglu_lora": 1,
        "fuse_down_lora_into_swiglu": 1,
        "fuse_qkv_rope_lora": 0,  # the tiny block has q/k norm but no RoPE: left alone
        "fuse_residual_into_lora": 2,  # o and down, each with the residual add after it
        "concat_lora_as": 1,  # gate/up, which runs without B
        "put_xa_in_tail": 1,  # gate/up: [y | xa] in one tensor for its SwiGLU op
        "pass_lora_masters": 3,  # SwiGLU's B's and A_down, o's and down's B products: the parameters, not casts
    }
    # the per-projection outputs come from one split of the fused output; xa is read only by the SwiGLU op of the
    # gate/up group, which runs without B (swiglu_lora_fusion.py); the down projection runs its base alone, its LoRA
    # made by that SwiGLU op (down_lora_fusion.py); o runs without B, its LoRA-B product added with the residual
    # (residual_lora_fusion.py)
    for n in op_calls(gm):
        xa_users = [u for u in n.users if u.args[1] == 1]
        assert all(u.target is operator.getitem for u in n.users)
        assert len(xa_users) == (1 if not n.args[4] and n.args[3] else 0)
    # gate/up's two A's arrive as one concatenated tensor (lora_a_concat.py), and its xa in y's tail (lora_xa_tail.py)
    assert sorted((len(n.args[3]), len(n.args[4])) for n in op_calls(gm)) == [(0, 0), (1, 0), (1, 0), (3, 3)]
    assert [len(n.args[1]) for n in op_calls(gm) if len(n.args) == 8 and n.args[7]] == [2]
    low_rank_adds = [n for n in gm.graph.nodes if n.target is torch.ops.surogate.low_rank_add.default]
    assert len(low_rank_adds) == 2 and all(len(n.args) == 5 for n in low_rank_adds)  # each with its residual


def test_passes_off_leaves_graph_alone():
    backend = make_backend("bf16", passes=False, keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    torch.compile(make_lora_block(), backend=backend)(torch.randn(1, 3, 40))
    assert not op_calls(backend.stats.graphs[0]) and len(linear_calls(backend.stats.graphs[0])) == 21


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'fp9'"):
        make_backend("fp9")
