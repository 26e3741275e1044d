"""compile_passes/lora_master_dtype.py: the epilogue ops get the LoRA parameters (fp32 masters), not their bf16
casts, and only where every LoRA matrix of the call is such a cast. The compiled bf16 block with the rewrite is
held to eager (values and every LoRA gradient) in test_backend.py."""

from __future__ import annotations

import torch
from tiny_block import make_lora_block

from compile_passes import make_backend
from compile_passes.lora_master_dtype import pass_lora_masters

EPILOGUE_OPS = (torch.ops.surogate.swiglu_lora_down.default, torch.ops.surogate.low_rank_add.default)


def _graph(dtype: torch.dtype, lora_dtype: torch.dtype = torch.float32):
    block = make_lora_block(dtype, lora_dtype=lora_dtype)
    backend = make_backend("bf16", keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    torch.compile(block, backend=backend, fullgraph=True)(torch.randn(2, 6, 40, dtype=dtype))
    (gm,) = backend.stats.graphs
    return gm, backend.stats.rewrites


def _lora_matrices(gm):
    calls = [n for n in gm.graph.nodes if n.target in EPILOGUE_OPS]
    mats = []
    for n in calls:
        mats.extend(n.args[2] if isinstance(n.args[2], (list, tuple)) else [n.args[2]])
        if n.target is EPILOGUE_OPS[0]:
            mats.append(n.args[4])  # the down projection's A
    return calls, mats


def test_epilogue_ops_take_the_fp32_parameters():
    gm, rewrites = _graph(torch.bfloat16)
    calls, mats = _lora_matrices(gm)
    assert len(calls) == 3 and rewrites["pass_lora_masters"] == 3  # SwiGLU(+down A), o's and down's B products
    assert len(mats) == 5 and all(m.op == "placeholder" for m in mats)
    assert all(m.meta["example_value"].dtype == torch.float32 for m in mats)
    # the casts those ops read are gone; the recipe's LoRA op keeps its own (A goes into a bf16 GEMM)
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to" and "lora" in n.args[0].name]
    assert not [c for c in casts if c.args[0] in mats]
    assert all(u.target is torch.ops.surogate.lora_linear.default or u.target is torch.cat for c in casts
               for u in c.users)  # fmt: skip


class _LowRank(torch.nn.Module):
    def __init__(self, computed: bool):
        super().__init__()
        self.b = torch.nn.Parameter(torch.randn(24, 4))
        self.computed = computed

    def forward(self, y: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
        b = self.b * 2 if self.computed else self.b  # a computed B is no parameter: its cast must stay
        return torch.ops.surogate.low_rank_add(y, xa, b.to(y.dtype), 2.0)


def test_only_casts_of_graph_inputs_and_idempotent():
    y, xa = torch.randn(5, 24, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)
    for computed, expected in ((False, 1), (True, 0)):
        backend = make_backend("bf16", keep_graphs=True, inductor=False)
        torch._dynamo.reset()
        torch.compile(_LowRank(computed), backend=backend, fullgraph=True)(y, xa)
        assert backend.stats.rewrites["pass_lora_masters"] == expected
    gm, _ = _graph(torch.bfloat16)
    assert pass_lora_masters(gm) == 0  # a second run finds parameters, not casts
