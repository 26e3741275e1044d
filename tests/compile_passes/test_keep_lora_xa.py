"""compile_passes/keep_lora_xa.py: inside checkpointed blocks (only there), the o and down projections'
`low_rank_add` read xa through `surogate::keep`; the rewritten graph computes what eager does."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_lora import random_batch, tiny_lora_model
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from compile_passes import make_backend
from compile_passes.keep_lora_xa import checkpoint_bodies

KEEP = torch.ops.surogate.keep.default
LOW_RANK_ADD = torch.ops.surogate.low_rank_add.default


def _calls(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_keep_only_inside_checkpointed_blocks(checkpointed):
    model, args = tiny_lora_model(2)
    reference = copy.deepcopy(model)
    backend = make_backend("bf16", keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    for i, layer in enumerate(model.model.layers):
        block = checkpoint_wrapper(layer) if checkpointed else layer
        model.model.layers[i] = torch.compile(block, backend=backend, fullgraph=True)
    ids, pos, labels = random_batch(args)
    loss, ref = model(ids, pos, labels)[0], reference(ids, pos, labels)[0]
    loss.backward()
    ref.backward()
    assert abs((loss - ref) / ref).item() < 1e-6
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()) if p.requires_grad]
    assert all(((g - w).norm() / w.norm()).item() < 1e-5 for g, w in grads)

    bodies = [b for gm in backend.stats.graphs for b in checkpoint_bodies(gm)]
    assert len(bodies) == (len(backend.stats.graphs) if checkpointed else 0)
    assert backend.stats.rewrites["keep_lora_xa"] == (2 * len(bodies))  # o's and down's low_rank_add, per block
    for gm in backend.stats.graphs:
        for graph in (gm, *checkpoint_bodies(gm)):
            adds = _calls(graph, LOW_RANK_ADD)
            inside = graph is not gm
            assert len(_calls(graph, KEEP)) == (len(adds) if inside else 0)
            # every low_rank_add in a body reads xa through keep, whose input is the producer's xa
            assert all((a.args[1].target is KEEP) == inside for a in adds)
