"""Adapters out (and back in): PEFT-format LoRA adapters and merged full checkpoints.

A PEFT LoRA adapter is a directory with `adapter_config.json` and `adapter_model.safetensors` whose keys are

    base_model.model.<module path>.lora_A.weight   # [r, in]
    base_model.model.<module path>.lora_B.weight   # [out, r]

Our module paths are the Hugging Face ones (surogate/models keeps HF names and `apply_lora` keeps module names), so
the only work is dropping the wrappers that activation checkpointing and `torch.compile` insert into module paths.
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)` then reproduces our model.
peft itself is not imported here (its import pulls in a lot); the format is small and tested against peft.

Qwen3-MoE experts. Our `ExpertLoRA` holds A [E, r, in] and B [E, out, r] per stacked projection; the adapter stores
them one expert at a time, the layout PEFT writes for transformers 4's per-expert `nn.Linear`s:

    base_model.model.model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight   # A[e], B[e]

with `target_modules` naming gate_proj / up_proj / down_proj. Why not transformers 5's own layout: transformers 5
fuses the experts into 3-D parameters (`mlp.experts.gate_up_proj` [E, 2 * inter, hidden], `mlp.experts.down_proj`),
which PEFT adapts through `target_parameters` (`ParamWrapper`, lora_A [E * r, in] with expert-major rows, lora_B
[out, r * E] with rank-major columns, under nested-wrapper key names). PEFT converts a per-expert adapter into that
form itself when it loads one on transformers 5 (peft/utils/transformers_weight_conversion.py, checked with peft 0.21
on transformers 5.24): it stacks the experts, concatenates gate's and up's A along the rank and puts their B's
block-diagonally, so gate_up_proj gets one rank-2r LoRA with lora_alpha doubled (the same alpha / r), which computes
exactly our two separate updates. So one file loads on transformers 4 and 5. What that conversion implies here:

- gate_proj and up_proj of the experts are targeted together or not at all (they become one fused parameter);
- a Qwen3-MoE model with dense MLP layers (`mlp_only_layers`, `decoder_sparse_step` > 1) cannot have LoRA on MLP
  projections: the conversion turns every gate_proj / up_proj / down_proj target into the experts' parameters and
  the dense layers' LoRA would be dropped (`moe_target_problem` says so, and preflight refuses it before training);
- `ParamWrapper` refuses lora_dropout != 0, so an adapter with MoE LoRA declares lora_dropout 0 (dropout only acts
  in training; the function the adapter computes is the same);
- the router (`mlp.gate`, target "gate") is an `nn.Linear` to us and in transformers 4; PEFT maps it to the 2-D
  `gate.weight` of transformers 5's router under the same key names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surogate.lora import LoRALinear
from surogate.models.moe import EXPERT_PROJS, ExpertLoRA, GroupedExperts

__all__ = [
    "copy_tokenizer_files",
    "expert_lora_modules",
    "load_adapter",
    "lora_modules",
    "merge_lora_",
    "moe_target_problem",
    "peft_state_dict",
    "save_adapter",
]

# Path segments inserted by wrappers: torch.compile's OptimizedModule and torch.distributed's CheckpointWrapper.
_WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _clean(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """LoRA modules keyed by their Hugging Face module path (wrappers removed): `LoRALinear`s and the modules the
    q* recipes put in their place (base stored in FP8, NF4 or FP4; same lora_A/lora_B/scaling)."""
    from ops.fp4 import FP4LoRALinear
    from ops.fp8 import FP8LoRALinear
    from ops.nf4 import NF4LoRALinear

    kinds = (LoRALinear, FP8LoRALinear, NF4LoRALinear, FP4LoRALinear)
    return {_clean(name): m for name, m in model.named_modules() if isinstance(m, kinds)}


def expert_lora_modules(model: nn.Module) -> dict[str, ExpertLoRA]:
    """MoE expert LoRAs keyed by `<experts path>.<projection>` (`model.layers.0.mlp.experts.gate_proj`)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, GroupedExperts):
            for proj in EXPERT_PROJS:
                lora = getattr(m, f"{proj}_lora")
                if lora is not None:
                    out[f"{_clean(name)}.{proj}"] = lora
    return out


def _expert_key(path: str, expert: int, ab: str) -> str:
    experts, proj = path.rsplit(".", 1)
    return f"base_model.model.{experts}.{expert}.{proj}.lora_{ab}.weight"


def moe_target_problem(expert_targets: set[str], dense_mlp_targets: bool) -> str | None:
    """Why a PEFT adapter cannot hold LoRA on these Qwen3-MoE targets (see the module docstring), else None.
    `expert_targets`: the expert projections with LoRA; `dense_mlp_targets`: dense MLP layers of the same model with
    LoRA on their projections."""
    pair = expert_targets & {"gate_proj", "up_proj"}
    if len(pair) == 1:
        (only,) = pair
        return (
            f"lora_target_modules has {only} but not {({'gate_proj', 'up_proj'} - pair).pop()}: PEFT fuses the "
            "Qwen3-MoE experts' gate_proj and up_proj into one gate_up_proj parameter, so target both or neither"
        )
    if expert_targets and dense_mlp_targets:
        return (
            "this Qwen3-MoE model has dense MLP layers (mlp_only_layers / decoder_sparse_step > 1) and PEFT on "
            "transformers 5 maps every gate_proj / up_proj / down_proj target to the experts, so their LoRA would be "
            "lost on load: leave gate_proj, up_proj and down_proj out of lora_target_modules"
        )
    return None


def _check_moe_exportable(model: nn.Module) -> None:
    expert_targets = {path.rsplit(".", 1)[1] for path in expert_lora_modules(model)}
    dense_mlp = any(re.search(r"\.mlp\.(gate|up|down)_proj$", name) for name in lora_modules(model))
    problem = moe_target_problem(expert_targets, dense_mlp)
    if problem:
        raise ValueError(problem)


def _has_moe_lora(model: nn.Module) -> bool:
    """LoRA on experts or the router: the parts PEFT adapts with `ParamWrapper` on transformers 5."""
    return bool(expert_lora_modules(model)) or any(name.endswith(".mlp.gate") for name in lora_modules(model))


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole A/B tensors on the CPU; FSDP-sharded ones are gathered (then every rank must call)."""
    from surogate.distributed import full_tensor

    _check_moe_exportable(model)
    out = {}
    for name, m in lora_modules(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = full_tensor(m.lora_A.detach()).cpu().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = full_tensor(m.lora_B.detach()).cpu().contiguous()
    for path, lora in expert_lora_modules(model).items():
        for ab, stacked in (("A", lora.lora_A), ("B", lora.lora_B)):
            stacked = full_tensor(stacked.detach()).cpu()
            for e in range(stacked.shape[0]):  # clone: safetensors refuses tensors that share storage
                out[_expert_key(path, e, ab)] = stacked[e].clone()
    return out


def adapter_config(*, rank: int, alpha: float, dropout: float, target_modules: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    base_model: str,
) -> Path:
    """Write a PEFT adapter directory; written next to `out_dir` first and moved into place in one step.
    Distributed: every rank calls (the LoRA shards are gathered), rank 0 writes."""
    from surogate.distributed import rank0

    out_dir = Path(out_dir)
    tensors = peft_state_dict(model)
    if not rank0():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    if _has_moe_lora(model):
        dropout = 0.0  # PEFT's ParamWrapper (MoE experts, router on transformers 5) refuses any other value
    cfg = adapter_config(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules, base_model=base_model)
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: adapter_dir must be a PEFT adapter directory")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("fan_in_fan_out") or cfg.get("rank_pattern"):
        raise ValueError(f"{path}: DoRA / rsLoRA / fan_in_fan_out / per-module ranks are not supported")
    return cfg


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy a PEFT adapter's A/B weights into the model's LoRA modules (same targets and rank required). Under FSDP
    each rank keeps its shard, so an adapter loads with any world size."""
    from surogate.distributed import shard_like

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    modules = lora_modules(model)
    experts = expert_lora_modules(model)
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in modules for ab in "AB"}
    expected |= {_expert_key(p, e, ab) for p, lora in experts.items() for e in range(lora.num_experts) for ab in "AB"}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(
            f"adapter {adapter_dir} does not match the model's LoRA modules: missing {missing}, unexpected {extra}"
        )
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_A.copy_(shard_like(tensors[f"base_model.model.{name}.lora_A.weight"], m.lora_A))
            m.lora_B.copy_(shard_like(tensors[f"base_model.model.{name}.lora_B.weight"], m.lora_B))
        for path, lora in experts.items():
            for ab in "AB":
                target = getattr(lora, f"lora_{ab}")
                stacked = torch.stack([tensors[_expert_key(path, e, ab)] for e in range(lora.num_experts)])
                target.copy_(shard_like(stacked, target))


@torch.no_grad()
def merge_lora_(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight (W + scaling * B @ A, computed in fp32) and put plain
    `nn.Linear`s back, in place; MoE experts get W[e] + scaling * B[e] @ A[e] and lose their `ExpertLoRA`s (expert
    stacks stored in FP8 / NF4 are dequantized to their original dtype first).
    Returns the number of merged modules (an expert projection counts once for all its experts)."""
    merged = 0
    for experts in model.modules():
        if not isinstance(experts, GroupedExperts):
            continue
        experts.dequantize_()
        for proj in EXPERT_PROJS:
            lora = getattr(experts, f"{proj}_lora")
            if lora is None:
                continue
            w = getattr(experts, proj)
            w.copy_(w.float() + lora.scaling * torch.bmm(lora.lora_B.float(), lora.lora_A.float()))
            setattr(experts, f"{proj}_lora", None)
            merged += 1
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, LoRALinear):
                continue
            w = child.weight.float() + child.scaling * (child.lora_B.float() @ child.lora_A.float())
            linear = nn.Linear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device=w.device,
                dtype=child.weight.dtype,
            )
            linear.weight.copy_(w)
            if child.bias is not None:
                linear.bias.copy_(child.bias)
            linear.requires_grad_(False)
            setattr(parent, child_name, linear)
            merged += 1
    return merged


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)
            copied.append(name)
    return copied
