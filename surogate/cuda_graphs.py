"""One CUDA graph for a whole micro-step: forward, loss and backward replayed with one launch.

Why: on small models the GPU finishes a kernel faster than Python can launch the next one. Qwen3-0.6B spends
~60 ms of GPU time per micro-step but ~100 ms of host time (benchmarks/NOTES.md: each custom-op call costs
~0.3-0.8 ms of Python dispatch, 4 per block, 28 blocks, forward and backward). Captured once, the micro-step
replays its ~3,000 kernels from the GPU's own queue and the host only copies the next batch in.

Per-block Inductor CUDA graphs (`mode="reduce-overhead"`) do not work here: regional compilation shares one
compiled graph among all blocks, and each replay overwrites the outputs the previous block handed on. So the graph
spans the whole step instead, captured with `torch.cuda.graph` as in PyTorch's whole-network capture recipe:

1. `warmup` micro-steps run normally on a side stream (torch.compile compiles, cuBLAS and Triton initialize,
   the FP8 weight cache fills, LoRA `.grad` tensors come into being).
2. The next micro-step is captured from static input buffers, then replayed.
3. Every later micro-step with the same shapes copies its batch into the buffers and replays. Gradient
   accumulation works because the captured step adds its gradients into the existing `.grad` tensors in place
   (one multi-tensor add, `accumulate_grads`): the optimizer must zero them in place
   (`zero_grad(set_to_none=False)`), never replace them.

Batches whose rows hold one document each come with `position_ids=None` (plain causal attention, no mask:
surogate/attention.py) and run another graph, warmed up and captured the same way; the two share one memory pool.

Requirements (all hold for surogate's model on one GPU, and on each rank of a data-parallel run with a replicated
base): static shapes (packed rows are always [B, sequence_len]; a batch of another shape runs eagerly), no host
synchronization inside the step (so the loss computes every row instead of gathering labelled rows:
`Qwen3ForCausalLM.select_loss_rows = False`), no collective communication inside the step. Data parallel with a
replicated base communicates only after the window (`surogate.distributed.reduce_gradients`: one all-reduce of the
accumulated gradients, outside the graph); a sharded base (FSDP2) all-gathers and reduce-scatters inside every
micro-step, so it runs without graphs. The graph keeps its activations in a private memory pool, so peak memory is
that of an eager step.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ops import compile_ahead

__all__ = ["GraphedMicroStep", "cuda_graphs_enabled"]

log = logging.getLogger(__name__)


def cuda_graphs_enabled(
    setting: str, device: torch.device, shard_base: bool = False, attn_backend: str = "flex"
) -> bool:
    """`cuda_graphs` auto|true|false -> whether to capture micro-steps (auto: on CUDA unless the frozen base is
    sharded across ranks, where FSDP communicates inside every micro-step, or the attention backend is varlen, whose
    mask reads each batch's document lengths on the host: a capture may not synchronize)."""
    if device.type != "cuda":
        why = "a CUDA device"
    elif shard_base:
        why = "a replicated base (shard_base_weights=false)"
    elif attn_backend == "varlen":
        why = "an attention backend without host syncs (attn_backend=flex or sdpa)"
    else:
        return setting != "false"
    if setting == "true":
        raise ValueError(f"cuda_graphs=true needs {why}; set cuda_graphs=auto or false")
    return False


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]  # static input buffers, refilled before each replay
    outputs: tuple[Tensor, Tensor]  # (loss_sum, n_tokens), overwritten by each replay


class GraphedMicroStep:
    """`step(ids, pos, labels) -> (loss_sum, n_tokens)` running forward + backward, from a CUDA graph once warm.

    The returned tensors are fresh copies (the graph's own outputs are overwritten by the next replay).
    """

    def __init__(self, model: nn.Module, warmup: int = 2) -> None:
        self.model, self.warmup = model, warmup
        # One graph per kind of batch: packed rows (position ids given, document mask) and rows of one document each
        # (position_ids None, plain causal attention: surogate/attention.py). They share one memory pool: a graph's
        # tensors are all freed by its end, and the two never replay at the same time.
        self.graphs: dict[bool, _Captured] = {}
        self.eager_steps: dict[bool, int] = {}
        self.pool = None
        self.replays = 0
        self.stream = torch.cuda.Stream()
        model.select_loss_rows = False  # no host sync inside the graph (see the module docstring)

    def __call__(self, ids: Tensor, pos: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor]:
        kind = pos is None
        batch = (ids, labels) if kind else (ids, labels, pos)
        if kind not in self.graphs and self.eager_steps.get(kind, 0) >= self.warmup:
            self._capture(kind, batch)
        g = self.graphs.get(kind)
        if g is not None and all(b.shape == s.shape for b, s in zip(batch, g.inputs)):
            for static, b in zip(g.inputs, batch):
                static.copy_(b, non_blocking=True)
            g.graph.replay()
            self.replays += 1
            return g.outputs[0].clone(), g.outputs[1].clone()
        return self._eager(kind, batch)

    def _forward_backward(self, ids: Tensor, labels: Tensor, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        loss_sum, n_tokens = self.model(ids, pos, labels)
        accumulate_grads(loss_sum, [p for p in self.model.parameters() if p.requires_grad])
        return loss_sum.detach(), n_tokens

    def _eager(self, kind: bool, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """A normal micro-step, on the side stream the graph is captured on (warm-up must happen there)."""
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = self._forward_backward(*batch)
        main.wait_stream(self.stream)
        for t in out:
            t.record_stream(main)
        self.eager_steps[kind] = self.eager_steps.get(kind, 0) + 1
        return out

    def _capture(self, kind: bool, batch: tuple[Tensor, ...]) -> None:
        inputs = tuple(b.clone() for b in batch)
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:  # the captured backward must add into existing gradients, not allocate new ones
            raise RuntimeError(f"CUDA graph capture needs the LoRA gradients to exist; {missing[0]} has none")
        # A compile-ahead worker loading a kernel's binary (ops/compile_ahead.py) is a CUDA call from another thread,
        # which a capture in global mode may not overlap: let the workers finish first (long done, in practice).
        compile_ahead.wait()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager warm-up's cached blocks: the graph's pool replaces them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            outputs = self._forward_backward(*inputs)
        self.pool = graph.pool()
        self.graphs[kind] = _Captured(graph, inputs, outputs)
        what = "rows of one document" if kind else "packed rows"
        log.info(
            "captured the micro-step as one CUDA graph (%s, input shapes %s)", what, [tuple(t.shape) for t in batch]
        )


def accumulate_grads(loss: Tensor, params: list[Tensor]) -> None:
    """`loss.backward()` for leaf parameters, with one multi-tensor add into the existing `.grad` tensors.

    Why: autograd accumulates each parameter's gradient with its own add kernel (`AccumulateGrad`); a LoRA model has
    14 trainable tensors per block, so Qwen3-8B paid ~500 adds of ~2 us per micro-step (~1 ms, ~4 ms per optimizer
    step). `autograd.grad` returns the gradients instead and `_foreach_add_` adds them in a few launches. Parameters
    without a `.grad` yet (the eager warm-up steps) take theirs as it is, as `backward()` would. Only for graphs
    without per-parameter gradient hooks: FSDP's are not in the graphed micro-step (surogate/distributed.py).
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    have = [(p.grad, g) for p, g in zip(params, grads) if g is not None and p.grad is not None]
    for p, g in zip(params, grads):
        if g is not None and p.grad is None:
            p.grad = g
    if have:
        torch._foreach_add_([a for a, _ in have], [g for _, g in have])
