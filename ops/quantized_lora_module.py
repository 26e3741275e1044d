"""The eager module shared by every quantized-storage recipe (qfp8, qnf4, qfp4): a LoRA linear whose frozen base
weight is kept only in a quantized format and dequantized on the fly.

It is the numerical reference the compile passes rewrite: `linear(x, dequantize(W)) + scaling * B(A(dropout(x)))`,
where `dequantize` is one registered op per format (`surogate::fp8_dequantize`, `nf4_dequantize`, `fp4_dequantize`),
so the pass finds the stored tensors behind a single node. The codes stay in `weight` (a frozen parameter: FSDP
shards it and the state-dict key is the checkpoint's `...weight`); the format's scales are buffers next to it.
"""

from __future__ import annotations

import abc

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QuantizedLoRALinear"]


class QuantizedLoRALinear(nn.Module, abc.ABC):
    """Takes over a `LoRALinear`'s adapter (A, B, dropout, scaling, bias) and stores its base as `codes`.
    Subclasses register their scale buffers and implement `dequantized_weight`."""

    format_name = "quantized"

    def __init__(self, lora: nn.Module, codes: Tensor):
        super().__init__()
        self.in_features, self.out_features = lora.in_features, lora.out_features
        self.rank, self.scaling = lora.rank, lora.scaling
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.bias = lora.bias
        self.lora_A, self.lora_B, self.dropout = lora.lora_A, lora.lora_B, lora.dropout

    @abc.abstractmethod
    def dequantized_weight(self, dtype) -> Tensor:
        """The base weight [out, in] in `dtype`, through the format's registered dequantize op."""

    def forward(self, x: Tensor) -> Tensor:
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        w = self.dequantized_weight(x.dtype)
        return F.linear(x, w, self.bias) + self.scaling * F.linear(F.linear(self.dropout(x), a), b)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
            f"{self.format_name} base"
        )
