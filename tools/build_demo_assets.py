"""Regenerate the bundled demo dataset and tokenizer (deterministic; run from the repo root).

    python tools/build_demo_assets.py

Writes surogate/data/assets/demo.jsonl (templated Q&A conversations in OpenAI `messages` format that a tiny model
can visibly learn: worked arithmetic, unit conversions, capitals, string reversal and letter counting) and
surogate/data/assets/tokenizer/ (byte-level BPE trained on that data, vocab exactly 4096, Qwen-style special tokens
and a ChatML chat template), so the default job needs nothing from the network.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent.parent / "surogate" / "data" / "assets"
VOCAB_SIZE = 4096
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NUM_SAMPLES = 400
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Brazil": "Brasilia",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Mexico": "Mexico City", "Chile": "Santiago",
    "Australia": "Canberra", "Ireland": "Dublin", "Austria": "Vienna", "Finland": "Helsinki", "Vietnam": "Hanoi",
}  # fmt: skip
WORDS = "apple river planet garden silver window rocket pencil candle forest orange bridge castle dragon mirror".split()
UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60)]
SYSTEM = "You are a helpful assistant."


def addition(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    ones = a % 10 + b % 10
    carry = ones // 10
    work = f"Ones: {a % 10} + {b % 10} = {ones}" + (", carry 1" if carry else "")
    work += f". Tens: {a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {a // 10 + b // 10 + carry}."
    return f"What is {a} + {b}?", f"{work} So {a} + {b} = {a + b}."


def multiplication(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} x {b} = {a * b}."


def conversion(r: random.Random) -> tuple[str, str]:
    src, dst, factor = r.choice(UNITS)
    n = r.randint(2, 20)
    return (
        f"Convert {n} {src} to {dst}.",
        f"1 {src} is {factor} {dst}, so {n} {src} = {n} x {factor} = {n * factor} {dst}.",
    )


def capital(r: random.Random) -> tuple[str, str]:
    country = r.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def reverse(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"Reverse the word '{w}'.", f"Reversed, '{w}' is '{w[::-1]}'."


def count_letters(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters: {'-'.join(w)}."


TASKS = [addition, multiplication, conversion, capital, reverse, count_letters]


def make_samples(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    samples = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if r.random() < 0.3 else []
        for _turn in range(2 if r.random() < 0.15 else 1):  # some multi-turn conversations
            q, a = r.choice(TASKS)(r)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        samples.append({"messages": messages})
    return samples


def render_chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The demo text runs out of merges long before 4096: fill the vocab with unreachable reserved tokens so the
    # embedding has exactly VOCAB_SIZE rows (a round size, like real checkpoints' padded vocabs).
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    for i in range(VOCAB_SIZE - tok.get_vocab_size()):
        vocab[f"<|reserved_{i}|>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(state))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    samples = make_samples(NUM_SAMPLES)
    with open(ASSETS / "demo.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    tok = train_tokenizer([render_chatml(s["messages"]) for s in samples])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # as in Qwen3 chat checkpoints: generation stops at the end of the assistant turn
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    out = ASSETS / "tokenizer"
    fast.save_pretrained(out)
    # Keep the template inside tokenizer_config.json (one file; older and newer transformers both read it there).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # a class name every transformers 4.x/5.x resolves
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": SPECIAL[1:]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {len(samples)} samples and a {tok.get_vocab_size()}-token tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()
