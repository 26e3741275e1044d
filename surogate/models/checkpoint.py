"""Load and save Hugging Face checkpoints (config.json + safetensors) without ever holding a CPU copy of the model.

`load_model` builds the module tree on the meta device (no memory, no init kernels), checks every checkpoint key
and shape against it from the safetensors headers (no tensor read yet), then loads the embedding, final norm and
LM head, and then one decoder block at a time: that block's tensors, from whichever shards hold them (the files
stay memory-mapped), read straight to the target device, cast to the target dtype and assigned into the module
(`load_state_dict(assign=True)`). After each block an optional `on_block(index, block)` hook may convert it before
the next is read: surogate/models/quantized_load.py quantizes it there, so the bf16 model never exists whole.

Our module paths equal Hugging Face's, so there is no key renaming, except for MoE experts: checkpoints store one
tensor per expert (`mlp.experts.{j}.gate_proj.weight` [inter, hidden]), we hold them stacked
(`mlp.experts.gate_proj` [E, inter, hidden]). Each per-expert tensor is copied into its slot of the stacked
parameter as it is read (`_ExpertStacker`); transformers 5's in-memory fused layout (`mlp.experts.gate_up_proj`
[E, 2 * inter, hidden], `mlp.experts.down_proj`) is split / taken as is. Saving writes the per-expert layout, which
is what `save_pretrained` writes and what every Qwen3-MoE checkpoint on the Hub uses.

Fine-grained FP8 checkpoints (Qwen3-*-FP8; `quantization_config` {quant_method: fp8, weight_block_size: [128, 128]}:
`weight` e4m3 [out, in] with `weight_scale_inv` fp32 [ceil(out/128), ceil(in/128)], one dequantization multiplier
per tile) are dequantized to the target dtype tensor by tensor on the device. qfp8 then requantizes each block with
one scale per row, the layout its op reads (a second e4m3 rounding; keeping the tile scales would need a
block-scaled FP8 GEMM, which the qfp8 op does not have).

bitsandbytes 4-bit NF4 checkpoints (a `load_in_4bit` model saved by transformers: uint8 codes plus `absmax`,
`quant_map`, optional nested absmax and a packed JSON state per Linear) are dequantized the same way, tensor by
tensor (surogate/models/bnb_checkpoint.py); qnf4 requantizes them to the same codes. Other `quant_method`s, and
8-bit or FP4 bitsandbytes checkpoints, are refused by `inspect_checkpoint`.

Pickle checkpoints (`pytorch_model.bin`) can run code when loaded; they are refused unless `allow_pickle=True`,
and then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from surogate.attention import resolve_backend
from surogate.models.bnb_checkpoint import (
    BNB_BLOCK,
    bnb_quantization_problem,
    bnb_shape_problems,
    is_bnb_companion,
    read_bnb_state,
    read_bnb_weight,
)
from surogate.models.moe import EXPERT_PROJS, GroupedExperts
from surogate.models.presets import PRESETS
from surogate.models.qwen3 import ModelArgs, Qwen3ForCausalLM, RMSNorm

__all__ = [
    "CheckpointQuantization",
    "checkpoint_quantization",
    "count_parameters",
    "fp8_scale_shape",
    "init_weights",
    "inspect_checkpoint",
    "load_model",
    "read_quantization",
    "save_hf_checkpoint",
]

# Keys some checkpoints carry that are not parameters of ours (recomputed at runtime).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EXPERT_KEY = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.")
FP8_SCALE_SUFFIX = ".weight_scale_inv"  # fine-grained FP8: dequantized weight = codes * weight_scale_inv (per tile)
FP8_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """How a pre-quantized checkpoint stores its linear weights (config.json's `quantization_config`)."""

    method: str  # "fp8": Hugging Face fine-grained FP8 (e4m3 `weight` + fp32 `weight_scale_inv` per tile);
    # "bitsandbytes": 4-bit NF4 (uint8 codes + per-64 absmax, optionally double-quantized)
    block_size: int = FP8_BLOCK  # fp8: tile edge of the block scales; bitsandbytes: elements per absmax block


def fp8_scale_shape(weight_shape: tuple[int, ...], block_size: int) -> tuple[int, int]:
    """[ceil(out / block), ceil(in / block)]: the `weight_scale_inv` shape of a fine-grained FP8 weight."""
    out, inp = weight_shape
    return -(-out // block_size), -(-inp // block_size)


_SUPPORTED = (
    "surogate loads bf16/fp16/fp32 checkpoints, Hugging Face fine-grained FP8 ones (quant_method fp8) and "
    "bitsandbytes 4-bit NF4 ones (quant_method bitsandbytes)"
)


def checkpoint_quantization(cfg: dict, where: str = "config.json") -> CheckpointQuantization | None:
    """The checkpoint's weight quantization (None: plain bf16/fp16/fp32); ValueError for one we cannot load."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fp8":
        return _fp8_quantization(q, where)
    if method == "bitsandbytes":
        problem = bnb_quantization_problem(q)
        if problem:
            raise ValueError(f"{where}: {problem}")
        return CheckpointQuantization("bitsandbytes", BNB_BLOCK)
    raise ValueError(f"{where}: quantization_config.quant_method={method!r} is not supported; {_SUPPORTED}")


def _fp8_quantization(q: dict, where: str) -> CheckpointQuantization:
    block = q.get("weight_block_size")
    if not block or len(block) != 2 or block[0] != block[1]:
        raise ValueError(
            f"{where}: FP8 weight_block_size={block!r} is not supported (per-tensor or non-square scales); "
            f"{_SUPPORTED} with square block scales such as [128, 128]"
        )
    if q.get("fmt", "e4m3") != "e4m3" or q.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(
            f"{where}: FP8 fmt={q.get('fmt')!r} / activation_scheme={q.get('activation_scheme')!r} is not supported "
            "(only e4m3 weights with dynamic activation scales, as the Qwen3 *-FP8 checkpoints use)"
        )
    return CheckpointQuantization("fp8", int(block[0]))


class _ExpertStacker:
    """Per-expert checkpoint tensors -> stacked [E, ...] parameters, filled slot by slot as they are read.

    A stacked tensor is allocated (in the target dtype, on the target device) on its first expert and handed over
    once all E slots are filled, so it is the only copy. Shapes and completeness are checked before anything is read
    (`_plan_load`), and all experts of a layer belong to that layer's block, so every stack completes within it.
    """

    def __init__(self, expected: dict[str, torch.Size], device: torch.device, dtype: torch.dtype):
        self.expected, self.device, self.dtype = expected, device, dtype
        self.pending: dict[str, tuple[torch.Tensor, set[int]]] = {}

    def add(self, key: str, expert: int, tensor: torch.Tensor) -> torch.Tensor | None:
        """-> the stacked tensor once its last expert arrived, else None."""
        if key not in self.pending:
            self.pending[key] = (torch.empty(self.expected[key], device=self.device, dtype=self.dtype), set())
        stacked, filled = self.pending[key]
        stacked[expert].copy_(tensor)
        filled.add(expert)
        if len(filled) < stacked.shape[0]:
            return None
        del self.pending[key]
        return stacked


def _hf_to_ours(name: str) -> list[tuple[str, int | None, int | None]]:
    """One checkpoint key -> [(our key, expert index or None, half of a fused gate_up tensor or None)]."""
    m = _EXPERT_KEY.match(name)
    if m:
        return [(f"{m.group(1)}.{m.group(3)}", int(m.group(2)), None)]
    if name.endswith(".mlp.experts.gate_up_proj"):  # transformers 5 in-memory layout: gate rows, then up rows
        prefix = name.removesuffix("gate_up_proj")
        return [(prefix + "gate_proj", None, 0), (prefix + "up_proj", None, 1)]
    return [(name, None, None)]


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


def count_parameters(args: ModelArgs) -> int:
    """Parameters of the model `args` describes (tied embeddings once), counted on the meta device: the stored
    tensors of a quantized model hold packed codes, not one element per weight."""
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen3ForCausalLM(args).parameters())


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
    checkpoint_quantization(cfg, str(config))
    _weight_files(path, allow_pickle)
    return args


class _Reader:
    """Every tensor of a checkpoint by name, across its weight files, read one at a time.

    safetensors files stay open (memory-mapped) for the whole load and each tensor is read straight to `device` when
    asked for, so a loader can take the tensors of one decoder block from whichever shards hold them. Pickle files
    are memory-mapped on the CPU and copied to `device` per tensor.
    """

    def __init__(self, files: list[Path], device: torch.device):
        self.device = device
        self._files = ExitStack()
        self._source: dict[str, Any] = {}  # name -> the open safetensors file or the pickle state dict holding it
        for file in files:
            if file.suffix == ".bin":
                source = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            else:  # safetensors cannot open on "meta"; "cuda" without an index means the current device
                source = self._files.enter_context(safe_open(str(file), framework="pt", device=str(device)))
            self._source.update(dict.fromkeys(source.keys(), source))

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self._files.close()

    def __contains__(self, name: str) -> bool:
        return name in self._source

    def names(self) -> list[str]:
        return list(self._source)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the file's header (no data read)."""
        source = self._source[name]
        return tuple(source[name].shape) if isinstance(source, dict) else tuple(source.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        source = self._source[name]
        return source[name].to(self.device) if isinstance(source, dict) else source.get_tensor(name)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
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


BlockHook = Callable[[int, nn.Module], None]


def _random_init(
    model: Qwen3ForCausalLM,
    device: torch.device,
    dtype: torch.dtype,
    on_block: BlockHook | None,
    draw_device: torch.device | None = None,
) -> None:
    """Materialize and initialize piece by piece (embedding, each block, final norm, LM head), handing each block to
    `on_block` before the next one exists. The pieces are `init_weights`' module order, so the random draws (and
    the weights) equal a whole-model init on the same device.

    `draw_device`: where the numbers are drawn when that is not `device` (a sharded base is built on the CPU, but
    torch draws CPU random numbers on one core, ~130M/s: Qwen3-32B would take over four minutes per rank; a GPU
    draws a block in milliseconds and the copy to the CPU costs what the copy back to the GPU will)."""
    layers = model.model.layers
    pieces = [(None, model.model.embed_tokens), *enumerate(layers), (None, model.model.norm), (None, model.lm_head)]
    draw = device if draw_device is None else draw_device
    for index, piece in pieces:
        _materialize(piece, draw, dtype)
        model.tie_weights()  # a tied LM head is the embedding, drawn again as `init_weights(model)` does
        init_weights(piece)
        if draw != device:
            piece.to(device)
            model.tie_weights()
        if on_block is not None and index is not None:
            on_block(index, piece)


def _plan_load(
    reader: _Reader, model: Qwen3ForCausalLM, args: ModelArgs, path: Path, block_size: int
) -> dict[int | None, list]:
    """Match every checkpoint key to our parameters by name and shape, before any tensor is read.

    Returns the reads grouped by decoder block (None: embedding, final norm, LM head): [(checkpoint key, our key,
    expert index or None, fused half or None)]. Raises ValueError naming what is missing, unexpected or misshapen.
    """
    expected = {name: t.shape for name, t in model.state_dict().items()}
    groups: dict[int | None, list] = {}
    unexpected, wrong_shape, experts = [], [], {}
    for hf_name in reader.names():
        if hf_name.endswith(_IGNORED_SUFFIXES) or (args.tie_word_embeddings and hf_name == "lm_head.weight"):
            continue  # tied: lm_head shares embed_tokens (some tied checkpoints still store a copy)
        if hf_name.endswith(FP8_SCALE_SUFFIX) and hf_name.removesuffix("_scale_inv") in reader:
            continue  # read with its weight
        if is_bnb_companion(hf_name, reader):
            continue  # read with its weight
        shape, problems = _dense_shape(reader, hf_name)
        if problems:
            wrong_shape += problems
            continue
        for name, expert, half in _hf_to_ours(hf_name):
            want = expected.get(name)
            got = shape if half is None else (shape[0], shape[1] // 2, *shape[2:])
            if want is None:
                unexpected.append(hf_name)
                continue
            if expert is not None:
                if expert >= want[0] or got != tuple(want[1:]):
                    wrong_shape.append(f"{name}[{expert}] {got} != {tuple(want[1:])} of {want[0]} experts")
                    continue
                experts.setdefault(name, set()).add(expert)
            elif got != tuple(want):
                wrong_shape.append(f"{name} {got} != {tuple(want)}")
                continue
            scale = hf_name.removesuffix("weight") + "weight_scale_inv"
            if scale in reader and reader.shape(scale) != fp8_scale_shape(got, block_size):
                wrong_shape.append(f"{scale} {reader.shape(scale)} != {fp8_scale_shape(got, block_size)}")
                continue
            block = _BLOCK_KEY.match(name)
            groups.setdefault(int(block.group(1)) if block else None, []).append((hf_name, name, expert, half))
    loaded = {name for group in groups.values() for _, name, _, _ in group}
    missing = [n for n, _ in model.named_parameters() if n not in loaded]  # tied lm_head is not listed separately
    missing += [f"{n} ({len(got)}/{expected[n][0]} experts)" for n, got in experts.items() if len(got) < expected[n][0]]
    if unexpected or missing or wrong_shape:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match its config.json: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong_shape)} wrong shape {wrong_shape[:3]}"
        )
    return groups


def _dense_shape(reader: _Reader, hf_name: str) -> tuple[tuple[int, ...], list[str]]:
    """The shape a checkpoint tensor has once read (a bitsandbytes 4-bit weight: its dense shape, from its packed
    state), and what disagrees with it among the tensors stored for it."""
    state = read_bnb_state(reader, hf_name)
    if state is None:
        return reader.shape(hf_name), []
    return state.shape, bnb_shape_problems(reader, hf_name, state)


def _read_weight(reader: _Reader, hf_name: str, dtype: torch.dtype, block_size: int) -> torch.Tensor:
    """One checkpoint tensor on the reader's device in `dtype`; FP8 codes with block scales and bitsandbytes NF4
    codes are dequantized there."""
    bnb_state = read_bnb_state(reader, hf_name)
    if bnb_state is not None:
        return read_bnb_weight(reader, hf_name, bnb_state, dtype)
    tensor = reader.get(hf_name)
    scale = hf_name.removesuffix("weight") + "weight_scale_inv"
    if hf_name.endswith(".weight") and scale in reader:
        from ops.fp8 import dequantize_blockwise

        return dequantize_blockwise(tensor, reader.get(scale), block_size, dtype)
    if tensor.element_size() == 1 and tensor.is_floating_point():
        raise ValueError(f"{hf_name} is stored in {tensor.dtype} without its {scale.rpartition('.')[2]} block scales")
    return tensor.to(dtype)


def _load_group(
    module: nn.Module, prefix: str, reads: list, reader: _Reader, stacker: _ExpertStacker, block_size: int
) -> None:
    """Read one group's tensors and assign them into `module` (our keys under `prefix`); nothing else is kept."""
    state = {}
    for hf_name, name, expert, half in reads:
        tensor = _read_weight(reader, hf_name, stacker.dtype, block_size)
        if half is not None:
            tensor = tensor.chunk(2, dim=1)[half]
        if expert is not None:
            tensor = stacker.add(name, expert, tensor)
            if tensor is None:
                continue
        state[name.removeprefix(prefix)] = tensor
    module.load_state_dict(state, strict=False, assign=True)


def read_quantization(path: str | Path) -> CheckpointQuantization | None:
    """The quantization of a checkpoint directory's weights (config.json), None for plain ones."""
    config = Path(path) / "config.json"
    return checkpoint_quantization(json.loads(config.read_text()), str(config))


def _block_size(path: Path) -> int:
    """The FP8 tile edge of the block scales (only fine-grained FP8 checkpoints have such scales)."""
    quant = read_quantization(path)
    return quant.block_size if quant is not None and quant.method == "fp8" else FP8_BLOCK


def load_model(
    path_or_preset: str | Path | ModelArgs,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    attn_backend: str = "auto",
    allow_pickle: bool = False,
    compute_device: torch.device | str | None = None,
    on_block: BlockHook | None = None,
) -> tuple[Qwen3ForCausalLM, ModelArgs]:
    """Build a model from a checkpoint directory (weights streamed to `device`) or a preset / ModelArgs (random).

    Weights arrive one decoder block at a time (checkpoints: that block's tensors from whichever shards hold them;
    presets: that block initialized), after the embedding, final norm and LM head. `on_block(index, block)` is called
    once each block is complete and before the next is read: a stream-quantizing loader converts the block there,
    so at most one block exists in `dtype` beside the converted ones (surogate/models/quantized_load.py).
    Checkpoints in Hugging Face's fine-grained FP8 format or bitsandbytes' 4-bit NF4 format are dequantized to `dtype`
    tensor by tensor on `device`.

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
        gpu = compute_device is not None and torch.device(compute_device).type == "cuda" and torch.cuda.is_available()
        draw = torch.device(compute_device) if gpu else None
        _random_init(model, device, dtype, on_block, draw_device=draw)
        return model, args

    path = Path(path_or_preset)
    args = inspect_checkpoint(path, allow_pickle)
    block_size = _block_size(path)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(args, backend)
    stacker = _ExpertStacker({name: t.shape for name, t in model.state_dict().items()}, device, dtype)
    with _Reader(_weight_files(path, allow_pickle), device) as reader:
        groups = _plan_load(reader, model, args, path, block_size)
        _load_group(model, "", groups.pop(None, []), reader, stacker, block_size)
        model.tie_weights()  # assign replaced embed_tokens.weight; point lm_head at the loaded tensor again
        for i, block in enumerate(model.model.layers):
            _load_group(block, f"model.layers.{i}.", groups.get(i, []), reader, stacker, block_size)
            if on_block is not None:
                on_block(i, block)
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
