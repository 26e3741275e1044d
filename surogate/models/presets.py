"""Model shapes by name: Qwen3 dense and Qwen3-30B-A3B (random init, for benchmarks), `tiny` for tests and the demo.

A preset is only a `ModelArgs`; `load_model("qwen3-8b", device)` builds it with random weights directly on the
device. `tiny.vocab_size` matches the bundled demo tokenizer; override it with `dataclasses.replace` otherwise.
"""

from __future__ import annotations

from surogate.models.qwen3 import ModelArgs

__all__ = ["PRESETS", "TINY_VOCAB_SIZE"]

QWEN3_VOCAB_SIZE = 151936
TINY_VOCAB_SIZE = 4096  # the bundled demo tokenizer (surogate/data/assets/tokenizer)


def _qwen3(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, tied: bool) -> ModelArgs:
    return ModelArgs(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=128,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )


PRESETS: dict[str, ModelArgs] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, tied=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8, tied=False),
    "qwen3-30b-a3b": ModelArgs(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=2048,
        intermediate_size=6144,  # config.json's value; unused, every layer is sparse
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
    ),
    "tiny": ModelArgs(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}
