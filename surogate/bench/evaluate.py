"""Task accuracy and held-out loss of a base checkpoint, optionally with a PEFT adapter, through transformers + PEFT.

Evaluation deliberately runs outside our trainer: the exported adapter is loaded onto the unquantized base with
`peft.PeftModel.from_pretrained`, exactly as a user would serve it, so the number measures what the recipe's training
produced, not how our model runs it. Accuracy is exact match of the final number of a greedy completion (batched,
left padding); its standard error is the binomial sqrt(p (1 - p) / n). Eval loss is the token-weighted
cross-entropy of the reference solutions given their prompts, on exactly the tokens training puts loss on (the
assistant turn and its end marker, via surogate.data's own rendering and masking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from surogate.bench.arith import extract_answer
from surogate.data.formats import chat_template_of, render_conversation, tokenize_with_spans
from surogate.data.packing import IGNORE_INDEX, shift_labels

__all__ = ["EvalResult", "load_for_eval", "generate", "score", "eval_loss", "max_new_tokens_for", "evaluate"]


@dataclass
class EvalResult:
    accuracy: float
    stderr: float
    correct: int
    n: int
    formatted: float  # share of completions that end in "#### <number>" (the trained format)
    eval_loss: float
    samples: list[dict]  # a few (question, completion, expected) triples for the report


def load_for_eval(base_dir: str | Path, adapter_dir: str | Path | None, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer): the base checkpoint in `dtype`, with the adapter applied (not merged) when given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, local_files_only=True).to(device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tok


def _prompt(tok, problem: dict) -> str:
    user = [m for m in problem["messages"] if m["role"] != "assistant"]
    return tok.apply_chat_template(
        user, chat_template=chat_template_of(tok), tokenize=False, add_generation_prompt=True
    )


def max_new_tokens_for(tok, problems: list[dict], slack: float = 1.25) -> int:
    """Room for the longest reference solution plus 25% (and its end marker)."""
    longest = max(len(tok(p["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for p in problems)
    return int(longest * slack) + 8


@torch.no_grad()
def generate(model, tok, problems: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy completions in input order; prompts are batched by length so little padding is computed."""
    prompts = [_prompt(tok, p) for p in problems]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
        )
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            out[i] = text.strip()
    return out


def score(completions: list[str], answers: list[int | str]) -> tuple[float, float, int, float]:
    """(accuracy, binomial standard error, correct count, share in the `#### n` format)."""
    n = len(answers)
    correct = sum(extract_answer(c) == str(a) for c, a in zip(completions, answers))
    formatted = sum("####" in c and extract_answer(c.rsplit("####", 1)[1]) is not None for c in completions) / n
    p = correct / n
    return p, math.sqrt(p * (1 - p) / n), correct, formatted


@torch.no_grad()
def eval_loss(model, tok, problems: list[dict], batch_size: int) -> float:
    """Token-weighted mean cross-entropy over the trained tokens of the reference conversations."""
    template = chat_template_of(tok)
    rendered = [render_conversation(tok, p["messages"], template, train_on_inputs=False) for p in problems]
    tokenized = tokenize_with_spans(tok, [t for t, _ in rendered], [s for _, s in rendered])
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, len(tokenized), batch_size):
        chunk = tokenized[b : b + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (seq, trained) in enumerate(chunk):  # right padding: positions stay 0..len-1
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, : len(seq)] = torch.tensor(shift_labels(seq, trained))
            mask[r, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        labels = labels.to(device)
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate(
    base_dir: str | Path,
    adapter_dir: str | Path | None,
    problems: list[dict],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    max_new_tokens: int | None = None,
) -> EvalResult:
    model, tok = load_for_eval(base_dir, adapter_dir, device, dtype)
    budget = max_new_tokens or max_new_tokens_for(tok, problems)
    completions = generate(model, tok, problems, batch_size, budget)
    acc, se, correct, formatted = score(completions, [p["answer"] for p in problems])
    loss = eval_loss(model, tok, problems, batch_size)
    samples = [
        {"question": p["messages"][0]["content"], "completion": c, "expected": p["answer"]}
        for p, c in list(zip(problems, completions))[:3]
    ]
    del model
    return EvalResult(acc, se, correct, len(problems), formatted, loss, samples)
