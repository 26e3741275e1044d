"""Our torch.compile backend: run the LoRA passes on each Dynamo graph, then hand it to Inductor.

    block = torch.compile(block, backend=make_backend("bf16"))

Dynamo calls the backend with the pre-autograd, torch-level graph of the block (one per graph if there are
breaks). The passes rewrite linear+LoRA subgraphs into the recipe's op (`lora_rewrite.py`), merge ops that share
an input (`shared_input_fusion.py`), move the gate/up group's LoRA-B products into SwiGLU
(`swiglu_lora_fusion.py`) and the q/k/v group's into the q/k norm and RoPE (`qkv_rope_lora_fusion.py`); then
`compile_fx` (Inductor) traces autograd through the ops' registered formulas and compiles everything around them
(norms, residuals, dropout). The backend object keeps `stats` (rewrites per pass, summed over graphs) and, with
`keep_graphs=True`, the post-pass graphs, so tests and benchmarks can see exactly what was rewritten.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from compile_passes.down_lora_fusion import fuse_down_lora_into_swiglu
from compile_passes.keep_lora_xa import checkpoint_bodies, keep_lora_xa
from compile_passes.lora_a_concat import concat_lora_as
from compile_passes.lora_master_dtype import pass_lora_masters
from compile_passes.lora_rewrite import rewrite_lora_linears
from compile_passes.lora_xa_tail import put_xa_in_tail
from compile_passes.qkv_rope_lora_fusion import fuse_qkv_rope_lora
from compile_passes.registry import RecipeOps, recipe_ops
from compile_passes.residual_lora_fusion import fuse_residual_into_lora
from compile_passes.shared_input_fusion import fuse_shared_input_lora_linears
from compile_passes.swiglu_lora_fusion import fuse_swiglu_lora

_OWN_SOURCES = tuple(
    sorted(str(p) for d in ("ops", "compile_passes") for p in (Path(__file__).parents[1] / d).glob("*.py"))
)


class _OpsSourceKey(CustomGraphPass):
    """A no-op post-grad pass whose uuid is a hash of our ops' and passes' source files.

    Inductor's FX-graph and AOTAutograd caches key on the Dynamo graph, which names our custom ops but not the
    autograd formulas registered for them: after a change to an op's backward, a warm cache would replay graphs that
    call the old backward (seen on torch 2.13 when `lora_linear_backward` was renamed). Inductor folds a custom pass's
    uuid into its cache keys, so this pass ties every cached graph to the exact op code it was compiled against.
    """

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return get_hash_for_files(_OWN_SOURCES)


__all__ = ["PassStats", "SurogateBackend", "make_backend", "run_passes"]

log = logging.getLogger(__name__)


@dataclass
class PassStats:
    graphs_compiled: int = 0
    rewrites: Counter = field(default_factory=Counter)  # pass name -> subgraphs rewritten, summed over graphs
    graphs: list[fx.GraphModule] = field(default_factory=list)  # post-pass graphs (only with keep_graphs)


def run_passes(gm: fx.GraphModule, ops: RecipeOps) -> dict[str, int]:
    """Our passes, in order, on one Dynamo graph and every subgraph in it (in place). Returns rewrites per pass.

    Subgraphs: higher-order ops keep their bodies as child GraphModules. With `recompute=true` the whole block is
    such a body (Dynamo turns the activation checkpoint into `tag_activation_checkpoint(body, ...)`), so a pass that
    only walked the top graph would find nothing to rewrite and the block would run without our ops.
    """
    counts: Counter = Counter()
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            counts.update(_run_passes_on_graph(module, ops))
    for body in checkpoint_bodies(gm):  # what selective checkpointing may save (surogate/recompute.py)
        counts["keep_lora_xa"] += keep_lora_xa(body)
    return dict(counts)


def _run_passes_on_graph(gm: fx.GraphModule, ops: RecipeOps) -> dict[str, int]:
    counts = {"rewrite_lora_linears": rewrite_lora_linears(gm, ops.lora_linear)}
    if ops.fuse_shared_inputs:
        counts["fuse_shared_input_lora_linears"] = fuse_shared_input_lora_linears(gm, ops.lora_linear)
        counts["fuse_swiglu_lora"] = fuse_swiglu_lora(gm, ops.lora_linear)  # needs the fused gate/up group
        counts["fuse_down_lora_into_swiglu"] = fuse_down_lora_into_swiglu(gm, ops.lora_linear)  # needs SwiGLU-LoRA
        counts["fuse_qkv_rope_lora"] = fuse_qkv_rope_lora(gm, ops.lora_linear)  # needs the fused q/k/v group
        counts["fuse_residual_into_lora"] = fuse_residual_into_lora(gm, ops.lora_linear)  # after down_lora_fusion
        counts["concat_lora_as"] = concat_lora_as(gm, ops.lora_linear)  # after the B-removing fusions
        counts["put_xa_in_tail"] = put_xa_in_tail(gm, ops.lora_linear)  # needs one A per group
        counts["pass_lora_masters"] = pass_lora_masters(gm)  # on the epilogue ops the fusions wrote: last
    for graph_pass in ops.graph_passes:
        counts[graph_pass.__name__] = graph_pass(gm, ops)
    return counts


class SurogateBackend:
    def __init__(self, recipe: str | RecipeOps, passes: bool, keep_graphs: bool, inductor: bool):
        self.recipe = recipe
        # A name from the registry, or RecipeOps built for non-default options (e.g. fp8 with e4m3 gradients).
        # Unknown recipe: ValueError now, not at the first compile.
        self.ops = recipe if isinstance(recipe, RecipeOps) else recipe_ops(recipe)
        self.passes = passes
        self.keep_graphs = keep_graphs
        self.inductor = inductor
        self.stats = PassStats()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        if self.passes:
            counts = run_passes(gm, self.ops)
            self.stats.rewrites.update(counts)
            log.debug("surogate backend (%s): graph %d: %s", self.recipe, self.stats.graphs_compiled, counts)
        self.stats.graphs_compiled += 1
        if self.keep_graphs:
            self.stats.graphs.append(gm)
        if not self.inductor:
            return gm.forward  # eager execution of the rewritten graph (the ops' autograd still applies)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs), config_patches=_inductor_options(example_inputs))


def _inductor_options(example_inputs: Sequence[torch.Tensor]) -> dict:
    """Inductor config for one graph. On CUDA, `combo_kernels` launches independent small kernels of a graph as
    one (horizontal fusion): a block has ~14 LoRA parameters whose bf16 casts (forward) and fp32 casts (backward)
    are each a ~2 us kernel, 2,000+ per Qwen3-8B step. Measured on an H100: Qwen3-0.6B 97.1k -> 100.2k tokens/s,
    1.7B 56.2k -> 56.9k (benchmarks/NOTES.md). It is a Triton code generator feature, so CPU graphs go without."""
    options: dict = {"post_grad_custom_pre_pass": _OpsSourceKey()}
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        options["combo_kernels"] = True
    return options


def make_backend(
    recipe: str | RecipeOps = "bf16",
    passes: bool = True,
    *,
    keep_graphs: bool = False,
    inductor: bool = True,
) -> SurogateBackend:
    """A torch.compile backend running our passes for `recipe`, then Inductor.

    passes=False gives plain Inductor (the baseline to benchmark against); inductor=False runs the rewritten
    graph eagerly (fast to compile: for tests of the passes themselves); keep_graphs=True keeps the post-pass
    graphs in `backend.stats.graphs`.
    """
    return SurogateBackend(recipe, passes, keep_graphs, inductor)
