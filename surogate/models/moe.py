"""Qwen3-MoE sparse MLP: a top-k router over stacked experts, run as grouped GEMMs.

The block replaces the dense SwiGLU MLP in `Qwen3Block` when `ModelArgs.num_experts > 0` (attention, norms and the
residual stream are the dense model's). For T tokens, E experts and k experts per token:

1. Router (`mlp.gate`, a plain frozen `nn.Linear` [E, hidden]): logits -> softmax in fp32 -> top-k -> optionally
   renormalize the k probabilities to sum to one (`norm_topk_prob`) -> cast back to the activation dtype. Exactly
   Hugging Face's `Qwen3MoeTopKRouter`, so logits match transformers.
2. Permute: the T*k (token, expert) slots are sorted by expert id (`torch.sort(stable=True)`), token rows are gathered
   into that order, and the group boundaries are `offs[e]` = end row of expert e, computed on the device with
   `searchsorted` (no `.item()`/`.tolist()`: routing never waits for the host, and empty experts are simply groups
   of zero rows).
3. Experts: SwiGLU with stacked weights `gate_proj`/`up_proj` [E, inter, hidden] and `down_proj` [E, hidden, inter],
   each applied as one grouped GEMM over the permuted rows (`grouped_mm`). Expert LoRA (`ExpertLoRA`: A [E, r, in],
   B [E, out, r]) is two more grouped GEMMs on the same rows and offsets.
4. Unpermute: scale each slot by its routing weight, `index_copy` the rows back to slot order, sum the k slots of a
   token.

`grouped_mm` uses `torch._grouped_mm` where it runs (CUDA sm90+ in bf16 with 16-byte aligned rows, and the CPU in
torch >= 2.9, forward and backward; under torch.compile bf16 only), else `grouped_mm_reference`, a loop over experts'
row segments that needs the group sizes on the host. Under torch.compile or CUDA-graph capture (surogate/cuda_graphs.py)
nothing may wait for the host, so the fallback there is `grouped_mm_masked`: every expert on every row, masked, E
times the FLOPs (for CPU fp32 tests and LoRA ranks that break the 16-byte alignment). The reference is the eager
numerical baseline; tests hold the grouped path against it and against a plain loop over experts (`moe_reference`).

Module paths follow Hugging Face's Qwen3-MoE (`mlp.gate.weight`, `mlp.experts.*`); the experts' stacked tensors are
`mlp.experts.{gate,up,down}_proj` (no `.weight`), which `checkpoint.py` stacks from the per-expert keys
`mlp.experts.{j}.{gate,up,down}_proj.weight` that `save_pretrained` writes, or splits from transformers 5's
in-memory fused `mlp.experts.gate_up_proj` [E, 2 * inter, hidden] (gate rows first).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from surogate.models.qwen3 import ModelArgs

__all__ = [
    "EXPERT_PROJS",
    "ExpertLoRA",
    "GroupedExperts",
    "SparseMoeBlock",
    "grouped_mm",
    "grouped_mm_masked",
    "grouped_mm_reference",
    "moe_reference",
    "route",
]

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return (
            False  # its meta kernel (shape inference under torch.compile) accepts bf16 only, though CPU eager runs fp32
        )
    if x.device.type == "cpu":
        return True
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    # Row strides of both operands must be multiples of 16 bytes (e.g. LoRA rank >= 8 in bf16).
    return (w.shape[-1] * 2) % 16 == 0 and (w.shape[-2] * 2) % 16 == 0


def grouped_mm_reference(
    x: torch.Tensor,  # (rows, in), sorted by group
    w: torch.Tensor,  # (groups, out, in)
    offs: torch.Tensor,  # (groups,) int32, end row of each group
) -> torch.Tensor:
    """`x[rows of group g] @ w[g].T` for every group, as a loop over segments (reads the group sizes on the host)."""
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    sizes.append(x.shape[0] - int(offs[-1]))  # rows past the last group (none in this module) come out zero
    segments = x.split(sizes)
    parts = [F.linear(seg, w[g]) for g, seg in enumerate(segments[:-1])]
    parts.append(x.new_zeros(sizes[-1], w.shape[-2]))
    return torch.cat(parts)


def grouped_mm_masked(
    x: torch.Tensor,  # (rows, in), sorted by group
    w: torch.Tensor,  # (groups, out, in)
    offs: torch.Tensor,  # (groups,) int32, end row of each group
) -> torch.Tensor:
    """`grouped_mm_reference` without reading the group sizes on the host, so it traces into one graph: every group's
    weight is applied to all rows and each row keeps its own group's result (groups times the FLOPs). The fallback
    under torch.compile, where the segment loop's `.tolist()` would break the graph."""
    rows = torch.arange(x.shape[0], device=x.device, dtype=offs.dtype)
    group = torch.searchsorted(offs, rows, right=True)[:, None]  # (rows, 1); rows past the last group match none
    out = x.new_zeros(x.shape[0], w.shape[-2])
    for g in range(w.shape[0]):
        out = torch.where(group == g, F.linear(x, w[g]), out)
    return out


def grouped_mm(
    x: torch.Tensor,  # (rows, in), sorted by group
    w: torch.Tensor,  # (groups, out, in)
    offs: torch.Tensor,  # (groups,) int32, end row of each group
) -> torch.Tensor:  # (rows, out)
    """One GEMM per group of rows, each with its own weight: `torch._grouped_mm` where supported, else the loop
    (the masked form when compiling or capturing a CUDA graph: neither may wait for the host)."""
    if _grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return grouped_mm_masked(x, w, offs)
    return grouped_mm_reference(x, w, offs)


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (tokens, E) -> (weights (tokens, k) in the logits' dtype, expert ids (tokens, k) int64)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


class ExpertLoRA(nn.Module):
    """Per-expert LoRA of one stacked projection: A (E, r, in), B (E, out, r); update = scaling * B[e] @ A[e] @ x."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        lora_dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.rank = num_experts, in_features, out_features, rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, device=device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, rank, device=device, dtype=lora_dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.lora_A.device.type != "meta":
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # LoRALinear's init per expert: kaiming_uniform_(a=sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in)); B zero.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def forward(
        self,
        x: torch.Tensor,  # (rows, in), sorted by expert
        offs: torch.Tensor,  # (E,) int32
    ) -> torch.Tensor:  # (rows, out)
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return self.scaling * grouped_mm(grouped_mm(self.dropout(x), a, offs), b, offs)

    def extra_repr(self) -> str:
        return f"experts={self.lora_A.shape[0]}, in={self.in_features}, out={self.out_features}, rank={self.rank}"


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; `forward` permutes token rows into expert order and back."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gate_proj_lora: ExpertLoRA | None = None
        self.up_proj_lora: ExpertLoRA | None = None
        self.down_proj_lora: ExpertLoRA | None = None

    def add_lora(
        self, targets: set[str], rank: int, alpha: float, dropout: float = 0.0, lora_dtype=torch.float32
    ) -> list[str]:
        """Attach an `ExpertLoRA` to each projection named in `targets`; freezes the base weights."""
        added = []
        for name in EXPERT_PROJS:
            w = getattr(self, name)
            w.requires_grad_(False)
            if name in targets:
                E, out, inp = w.shape
                setattr(self, f"{name}_lora", ExpertLoRA(E, inp, out, rank, alpha, dropout, lora_dtype, w.device))
                added.append(name)
        return added

    def _proj(self, name: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        y = grouped_mm(x, getattr(self, name), offs)
        lora = getattr(self, f"{name}_lora")
        return y if lora is None else y + lora(x, offs)

    def forward(
        self,
        x: torch.Tensor,  # (tokens, hidden)
        experts: torch.Tensor,  # (tokens, k) int64 expert ids
        weights: torch.Tensor,  # (tokens, k) routing weights, x's dtype
    ) -> torch.Tensor:  # (tokens, hidden)
        T, k = experts.shape
        sorted_ids, order = torch.sort(experts.reshape(-1), stable=True)  # slot order -> expert order
        ids = torch.arange(self.num_experts, device=x.device, dtype=sorted_ids.dtype)
        offs = torch.searchsorted(sorted_ids, ids, right=True).to(torch.int32)  # (E,) end row per expert
        xs = x[order // k]  # (T * k, hidden), grouped by expert
        h = F.silu(self._proj("gate_proj", xs, offs)) * self._proj("up_proj", xs, offs)
        ys = self._proj("down_proj", h, offs) * weights.reshape(-1)[order, None]
        out = ys.new_zeros(T * k, ys.shape[-1]).index_copy(0, order, ys)  # back to slot order
        return out.view(T, k, -1).sum(dim=1)


class SparseMoeBlock(nn.Module):
    """Qwen3-MoE MLP: router `gate` + `experts` (Hugging Face's `Qwen3MoeSparseMoeBlock` paths)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = GroupedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, hidden) -> (B, S, hidden)
        h = x.reshape(-1, x.shape[-1])
        weights, experts = route(self.gate(h), self.top_k, self.norm_topk_prob)
        return self.experts(h, experts, weights).view(x.shape)


def moe_reference(
    experts: GroupedExperts,
    x: torch.Tensor,  # (tokens, hidden)
    expert_ids: torch.Tensor,  # (tokens, k)
    weights: torch.Tensor,  # (tokens, k)
) -> torch.Tensor:
    """Loop over experts with boolean masks, no permutation (the shape of transformers' eager experts)."""

    def proj(name: str, rows: torch.Tensor, e: int) -> torch.Tensor:
        y = F.linear(rows, getattr(experts, name)[e])
        lora = getattr(experts, f"{name}_lora")
        if lora is not None:
            a, b = lora.lora_A[e].to(rows.dtype), lora.lora_B[e].to(rows.dtype)
            y = y + lora.scaling * F.linear(F.linear(lora.dropout(rows), a), b)
        return y

    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = torch.where(expert_ids == e)
        rows = x[token]
        y = proj("down_proj", F.silu(proj("gate_proj", rows, e)) * proj("up_proj", rows, e), e)
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out
