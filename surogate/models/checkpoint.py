"""Load and save Hugging Face checkpoints (config.json + safetensors) without ever holding a CPU copy of the model.

`load_model` builds the module tree on the meta device (no memory, no init kernels), then streams the checkpoint
shard by shard with `safetensors.safe_open` straight to the target device, casting each tensor to the target dtype
as it arrives, and assigns the tensors into the module (`load_state_dict(assign=True)`). At most one tensor exists
in the checkpoint's dtype at a time. Our module paths equal Hugging Face's, so there is no key renaming.

Pickle checkpoints (`pytorch_model.bin`) can run code when loaded; they are refused unless `allow_pickle=True`,
and then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from surogate.attention import resolve_backend
from surogate.models.presets import PRESETS
from surogate.models.qwen3 import ModelArgs, Qwen3ForCausalLM, RMSNorm

__all__ = ["inspect_checkpoint", "load_model", "save_hf_checkpoint", "init_weights"]

# Keys some checkpoints carry that are not parameters of ours (recomputed at runtime).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
) -> tuple[Qwen3ForCausalLM, ModelArgs]:
    """Build a model from a checkpoint directory (weights streamed to `device`) or a preset / ModelArgs (random)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backend = resolve_backend(attn_backend, device)
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
    for file in _weight_files(path, allow_pickle):
        shard = {}
        for name, tensor in _read_tensors(file, device):
            if name.endswith(_IGNORED_SUFFIXES) or (args.tie_word_embeddings and name == "lm_head.weight"):
                continue  # tied: lm_head shares embed_tokens (some tied checkpoints still store a copy)
            if name not in expected:
                unexpected.append(name)
                continue
            if tensor.shape != expected[name]:
                wrong_shape.append(f"{name} {tuple(tensor.shape)} != {tuple(expected[name])}")
                continue
            shard[name] = tensor.to(dtype)
        model.load_state_dict(shard, strict=False, assign=True)  # one shard resident beside the model at a time
        del shard
    model.tie_weights()  # assign replaced embed_tokens.weight; point lm_head at the loaded tensor again
    missing = [n for n, p in model.named_parameters() if p.is_meta]
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
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, out / name, {"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: name for shard, name in zip(shards, names) for k in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
