"""Row formats -> chat messages -> token ids with a per-token "train on this" mask.

Formats
  text          {"text": str}                                        whole text is trained, EOS appended
  instruction   {"instruction", "input"?, "output"} (Alpaca)         rendered as a user/assistant conversation
  conversation  {"messages": [{"role", "content"}]} (OpenAI) or
                {"conversations": [{"from": human|gpt|system, "value"}]} (ShareGPT)

Assistant masks. Templates differ in what they add around a turn (Qwen3 inserts an empty <think></think> block in the
last assistant turn and strips it from earlier ones), so we never assume a fixed layout. We render the whole
conversation once (`full`) and, for each assistant turn i, the prompt before it with the generation header
(`render(messages[:i], add_generation_prompt=True)`): that prompt must be a prefix of `full`, so the assistant text
starts right after it (or where the two diverge, for templates that add text to the generation prompt only).
The turn ends after its content plus the template's end-of-turn marker (what follows the content
in `render(messages[:i+1])`, e.g. "<|im_end|>"), so the model learns to stop. Character spans are mapped to tokens
with the fast tokenizer's offsets. This works for any template whose prompts are prefixes of the full conversation,
which is what generation relies on anyway; a row where it fails is reported as a bad row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from surogate.data.config import DataError

logger = logging.getLogger(__name__)

# ChatML, the format Qwen models use; applied when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OPENAI_ROLES = ("system", "user", "assistant", "tool")


class RowError(Exception):
    """One row does not fit its format; collected by the loader into a DataError (or skipped)."""


def detect_format(columns: Iterable[str]) -> str:
    """Pick the format from a source's column names; raises DataError naming the columns when none fits."""
    cols = set(columns)
    if "messages" in cols or "conversations" in cols:
        return "conversation"
    if "instruction" in cols and "output" in cols:
        return "instruction"
    if "text" in cols:
        return "text"
    raise DataError(
        f"cannot detect the data format from columns {sorted(cols)}: expected 'messages' or 'conversations' "
        "(conversation), 'instruction'+'output' (instruction) or 'text' (text)"
    )


def row_to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]] | str:
    """Normalize one row: a list of {role, content} messages, or a plain string for the text format."""
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text:
            raise RowError("missing or empty 'text'")
        return text
    if fmt == "instruction":
        instruction, inp, output = row.get("instruction"), row.get("input"), row.get("output")
        if not isinstance(instruction, str) or not instruction or not isinstance(output, str) or not output:
            raise RowError("missing or empty 'instruction'/'output'")
        if inp is not None and not isinstance(inp, str):
            raise RowError("'input' is not a string")
        prompt = f"{instruction}\n\n{inp}" if inp else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "conversation":
        if row.get("messages") is not None:
            return _openai_messages(row["messages"])
        if row.get("conversations") is not None:
            return _sharegpt_messages(row["conversations"])
        raise RowError("missing 'messages'/'conversations'")
    raise ValueError(f"unknown format {fmt!r}")


def _openai_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RowError("'messages' is not a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in OPENAI_ROLES or not isinstance(m.get("content"), str):
            raise RowError("a message lacks a valid 'role' or string 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("no assistant message")
    return out


def _sharegpt_messages(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise RowError("'conversations' is not a non-empty list")
    out = []
    for t in turns:
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise RowError("a turn lacks a valid 'from' (human/gpt/system) or string 'value'")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("no gpt turn")
    return out


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or ChatML (with a one-line notice) when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    logger.warning("tokenizer has no chat template; formatting conversations as ChatML (<|im_start|>role ...)")
    return CHATML_TEMPLATE


def render_conversation(
    tokenizer: Any, messages: list[dict[str, str]], template: str, train_on_inputs: bool
) -> tuple[str, list[tuple[int, int]]]:
    """Render messages to text and the character spans that carry loss (assistant turns + their end marker)."""

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    try:
        full = render(messages, False)
    except Exception as e:  # a template may reject a role order (e.g. two user turns in a row)
        raise RowError(f"chat template failed: {e}") from e
    if train_on_inputs:
        return full, [(0, len(full))]
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prompt, with_turn = render(messages[:i], True), render(messages[: i + 1], False)
        except Exception as e:
            raise RowError(f"chat template failed on a prefix: {e}") from e
        # Normally the generation prompt is a prefix of the full text. Some templates put extra text in the
        # generation prompt only (e.g. an empty <think></think> block): start where the two texts diverge then.
        start = len(prompt) if full.startswith(prompt) else len(os.path.commonprefix([prompt, full]))
        if start < cursor:
            raise RowError("chat template renders the prompt before an assistant turn inconsistently")
        content = m["content"].strip()
        idx = full.find(content, start) if content else start
        if idx < 0:
            raise RowError("assistant content not found in the rendered conversation")
        end = idx + len(content)
        # The end-of-turn marker is whatever the template writes after the content, e.g. "<|im_end|>".
        if content and content in with_turn:
            marker = with_turn[with_turn.rindex(content) + len(content) :].rstrip()
            if marker and full.startswith(marker, end):
                end += len(marker)
        spans.append((start, end))
        cursor = end
    return full, spans


def tokenize_with_spans(tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple]:
    """Batch-tokenize texts; returns (ids, trained) per text where trained[t] says token t lies in a loss span."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        trained, j = [], 0
        for s, e in offsets:
            while j < len(sp) and sp[j][1] <= s:
                j += 1
            # A token belongs to a span if it starts inside it (byte-level tokens never straddle a special token).
            trained.append(j < len(sp) and sp[j][0] <= s < sp[j][1] and e > s)
        out.append((ids, trained))
    return out
