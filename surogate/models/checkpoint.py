"""Load and save Hugging Face checkpoints (config.json + safetensors) without ever holding a CPU copy of the model.

`load_model` builds the module tree on the meta device (no memory, no init kernels), then streams the checkpoint
shard by shard with `safetensors.safe_open` straight to the target device, casting each tensor to the target dtype
as it arrives, and assigns the tensors into the module (`load_state_dict(assign=True)`). At most one tensor exists
in the checkpoint's dtype at a time. Our module paths equal Hugging Face's, so there is no key renaming, except
for MoE experts: checkpoints store one tensor per expert (`mlp.experts.{j}.gate_proj.weight` [inter, hidden]), we
hold them stacked (`mlp.experts.gate_proj` [E, inter, hidden]). Each per-expert tensor is copied into its slot of
the stacked parameter as it streams in (`_ExpertStacker`); transformers 5's in-memory fused layout
(`mlp.experts.gate_up_proj` [E, 2 * inter, hidden], `mlp.experts.down_proj`) is split / taken as is. Saving writes
the per-expert layout, which is what `save_pretrained` writes and what every Qwen3-MoE checkpoint on the Hub uses.

Pickle checkpoints (`pytorch_model.bin`) can run code when loaded; they are refused unless `allow_pickle=True`,
and then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from surogate.attention import resolve_backend
from surogate.models.moe import EXPERT_PROJS, GroupedExperts
from surogate.models.presets import PRESETS
from surogate.models.qwen3 import ModelArgs, Qwen3ForCausalLM, RMSNorm

__all__ = ["inspect_checkpoint", "load_model", "save_hf_checkpoint", "init_weights"]

# Keys some checkpoints carry that are not parameters of ours (recomputed at runtime).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EXPERT_KEY = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class _ExpertStacker:
    """Per-expert checkpoint tensors -> stacked [E, ...] parameters, filled slot by slot as shards stream in.

    A stacked tensor is allocated (in the target dtype, on the target device) on its first expert and handed over
    once all E slots are filled, so it is the only copy; experts of one layer may span shards.
    """

    def __init__(self, expected: dict[str, torch.Size], device: torch.device, dtype: torch.dtype):
        self.expected, self.device, self.dtype = expected, device, dtype
        self.pending: dict[str, tuple[torch.Tensor, set[int]]] = {}

    def add(self, key: str, expert: int, tensor: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
        """-> (the stacked tensor once complete, else None; an error string for a key or shape mismatch)."""
        shape = self.expected[key]
        if expert >= shape[0]:
            return None, f"expert {expert} >= num_experts {shape[0]} ({key})"
        if tensor.shape != shape[1:]:
            return None, f"{key}[{expert}] {tuple(tensor.shape)} != {tuple(shape[1:])}"
        if key not in self.pending:
            self.pending[key] = (torch.empty(shape, device=self.device, dtype=self.dtype), set())
        stacked, filled = self.pending[key]
        stacked[expert].copy_(tensor)
        filled.add(expert)
        if len(filled) < shape[0]:
            return None, None
        del self.pending[key]
        return stacked, None

    def incomplete(self) -> list[str]:
        return [f"{k} ({len(f)}/{t.shape[0]} experts)" for k, (t, f) in self.pending.items()]


def _hf_to_ours(name: str, tensor: torch.Tensor) -> list[tuple[str, int | None, torch.Tensor]]:
    """One checkpoint tensor -> [(our key, expert index or None for a whole tensor, tensor)]."""
    m = _EXPERT_KEY.match(name)
    if m:
        return [(f"{m.group(1)}.{m.group(3)}", int(m.group(2)), tensor)]
    if name.endswith(".mlp.experts.gate_up_proj"):  # transformers 5 in-memory layout: gate rows, then up rows
        prefix = name.removesuffix("gate_up_proj")
        gate, up = tensor.chunk(2, dim=1)
        return [(prefix + "gate_proj", None, gate), (prefix + "up_proj", None, up)]
    return [(name, None, tensor)]


def _ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert tensors -> per-expert keys (views; clone before saving)."""
    out = {}
    for name, t in state.items():
        prefix, _, proj = name.rpartition(".")
        if prefix.endswith(".mlp.experts") and proj in EXPERT_PROJS:
            out.update({f"{prefix}.{j}.{proj}.weight": t[j] for j in range(t.shape[0])})
        else:
            out[name] = t
    return out


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    """The checkpoint's weight files in load order; ValueError if there are none we accept."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ValueError(f"{index} lists shard files that do not exist: {missing[:3]}")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise ValueError(
            f"{path} holds only pickle checkpoints ({pickles[0].name}), which are refused because loading them can "
            "run code; convert to safetensors or pass allow_pickle=True"
        )
    if pickles:
        return pickles
    raise ValueError(f"{path} has no *.safetensors weight files")


def inspect_checkpoint(path: str | Path, allow_pickle: bool = False) -> ModelArgs:
    """Validate a checkpoint directory (config, architecture, weight files) without reading any weights."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory (and not a preset: {', '.join(PRESETS)})")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from None
    args = ModelArgs.from_hf_config(cfg)
    _weight_files(path, allow_pickle)
    return args


def _read_tensors(file: Path, device: torch.device):
    """Yield (name, tensor) from one weight file, each tensor placed on `device` as it is read."""
    if file.suffix == ".bin":
        state = torch.load(file, map_location=device, weights_only=True, mmap=True)
        yield from state.items()
        return
    # safetensors cannot open on "meta"; "cuda" without an index means the current device.
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def init_weights(model: Qwen3ForCausalLM, std: float = 0.02) -> None:
    """Hugging Face's init: linear and embedding weights N(0, std), biases zero, norm weights one."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, GroupedExperts):
            for name in EXPERT_PROJS:
                nn.init.normal_(getattr(module, name), std=std)


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace meta parameters by uninitialized ones of `dtype` on `device` (no fp32 detour)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype))


def load_model(
    path_or_preset: str | Path | ModelArgs,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    attn_backend: str = "auto",
    allow_pickle: bool = False,
    compute_device: torch.device | str | None = None,
) -> tuple[Qwen3ForCausalLM, ModelArgs]:
    """Build a model from a checkpoint directory (weights streamed to `device`) or a preset / ModelArgs (random).

    `compute_device` is where the model will run when that differs from where it is loaded (FSDP with a sharded
    base loads on the CPU and moves each rank's shards to its GPU): the attention backend is chosen for it.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backend = resolve_backend(attn_backend, device if compute_device is None else compute_device)
    if isinstance(path_or_preset, ModelArgs) or str(path_or_preset) in PRESETS:
        args = path_or_preset if isinstance(path_or_preset, ModelArgs) else dataclasses.replace(PRESETS[path_or_preset])
        with torch.device("meta"):
            model = Qwen3ForCausalLM(args, backend)
        _materialize(model, device, dtype)
        model.tie_weights()
        init_weights(model)
        return model, args

    path = Path(path_or_preset)
    args = inspect_checkpoint(path, allow_pickle)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(args, backend)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    stacker = _ExpertStacker(expected, device, dtype)
    for file in _weight_files(path, allow_pickle):
        shard = {}
        for hf_name, hf_tensor in _read_tensors(file, device):
            if hf_name.endswith(_IGNORED_SUFFIXES) or (args.tie_word_embeddings and hf_name == "lm_head.weight"):
                continue  # tied: lm_head shares embed_tokens (some tied checkpoints still store a copy)
            for name, expert, tensor in _hf_to_ours(hf_name, hf_tensor):
                if name not in expected:
                    unexpected.append(hf_name)
                elif expert is not None:
                    stacked, error = stacker.add(name, expert, tensor)
                    if error:
                        wrong_shape.append(error)
                    elif stacked is not None:
                        shard[name] = stacked
                elif tensor.shape != expected[name]:
                    wrong_shape.append(f"{name} {tuple(tensor.shape)} != {tuple(expected[name])}")
                else:
                    shard[name] = tensor.to(dtype)
        model.load_state_dict(shard, strict=False, assign=True)  # one shard resident beside the model at a time
        del shard
    model.tie_weights()  # assign replaced embed_tokens.weight; point lm_head at the loaded tensor again
    missing = stacker.incomplete() + [n for n, p in model.named_parameters() if p.is_meta and n not in stacker.pending]
    if unexpected or missing or wrong_shape:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match its config.json: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong_shape)} wrong shape {wrong_shape[:3]}"
        )
    return model, args


def save_hf_checkpoint(
    model: Qwen3ForCausalLM, args: ModelArgs, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write config.json and safetensors weights (sharded with an index above `max_shard_bytes`) for transformers."""
    state = model.state_dict()
    if any(k.endswith((".lora_A", ".lora_B")) for k in state):
        raise ValueError("model still has LoRA modules: merge them into the base weights before saving a checkpoint")
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = _ours_to_hf(state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(state.values())).dtype
    config = {**args.to_hf_config(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        # One shard at a time on the CPU; safetensors needs contiguous, unshared tensors.
        # Per-expert slices are views of one stacked tensor: clone them so no two saved tensors share memory.
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}
        tensors = {k: v.clone() if _EXPERT_KEY.match(k) else v for k, v in tensors.items()}
        save_file(tensors, out / name, {"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: name for shard, name in zip(shards, names) for k in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
