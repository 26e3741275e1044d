"""Grouped GEMM: one GEMM per group of rows, each group with its own weight (the Qwen3-MoE experts' matmuls).

`grouped_mm(x, w, offs)` computes `x[rows of group g] @ w[g].T` for the groups that `offs` (the end row of each
group, int32 on the device) cuts the sorted rows into. It uses `torch._grouped_mm` where it runs (CUDA sm90+ in bf16
with 16-byte aligned rows, and the CPU in torch >= 2.9, forward and backward; under torch.compile bf16 only), else
`grouped_mm_reference`, a loop over the groups' row segments that needs the group sizes on the host. Under
torch.compile or CUDA-graph capture (surogate/cuda_graphs.py) nothing may wait for the host, so the fallback there
is `grouped_mm_masked`: every group's weight on every row, masked, groups times the FLOPs (for CPU fp32 tests and
LoRA ranks that break the 16-byte alignment). The reference is the numerical baseline the others are tested against.

Expert weights stored quantized (recipes qfp8 and qnf4) go through `ops/quantized_experts.py`, which dequantizes the
stack and calls `grouped_mm` here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm", "grouped_mm_masked", "grouped_mm_reference"]


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return (
            False  # its meta kernel (shape inference under torch.compile) accepts bf16 only, though CPU eager runs fp32
        )
    if x.device.type != "cpu" and (
        x.device.type != "cuda" or x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0)
    ):
        return False
    # Row strides of both operands must be multiples of 16 bytes on every device (e.g. LoRA rank >= 8 in bf16; the
    # CPU kernel raises "strides should be multiple of 16 bytes" for a rank-4 LoRA in bf16 too).
    return (w.shape[-1] * w.element_size()) % 16 == 0 and (w.shape[-2] * w.element_size()) % 16 == 0


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
