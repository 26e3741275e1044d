import copy
import logging

import pytest

from surogate.data import IGNORE_INDEX, DataConfig, DataError, build_dataset
from surogate.data.formats import (
    CHATML_TEMPLATE,
    RowError,
    detect_format,
    render_conversation,
    row_to_messages,
    tokenize_with_spans,
)
from surogate.data.packing import shift_labels

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "Reverse 'abc'."},
    {"role": "assistant", "content": "cba"},
]

# Qwen3-like: the last assistant turn after the last user query gets an empty think block, earlier ones do not,
# so incremental renders are not prefixes of the full conversation.
QWEN3_LIKE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def labeled_text(tok, messages, template, train_on_inputs=False):
    text, spans = render_conversation(tok, messages, template, train_on_inputs)
    ((ids, trained),) = tokenize_with_spans(tok, [text], [spans])
    labels = shift_labels(ids, trained)
    return ids, labels, tok.decode([t for t in labels if t != IGNORE_INDEX])


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["messages"], "conversation"),
        (["conversations", "id"], "conversation"),
        (["instruction", "input", "output"], "instruction"),
        (["text", "meta"], "text"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_unknown_columns():
    with pytest.raises(DataError, match="cannot detect.*'prompt'"):
        detect_format(["prompt", "completion"])


def test_row_to_messages_variants():
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert [m["role"] for m in row_to_messages(sharegpt, "conversation")] == ["system", "user", "assistant"]
    inst = row_to_messages({"instruction": "Add", "input": "1 and 2", "output": "3"}, "instruction")
    assert inst == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    assert row_to_messages({"instruction": "Hi", "input": "", "output": "Hello"}, "instruction")[0]["content"] == "Hi"
    for bad, fmt in [({"text": ""}, "text"), ({"instruction": "x"}, "instruction"), ({"messages": []}, "conversation"),
                     ({"messages": [{"role": "user", "content": "q"}]}, "conversation"),
                     ({"conversations": [{"from": "robot", "value": "q"}]}, "conversation")]:  # fmt: skip
        with pytest.raises(RowError):
            row_to_messages(bad, fmt)


def test_labels_only_on_assistant_turns(tok):
    ids, labels, text = labeled_text(tok, CONV, tok.chat_template)
    assert text == "2 + 3 = 5.<|im_end|>cba<|im_end|>"
    assert labels[-1] == IGNORE_INDEX and len(labels) == len(ids)
    # Each label is the next input token (data-side shift).
    assert all(lab == nxt for lab, nxt in zip(labels, ids[1:]) if lab != IGNORE_INDEX)


def test_train_on_inputs_labels_everything(tok):
    ids, labels, _ = labeled_text(tok, CONV, tok.chat_template, train_on_inputs=True)
    assert labels == ids[1:] + [IGNORE_INDEX]


def test_template_with_inconsistent_turns(tok):
    _, _, text = labeled_text(tok, CONV, QWEN3_LIKE)
    # Earlier turn: content + end marker; last turn also learns the (empty) think block the template writes.
    assert text == "2 + 3 = 5.<|im_end|><think>\n\n</think>\n\ncba<|im_end|>"


def test_template_with_think_in_generation_prompt(tok):
    # Some Qwen3 derivatives also put the empty think block into the generation prompt, so the prompt before an
    # earlier assistant turn is not a prefix of the full conversation.
    template = QWEN3_LIKE.replace(
        "'<|im_start|>assistant\\n' }}{%- endif %}",
        "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}",
    )
    assert template != QWEN3_LIKE
    _, _, text = labeled_text(tok, CONV, template)
    assert text == "2 + 3 = 5.<|im_end|>cba<|im_end|>"


def test_user_text_repeated_in_answer_is_not_trained(tok):
    msgs = [{"role": "user", "content": "Say: cba"}, {"role": "assistant", "content": "cba"}]
    _, _, text = labeled_text(tok, msgs, tok.chat_template)
    assert text == "cba<|im_end|>"


def test_chatml_fallback_warns(tok, jsonl, caplog):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    path = jsonl([{"messages": CONV}])
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(DataConfig(paths=[path], sequence_len=128), bare)
    assert any("ChatML" in r.message for r in caplog.records)
    ref = build_dataset(DataConfig(paths=[path], sequence_len=128), tok)  # bundled template is ChatML too
    assert ds.input_ids.equal(ref.input_ids) and ds.labels.equal(ref.labels)
    assert tok.chat_template == CHATML_TEMPLATE


def test_instruction_and_text_formats(tok, jsonl):
    inst = jsonl([{"instruction": "Reverse 'ab'.", "input": "", "output": "ba"}], "i.jsonl")
    ds = build_dataset(DataConfig(paths=[inst], sequence_len=64, sample_packing=False), tok)
    trained = [t for t in ds.labels[0].tolist() if t != IGNORE_INDEX]
    assert tok.decode(trained) == "ba<|im_end|>"
    text = jsonl([{"text": "hello world"}], "t.jsonl")
    ds = build_dataset(DataConfig(paths=[text], sequence_len=64, sample_packing=False), tok)
    n = int((ds.position_ids[0] == 0).nonzero()[1])  # start of the padding document
    assert tok.decode(ds.input_ids[0, :n]) == "hello world<|endoftext|>"  # document end token appended, trained
    assert ds.labels[0, : n - 1].tolist() == ds.input_ids[0, 1:n].tolist()
