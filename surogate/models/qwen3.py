"""Qwen3 decoder (dense, and MoE via `num_experts`; Llama is the same block without QK-norm) in plain PyTorch.

Reads top to bottom like the paper: RMSNorm -> rotary embedding -> grouped-query attention (with per-head RMSNorm
on q and k for Qwen3) -> SwiGLU MLP -> pre-norm residual block -> the causal LM. Module paths equal Hugging Face's,
so `state_dict()` keys are checkpoint keys and `apply_lora` sees plain `nn.Linear` projections. Qwen3-MoE is the
same block with `mlp` a `SparseMoeBlock` (surogate/models/moe.py) on the layers `ModelArgs.is_moe_layer` selects.

Written for graph capture: everything that depends on the batch contents (the document mask, RoPE cos/sin) is
computed once per forward in `Qwen3Model.forward`, outside the blocks; a block is `block(x, cos, sin, mask) -> x`
with no data-dependent Python control flow, which is what the trainer compiles with `fullgraph=True`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surogate.attention import attention, build_doc_mask, resolve_backend, resolve_causal_kernel
from surogate.loss import chunked_lm_loss
from surogate.models.moe import SparseMoeBlock

__all__ = ["ModelArgs", "Qwen3ForCausalLM", "Qwen3Block", "RMSNorm"]


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qk_norm: bool = True  # Qwen3: True; Llama: False
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    rope_scaling: dict | None = None  # None (default RoPE) or Llama 3's {"rope_type": "llama3", "factor", ...}
    # Qwen3-MoE (num_experts 0: dense). Layer i is sparse unless i in mlp_only_layers or (i + 1) % decoder_sparse_step;
    # dense layers of an MoE model use intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            raise ValueError(f"rope_scaling must be None or rope_type 'llama3', got {self.rope_scaling}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0: dense model), got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                    f"got {self.num_experts_per_tok}"
                )
            if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
                raise ValueError(
                    f"an MoE model needs moe_intermediate_size >= 1 and decoder_sparse_step >= 1, got "
                    f"{self.moe_intermediate_size} and {self.decoder_sparse_step}"
                )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Hugging Face's rule for which Qwen3-MoE layers have a sparse MLP."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """Read a Hugging Face config.json (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        model_type = cfg.get("model_type")
        if model_type not in ("qwen3", "qwen3_moe", "llama"):
            raise ValueError(
                f"unsupported architecture: model_type {model_type!r} ({cfg.get('architectures')}); "
                "surogate loads 'qwen3', 'qwen3_moe' and 'llama' checkpoints"
            )
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias") or cfg.get("use_sliding_window"):
            raise ValueError(f"unsupported {model_type} variant: needs hidden_act silu, no mlp_bias, no sliding window")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r}: surogate implements 'default' and 'llama3'")
        moe = {}
        if model_type == "qwen3_moe":
            moe = dict(
                num_experts=cfg.get("num_experts", cfg.get("num_local_experts", 0)),
                num_experts_per_tok=cfg.get("num_experts_per_tok", 0),
                moe_intermediate_size=cfg.get("moe_intermediate_size", 0),
                norm_topk_prob=cfg.get("norm_topk_prob", False),  # transformers' Qwen3MoeConfig default
                decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            )
        try:
            heads = cfg["num_attention_heads"]
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                qk_norm=model_type in ("qwen3", "qwen3_moe"),
                max_position_embeddings=cfg.get("max_position_embeddings", 40960),
                attention_bias=cfg.get("attention_bias", False),
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": "llama3"},
                **moe,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from None

    def to_hf_config(self) -> dict:
        """A config.json dict that transformers 4.x and 5.x both read (legacy rope keys, which 5.x converts)."""
        qwen = self.qk_norm
        scaling = (
            None if self.rope_scaling is None else {k: v for k, v in self.rope_scaling.items() if k != "rope_theta"}
        )
        moe = {}
        if self.num_experts:
            moe = {
                "architectures": ["Qwen3MoeForCausalLM"],
                "model_type": "qwen3_moe",
                "num_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok,
                "moe_intermediate_size": self.moe_intermediate_size,
                "norm_topk_prob": self.norm_topk_prob,
                "decoder_sparse_step": self.decoder_sparse_step,
                "mlp_only_layers": list(self.mlp_only_layers),
            }
        return {
            "architectures": ["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen3" if qwen else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            **moe,
        }

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """Normalize in fp32, scale in the input dtype (the order Hugging Face uses, so bf16 results match)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, with Llama 3's long-context rescaling when configured."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling  # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin of the D/2 angles as [B, S, 1, head_dim / 2] in `dtype` (pair (i, i + D/2) turns by angle i, so the
    two halves of HF's [B, S, 1, head_dim] cos/sin are equal: one is enough, and the fused q/k/v op reads one);
    angles in fp32 (positions up to ~1e5 need the mantissa)."""
    freqs = (position_ids[..., None].float() * inv_freq)[:, :, None, :]  # [B, S, 1, D/2]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x: [B, S, H, D] (the "rotate half" layout of HF checkpoints). cos/sin: one
    half ([..., D/2], `rope_cos_sin`) or both ([..., D])."""
    if cos.shape[-1] != x.shape[-1]:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    causal_kernel: str = "cudnn"  # rows of one document on CUDA (surogate/attention.py; set_causal_kernel below)

    def __init__(self, args: ModelArgs, backend: str):
        super().__init__()
        self.backend = backend
        self.head_dim = args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=bias)
        if args.qk_norm:  # Qwen3 normalizes each head of q and k before RoPE
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim)  # [B, S, Hq, D]
        k = self.k_proj(x).view(B, S, -1, self.head_dim)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(B, S, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.backend, self.causal_kernel)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is sparse on MoE layers."""

    def __init__(self, args: ModelArgs, backend: str, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, backend)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = SparseMoeBlock(args) if args.is_moe_layer(layer_idx) else MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs, backend: str):
        super().__init__()
        self.args = args
        self.backend = backend
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Qwen3Block(args, backend, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """position_ids None: every row is one document at positions 0..S-1 (plain causal attention)."""
        x = self.embed_tokens(input_ids)  # [B, S, hidden]
        if position_ids is None:
            position_ids, mask = torch.arange(input_ids.shape[1], device=x.device).expand_as(input_ids), None
        else:
            mask = build_doc_mask(position_ids, self.backend)
        # Once per forward, shared by all blocks. inv_freq is recomputed rather than kept as a buffer so meta
        # init, `.to(bf16)` and FSDP can never touch its fp32 values.
        cos, sin = rope_cos_sin(position_ids, rope_inv_freq(self.args, x.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    # The loss skips the LM head on rows without a label (one host sync per forward: surogate/loss.py); False
    # computes every row instead, which CUDA graph capture needs (surogate/cuda_graphs.py sets it).
    select_loss_rows: bool = True
    # The LM head's two GEMMs (logits, and their dX) in FP8 (`precision.fp8_lm_head`; set by surogate.parallelize).
    fp8_lm_head: bool = False

    def __init__(self, args: ModelArgs, attn_backend: str = "sdpa"):
        super().__init__()
        self.args = args
        self.model = Qwen3Model(args, attn_backend)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tied checkpoints share one tensor; call again after anything that reassigns parameters."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attn_backend(self, backend: str) -> None:
        backend = resolve_backend(backend, self.lm_head.weight.device)
        self.model.backend = backend
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    def set_causal_kernel(self, name: str, device: torch.device | str | None = None) -> str:
        """Choose the kernel of plain causal attention (rows of one document; surogate/attention.py) for the
        device the model runs on (default: where its weights are); returns the resolved name."""
        device = self.lm_head.weight.device if device is None else device
        kernel = resolve_causal_kernel(name, device, self.args.head_dim)
        for layer in self.model.layers:
            layer.self_attn.causal_kernel = kernel
        return kernel

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, labels: torch.Tensor | None = None):
        """labels None -> logits [B, S, V]; else (loss_sum fp32, num_tokens int64) without full logits.
        position_ids None: one document per row (`surogate.attention.one_document_per_row`).

        labels [B, S] are already next-token targets (labels[t] = input_ids[t + 1] of the same document, or -100),
        as surogate.data builds them: the model does not shift, unlike Hugging Face's `labels=input_ids`.
        """
        h = self.model(input_ids, position_ids)
        if labels is None:
            return self.lm_head(h)
        if type(self.lm_head) is not nn.Linear:
            raise ValueError("the chunked loss reads lm_head.weight directly: do not wrap lm_head (e.g. with LoRA)")
        return chunked_lm_loss(
            h.flatten(0, 1), self.lm_head.weight, labels.flatten(), select_valid=self.select_loss_rows,
            fp8=self.fp8_lm_head,
        )  # fmt: skip
