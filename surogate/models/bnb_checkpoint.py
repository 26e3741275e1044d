"""bitsandbytes 4-bit NF4 checkpoints, read without bitsandbytes: what transformers writes when a model loaded with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` is saved (`quantization_config` {quant_method:
bitsandbytes, load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true or false}).

Layout (bitsandbytes 0.50 `QuantState.as_dict(packed=True)`, each key prefixed by the Linear's `X.weight.`;
tests/models/test_bnb_checkpoint.py checks it against the real package when that is installed):
    X.weight                                uint8 [ceil(numel / 2), 1]: NF4 codes of the row-major flattened weight,
                                            two per byte, the first element in the high nibble (our qnf4 order)
    X.weight.absmax                         one absmax per block of `blocksize` (64) elements: fp32 [n_blocks]; with
                                            double quantization uint8 [n_blocks], codes into `nested_quant_map`
    X.weight.quant_map                      fp32 [16]: the NF4 table (bitsandbytes dequantizes with its built-in copy)
    X.weight.nested_absmax                  fp32 [ceil(n_blocks / nested_blocksize)]        (double quantization)
    X.weight.nested_quant_map               fp32 [256]: bitsandbytes' signed dynamic 8-bit map (double quantization)
    X.weight.quant_state.bitsandbytes__nf4  uint8 [bytes]: UTF-8 JSON {quant_type, blocksize, dtype, shape; with
                                            double quantization nested_blocksize, nested_dtype, nested_offset}
Norms, the embedding, the LM head (and modules in `llm_int8_skip_modules`) are stored plain.

Dequantization, in fp32 and in bitsandbytes' order, so the result is `bitsandbytes.functional.dequantize_4bit`'s:
    absmax = nested_quant_map[absmax] * nested_absmax[block // nested_blocksize] + nested_offset   (double quant)
    weight = NF4[code] * absmax[element // blocksize], rounded once to the target dtype
The loader (surogate/models/checkpoint.py) does this tensor by tensor on the loading device, as it does for FP8 block
scales, so every recipe can load such a checkpoint; bitsandbytes is not needed.

Why qnf4 gets the checkpoint's weights back (nearly) unchanged: qnf4 stores the same format except for the absmax,
and the stream quantizer (surogate/models/quantized_load.py) requantizes the dequantized weight:
  - blocks line up: both formats take blocks of 64 consecutive elements of the row-major flattened weight;
  - codes come back the same: bitsandbytes mapped each block's element of largest magnitude to NF4 +-1, so the
    dequantized block's absmax is exactly the block's absmax A again (in bf16: bf16(A), and every element rounded
    to bf16 too), and each element divides back to its NF4 value (bf16 moves it by at most 2^-7 relative, while the
    nearest decision boundary between NF4 values is at least 10% away);
  - only the absmax storage changes: bitsandbytes' dynamic 8-bit map with an offset, ours a linear int8 around the
    mean, both in groups of 256 blocks. A qnf4 weight differs from the checkpoint's by |NF4 value| times the
    absmax rounding of ours: half an int8 step of its group (a step is the group's largest |absmax - mean| / 128; a
    whole step where +128 steps saturate at int8's 127), plus bf16's 2^-8 relative rounding of A.
Tested on a tiny Qwen3 in both dtypes: every code equal, every weight within that bound. The one exception in
principle is a block whose stored absmax comes back <= 0 (a block of near-zeros below the resolution of the dynamic
map; an all-zero block is fine): its values are ~0 in both, but its codes need not match. Other block sizes than 64
would not line up and are refused, as are 8-bit and FP4 checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BNB_BLOCK",
    "BnbQuantState",
    "bnb_quantization_problem",
    "bnb_shape_problems",
    "dequantize_bnb_nf4",
    "is_bnb_companion",
    "read_bnb_state",
    "read_bnb_weight",
]

BNB_BLOCK = 64  # elements per absmax block: bitsandbytes' default, and qnf4's block
_NESTED_MAP_SIZE = 256  # entries of the dynamic 8-bit map of a double-quantized absmax
_STATE_PREFIX = "quant_state.bitsandbytes__"  # + quant_type: the packed JSON of the non-tensor state
# Everything a 4-bit Linear stores next to its `X.weight`, as "X.weight." + suffix.
_COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _STATE_PREFIX + "nf4", _STATE_PREFIX + "fp4")
_USE = "use the bf16 original or a 4-bit NF4 bitsandbytes checkpoint (load_in_4bit, bnb_4bit_quant_type nf4)"


class TensorSource(Protocol):
    """What the checkpoint reader offers: membership, stored shapes from the headers, and tensors by name."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> Tensor: ...


@dataclasses.dataclass(frozen=True)
class BnbQuantState:
    """The non-tensor part of one weight's quantization state (the packed JSON), checked."""

    shape: tuple[int, ...]  # the dense weight's shape, e.g. (out, in)
    nested_blocksize: int | None = None  # absmax blocks per nested_absmax entry; None: absmax stored in fp32
    nested_offset: float = 0.0  # added to the dequantized absmax (their mean, subtracted before quantizing)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // BNB_BLOCK)

    def companion_shapes(self) -> dict[str, tuple[int, ...]]:
        """The stored shape of `X.weight` ("") and of each tensor companion, by suffix."""
        shapes = {"": (-(-self.numel // 2), 1), "absmax": (self.n_blocks,), "quant_map": (16,)}
        if self.nested_blocksize is not None:
            shapes["nested_absmax"] = (-(-self.n_blocks // self.nested_blocksize),)
            shapes["nested_quant_map"] = (_NESTED_MAP_SIZE,)
        return shapes


def bnb_quantization_problem(q: dict[str, Any]) -> str | None:
    """Why a bitsandbytes `quantization_config` cannot be loaded (one sentence naming what to use), None if it can."""
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        return f"8-bit bitsandbytes checkpoints (load_in_8bit) are not supported: {_USE}"
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        return f"bitsandbytes checkpoints without load_in_4bit are not supported: {_USE}"
    quant_type = q.get("bnb_4bit_quant_type", "fp4")  # transformers' default when the key is absent
    if quant_type != "nf4":
        return f"bnb_4bit_quant_type={quant_type!r} is not supported (only NF4): {_USE}"
    storage = q.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        return f"bnb_4bit_quant_storage={storage!r} is not supported: save the 4-bit checkpoint with uint8 storage"
    return None


def is_bnb_companion(name: str, source: TensorSource) -> bool:
    """Whether `name` is part of a 4-bit weight's state (read with that weight, not a parameter of its own)."""
    weight, sep, suffix = name.partition(".weight.")
    return bool(sep) and suffix in _COMPANIONS and weight + ".weight" in source


def _state_key(source: TensorSource, weight: str) -> str | None:
    return next((k for k in (f"{weight}.{_STATE_PREFIX}{t}" for t in ("nf4", "fp4")) if k in source), None)


def read_bnb_state(source: TensorSource, weight: str) -> BnbQuantState | None:
    """The quantization state of checkpoint tensor `weight` (None: a plain tensor), read from its packed JSON (a few
    hundred bytes) and checked: NF4, blocks of 64, every companion present. ValueError naming what to use if not."""
    present = [s for s in _COMPANIONS if f"{weight}.{s}" in source]
    if not present:
        return None
    key = _state_key(source, weight)
    if key is None:
        raise ValueError(f"{weight} has bitsandbytes companions {present} but no {_STATE_PREFIX}nf4 state: {_USE}")
    try:
        packed = json.loads(bytes(source.get(key).cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key} is not bitsandbytes' packed JSON quant state ({e}): {_USE}") from None
    if not isinstance(packed, dict) or not isinstance(packed.get("shape"), list):
        raise ValueError(f"{key} holds no weight shape, so it is not bitsandbytes' packed quant state: {_USE}")
    if packed.get("quant_type") != "nf4" or not key.endswith("nf4"):
        raise ValueError(f"{weight} is bitsandbytes {packed.get('quant_type')!r}, not NF4: {_USE}")
    if packed.get("blocksize") != BNB_BLOCK:
        raise ValueError(
            f"{weight} has bitsandbytes blocksize {packed.get('blocksize')!r}; surogate loads blocksize "
            f"{BNB_BLOCK} (bitsandbytes' default, qnf4's block): quantize with blocksize={BNB_BLOCK}"
        )
    nested = packed.get("nested_blocksize")
    if nested is not None and (not isinstance(nested, int) or nested < 1):
        raise ValueError(f"{key} has nested_blocksize {nested!r}, not a positive block count: {_USE}")
    state = BnbQuantState(tuple(packed["shape"]), nested, float(packed.get("nested_offset", 0.0)))
    missing = [f"{weight}.{s}" for s in state.companion_shapes() if s and f"{weight}.{s}" not in source]
    if missing:
        raise ValueError(f"{weight} is a bitsandbytes 4-bit weight without {missing}: {_USE} with all its tensors")
    return state


def bnb_shape_problems(source: TensorSource, weight: str, state: BnbQuantState) -> list[str]:
    """'name got != want' for each stored tensor of a 4-bit weight whose header shape disagrees with its state."""
    problems = []
    for suffix, want in state.companion_shapes().items():
        name = f"{weight}.{suffix}" if suffix else weight
        if source.shape(name) != want:
            problems.append(f"{name} {source.shape(name)} != {want}")
    return problems


def _block_absmax(absmax: Tensor, state: BnbQuantState, nested_absmax: Tensor | None, nested_map: Tensor | None):
    """[n_blocks] fp32: each block's absmax, undoing the double quantization as bitsandbytes does (fp32, same order)."""
    if state.nested_blocksize is None:
        return absmax.float()
    n, group = absmax.numel(), state.nested_blocksize
    values = F.pad(nested_map.float()[absmax.long()], (0, -n % group)).view(-1, group)
    offset = torch.tensor(state.nested_offset, dtype=torch.float32)  # bitsandbytes adds it as an fp32 tensor
    return (values * nested_absmax.float()[:, None]).flatten()[:n] + offset


def dequantize_bnb_nf4(
    codes: Tensor,  # [ceil(numel / 2), 1] uint8, high nibble first
    absmax: Tensor,  # [n_blocks] fp32, or uint8 codes into nested_map when double-quantized
    state: BnbQuantState,
    dtype: torch.dtype,
    nested_absmax: Tensor | None = None,  # [ceil(n_blocks / nested_blocksize)] fp32
    nested_map: Tensor | None = None,  # [256] fp32 dynamic map
) -> Tensor:  # state.shape in `dtype`, computed in fp32 and rounded once
    from ops.nf4 import NF4

    idx = torch.stack([codes.view(-1) >> 4, codes.view(-1) & 0xF], dim=-1).flatten()[: state.numel].int()
    values = F.pad(NF4.to(codes.device)[idx], (0, -state.numel % BNB_BLOCK)).view(-1, BNB_BLOCK)
    scaled = values * _block_absmax(absmax, state, nested_absmax, nested_map).to(codes.device)[:, None]
    return scaled.flatten()[: state.numel].view(state.shape).to(dtype)


def read_bnb_weight(source: TensorSource, weight: str, state: BnbQuantState, dtype: torch.dtype) -> Tensor:
    """One 4-bit weight, dequantized to `dtype` on the source's device."""
    nested = state.nested_blocksize is not None
    return dequantize_bnb_nf4(
        source.get(weight),
        source.get(f"{weight}.absmax"),
        state,
        dtype,
        source.get(f"{weight}.nested_absmax") if nested else None,
        source.get(f"{weight}.nested_quant_map") if nested else None,
    )
