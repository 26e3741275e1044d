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

`grouped_mm` (ops/grouped_mm.py) uses `torch._grouped_mm` where it runs and a loop over experts' row segments (or,
under torch.compile and CUDA-graph capture, a masked form) elsewhere. The segment loop is the eager numerical
baseline; tests hold the grouped path against it and against a plain loop over experts (`moe_reference`).

Quantized storage (recipes qfp8, qnf4): `quantize_` replaces a projection's bf16 stack by its stored FP8 or NF4 form
(ops/quantized_experts.py) and frees the bf16 tensor; the projection then runs `surogate::quantized_grouped_mm`, which
dequantizes the stack right before its grouped GEMM, forward and backward, and never keeps the dense copy. The
stored codes keep the projection's name (`mlp.experts.gate_proj`), their scales are buffers beside them
(`gate_proj_scale`; NF4: `gate_proj_absmax`, `..._absmax_factor`, `..._absmax_mean`).

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

from ops.grouped_mm import grouped_mm, grouped_mm_masked, grouped_mm_reference

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
    """E SwiGLU experts with stacked weights; `forward` permutes token rows into expert order and back.

    `weight_format` is "bf16" (the stacks as loaded, any float dtype) or, after `quantize_`, "fp8" / "nf4".
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gate_proj_lora: ExpertLoRA | None = None
        self.up_proj_lora: ExpertLoRA | None = None
        self.down_proj_lora: ExpertLoRA | None = None
        self.weight_format = "bf16"
        self.dense_dtype: torch.dtype | None = None  # the stacks' dtype before quantization (merge restores it)

    def add_lora(
        self, targets: set[str], rank: int, alpha: float, dropout: float = 0.0, lora_dtype=torch.float32
    ) -> list[str]:
        """Attach an `ExpertLoRA` to each projection named in `targets`; freezes the base weights."""
        added = []
        for name in EXPERT_PROJS:
            w = getattr(self, name)
            w.requires_grad_(False)
            if name in targets:
                E, out, inp = self.proj_shape(name)
                setattr(self, f"{name}_lora", ExpertLoRA(E, inp, out, rank, alpha, dropout, lora_dtype, w.device))
                added.append(name)
        return added

    def proj_shape(self, name: str) -> tuple[int, int, int]:
        """(E, out, in) of one projection, whatever its storage."""
        E, out, inp = getattr(self, name).shape
        return E, out, inp * 2 if self.weight_format == "nf4" else inp

    def stored(self, name: str) -> list[torch.Tensor]:
        """One quantized projection's stored tensors, in the order `surogate::quantized_grouped_mm` takes them."""
        from ops.quantized_experts import FORMATS

        return [getattr(self, name + suffix) for suffix in FORMATS[self.weight_format]]

    def dense_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A projection's stack [E, out, in] as dense weights (dequantized when stored quantized, in `dtype` or the
        dtype it had before quantization): what the reference loops and the merge read."""
        if self.weight_format == "bf16":
            w = getattr(self, name)
            return w if dtype is None else w.to(dtype)
        from ops.quantized_experts import dequantize_experts_reference

        return dequantize_experts_reference(self.stored(name), self.weight_format, dtype or self.dense_dtype)

    @torch.no_grad()
    def quantize_(self, fmt: str) -> int:
        """Store the three stacks in `fmt` ("fp8" or "nf4"), one stack at a time, releasing each bf16 stack before
        the next is quantized (the peak is one stack's bf16 + its temporaries). Returns the bytes now stored."""
        from ops.quantized_experts import FORMATS, quantize_experts

        if self.weight_format != "bf16":
            raise ValueError(f"expert weights are already stored as {self.weight_format}")
        self.dense_dtype = self.gate_proj.dtype
        nbytes = 0
        for name in EXPERT_PROJS:
            stored = quantize_experts(getattr(self, name), fmt)
            setattr(self, name, None)  # drop the bf16 stack before the next projection is quantized
            for suffix, t in zip(FORMATS[fmt], stored):
                if suffix:
                    self.register_buffer(name + suffix, t)
                else:  # the codes stay a frozen parameter under the projection's name: FSDP shards them
                    setattr(self, name, nn.Parameter(t, requires_grad=False))
            nbytes += sum(t.numel() * t.element_size() for t in stored)
        self.weight_format = fmt
        return nbytes

    @torch.no_grad()
    def dequantize_(self, dtype: torch.dtype | None = None) -> None:
        """Back to dense stacks (in `dtype`, default the dtype before quantization), e.g. before a merge."""
        from ops.quantized_experts import FORMATS

        if self.weight_format == "bf16":
            return
        for name in EXPERT_PROJS:
            dense = self.dense_weight(name, dtype)
            for suffix in FORMATS[self.weight_format][1:]:
                delattr(self, name + suffix)
            setattr(self, name, nn.Parameter(dense, requires_grad=False))
        self.weight_format = "bf16"

    def _base(self, name: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if self.weight_format == "bf16":
            return grouped_mm(x, getattr(self, name), offs)
        # the OpOverload itself, so every Dynamo version records one node
        return torch.ops.surogate.quantized_grouped_mm.default(x, self.stored(name), offs, self.weight_format, False)

    def _proj(self, name: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        y = self._base(name, x, offs)
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

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, weights={self.weight_format}"


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

    dense = {name: experts.dense_weight(name, x.dtype) for name in EXPERT_PROJS}  # quantized stacks dequantized

    def proj(name: str, rows: torch.Tensor, e: int) -> torch.Tensor:
        y = F.linear(rows, dense[name][e])
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
