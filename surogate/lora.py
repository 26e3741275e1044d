"""LoRA: a frozen base linear plus a trainable low-rank update.

The eager module here is the numerical reference for every compiled path. Its forward is deliberately the
plainest possible expression,

    y = linear(x, W) + scaling * linear(linear(dropout(x), A), B)

because the FX pass in `compile_passes/lora_rewrite.py` pattern-matches exactly this subgraph and swaps it for a
fused `torch.ops.surogate.*` op chosen by the precision recipe. Keep it that plain: anything clever here is
something the pass would have to learn to see through.

LoRA is a conversion applied after the model is built and before it is compiled or sharded (`apply_lora`): it
replaces each targeted `nn.Linear` by a `LoRALinear` that takes over the same frozen weight tensor, so module
paths (and so checkpoint and PEFT key names) stay those of the Hugging Face model. The stream-quantizing loader
(surogate/models/quantized_load.py) wraps each block as it loads, before its base is quantized, with
`wrap_linears(init=False)`; `apply_lora` then initializes those adapters in model order, so the random draws are
those of a load-then-wrap run. MoE experts hold stacked
weights rather than `nn.Linear`s; for them `apply_lora` attaches grouped per-expert LoRA (`ExpertLoRA`, A [E, r, in],
B [E, out, r], surogate/models/moe.py) to each targeted projection. The MoE router (`mlp.gate`, an `nn.Linear`) stays
frozen unless `ROUTER_TARGET` ("gate") is among the targets; then it gets a `LoRALinear` like any projection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from surogate.models.moe import GroupedExperts

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "ROUTER_TARGET",
    "apply_lora",
    "init_lora_",
    "lora_parameters",
    "lora_state_dict",
    "wrap_linears",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTER_TARGET = "gate"  # the Qwen3-MoE router (`mlp.gate`); opt-in, and only MoE models have it


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)
    dtype: torch.dtype = torch.float32  # master dtype of A and B; the forward casts them to the activation dtype

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """`nn.Linear` with a frozen weight and a trainable rank-r update `B @ A` scaled by alpha / r."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        lora_dtype: torch.dtype = torch.float32,
        init: bool = True,  # False: A and B stay uninitialized until `apply_lora` (streamed loading)
    ):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.scaling = alpha / rank
        # Take over the base tensors (no copy): the weight is frozen, never gets a gradient.
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=device, dtype=lora_dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init and device.type != "meta":
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        init_lora_(self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(self.dropout(x), a), b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def init_lora_(lora_A: nn.Parameter, lora_B: nn.Parameter) -> None:
    """PEFT's default init: A kaiming-uniform (a=sqrt(5), as nn.Linear), B zeros, so training starts at the base."""
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


def _has_adapter(module: nn.Module) -> bool:
    """A module that already carries LoRA A/B (a LoRALinear, or one whose base a loader has quantized since)."""
    return isinstance(getattr(module, "lora_A", None), nn.Parameter)


def wrap_linears(model: nn.Module, config: LoRAConfig, init: bool = True) -> list[str]:
    """Replace every `nn.Linear` named in `config.target_modules` by a `LoRALinear`; returns the qualified names.

    Touches nothing else (no freezing, no experts): the streamed loader calls it on one block with `init=False`.
    """
    targets = set(config.target_modules)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                lora = LoRALinear(child, config.rank, config.alpha, config.dropout, config.dtype, init=init)
                setattr(parent, child_name, lora)
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return wrapped


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace every `nn.Linear` whose attribute name is in `config.target_modules` by a `LoRALinear`, and give MoE
    experts an `ExpertLoRA` on each targeted stacked projection (`...mlp.experts.gate_proj`).

    Targeted modules that already carry an adapter (wrapped by the streamed loader, their base maybe quantized
    since) get their A and B initialized here, in the same module order as freshly wrapped ones, so a streamed load
    draws the same random numbers as load-then-wrap. Freezes every other parameter. Returns the qualified names of
    the wrapped modules; raises `ValueError` when no module matches (a typo in `lora_target_modules` must not
    silently train nothing).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(config.target_modules)
    wrapped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name not in targets:
                continue
            if type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, config.rank, config.alpha, config.dropout, config.dtype))
            elif _has_adapter(child):
                init_lora_(child.lora_A, child.lora_B)
                child.lora_A.requires_grad_(True)
                child.lora_B.requires_grad_(True)
            else:
                continue
            wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    for name, module in list(model.named_modules()):
        if isinstance(module, GroupedExperts):
            added = module.add_lora(targets, config.rank, config.alpha, config.dropout, config.dtype)
            wrapped += [f"{name}.{proj}" for proj in added]
    if not wrapped:
        raise ValueError(f"lora_target_modules {sorted(targets)} match no linear layer of the model")
    return wrapped


def lora_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed by our module paths (`...q_proj.lora_A`)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
