"""Bad input, one test each: `surogate.train.main` prints one `error:` line, exits 2, and writes nothing.

Every case here fails in preflight, before any weights are read; none of them trains.
"""

import dataclasses
import json
import logging
import shutil

import pytest
import torch

from surogate.config import load_config
from surogate.data.config import BUNDLED_TOKENIZER
from surogate.models.presets import PRESETS
from surogate.train import main, preflight

FAST = ["compile=false", "dtype=fp32", "device=cpu", "sequence_len=64", "max_samples=16"]


def _refused(capsys, out_dir, args, needle):
    """Run main, expect exit 2 with `needle` in a single error line, no traceback, and no output_dir."""
    with pytest.raises(SystemExit) as e:
        main([f"output_dir={out_dir}", *FAST, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert not out_dir.exists(), sorted(p.name for p in out_dir.iterdir())
    return errors[0]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _model_dir(path, weights="model.safetensors", **config):
    """A checkpoint directory that passes inspection (config.json + a weight file name; preflight reads no weights)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**PRESETS["tiny"].to_hf_config(), **config}))
    (path / weights).write_bytes(b"")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{BUNDLED_TOKENIZER}/{f}", path / f)
    return path


# --------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "args,needle",
    [
        (["learnign_rate=1e-4"], "unknown option 'learnign_rate' in the command line (did you mean 'learning_rate'?)"),
        (["lora_rank=abc"], "lora_rank='abc' is not valid: set it to an integer"),
        (["lora_dropout=1.5"], "lora_dropout=1.5 must be in [0, 1)"),
        (["per_device_train_batch_size=0"], "per_device_train_batch_size=0 must be >= 1"),
        (["recipe=fp9"], "unknown recipe 'fp9': available recipes are bf16, fp4, fp8, qfp4, qfp8, qnf4"),
        (["lora_target_modules=[q_proj,qkv_proj]"], "'qkv_proj' is not a linear layer of Qwen3"),
        (["sequence_len=50000"], "sequence_len=50000 is longer than the model's max_position_embeddings (40960)"),
        (["output_dir=${oc.env:HOME}"], "is an interpolation"),
        (["datasets=[a.jsonl"], "cannot parse command line"),
        (["attn_causal_kernel=flash4"], "attn_causal_kernel: causal attention kernel 'flash4' needs the flash-attn-4"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "out-of-range",
        "zero-batch",
        "unknown-recipe",
        "lora-target",
        "seq-len",
        "resolver",
        "yaml-syntax",
        "flash4-on-cpu",
    ],
)
def test_bad_option(tmp_path, capsys, args, needle):
    _refused(capsys, tmp_path / "run", args, needle)


def test_config_file_cannot_run_code(tmp_path, capsys):
    """yaml tags that construct Python objects are refused (safe loader), and so are resolvers like oc.env."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    _refused(capsys, tmp_path / "run", [f"config={bad}"], "cannot parse config")
    assert not marker.exists()
    env = tmp_path / "env.yaml"
    env.write_text("output_dir: ${oc.env:HOME}/x\n")
    _refused(capsys, tmp_path / "run", [f"config={env}"], "output_dir='${oc.env:HOME}/x' in config file")


def test_fp8_recipe_on_a_gpu_without_fp8(tmp_path, capsys, monkeypatch):
    """An A100 (compute capability 8.0) is told why fp8 cannot run and what to use instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    args = ["recipe=fp8", "device=cuda", "dtype=auto"]
    line = _refused(capsys, tmp_path / "run", args, "recipe=fp8 needs FP8 tensor cores (compute capability >= 8.9")
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in line and "use recipe=bf16" in line
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    _refused(capsys, tmp_path / "run", ["device=cuda", "dtype=bf16"], "bf16 needs compute capability >= 8.0")


# ----------------------------------------------------------------------------------------------------- model


def test_model_path_missing(tmp_path, capsys):
    _refused(capsys, tmp_path / "run", [f"model={tmp_path / 'nope'}"], "is not a directory (and not a preset")


def test_model_dir_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    _refused(capsys, tmp_path / "run", [f"model={tmp_path / 'm'}"], "has no config.json")


def test_unsupported_architecture(tmp_path, capsys):
    m = _model_dir(tmp_path / "m", model_type="mistral", architectures=["MistralForCausalLM"])
    _refused(capsys, tmp_path / "run", [f"model={m}"], "unsupported architecture: model_type 'mistral'")


def test_pickle_only_checkpoint_is_refused(tmp_path, capsys):
    m = _model_dir(tmp_path / "m", weights="pytorch_model.bin")
    line = _refused(capsys, tmp_path / "run", [f"model={m}"], "holds only pickle checkpoints (pytorch_model.bin)")
    assert "allow_pickle" in line


FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
BNB_QUANT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4"}


@pytest.mark.parametrize(
    "quant,recipe,needle",
    [
        ({"quant_method": "awq", "bits": 4}, "bf16", "quantization_config.quant_method='awq' is not supported"),
        ({**FP8_QUANT, "weight_block_size": None}, "qfp8", "FP8 weight_block_size=None is not supported"),
        ({**FP8_QUANT, "activation_scheme": "static"}, "qfp8", "activation_scheme='static' is not supported"),
        (FP8_QUANT, "qnf4", "is an FP8 checkpoint (quantization_config.quant_method=fp8) and recipe=qnf4 would"),
        ({**BNB_QUANT, "load_in_4bit": False, "load_in_8bit": True}, "bf16", "8-bit bitsandbytes checkpoints (load_in"),
        ({**BNB_QUANT, "bnb_4bit_quant_type": "fp4"}, "qnf4", "bnb_4bit_quant_type='fp4' is not supported (only NF4)"),
        (BNB_QUANT, "qfp4", "is a bitsandbytes NF4 checkpoint (quantization_config.quant_method=bitsandbytes) and"),
    ],
    ids=["unknown-method", "per-tensor-fp8", "static-activations", "fp8-for-qnf4", "bnb-8bit", "bnb-fp4", "bnb-qfp4"],
)
def test_quantized_checkpoint_refused(tmp_path, capsys, quant, recipe, needle):
    m = _model_dir(tmp_path / "m", quantization_config=quant)
    _refused(capsys, tmp_path / "run", [f"model={m}", f"recipe={recipe}"], needle)


def test_tokenizer_without_chat_template_falls_back_to_chatml(tmp_path, caplog):
    m = _model_dir(tmp_path / "m")
    tok_cfg = json.loads((m / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template")
    (m / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with caplog.at_level(logging.WARNING):
        plan = preflight(load_config([f"model={m}", f"output_dir={tmp_path / 'run'}", *FAST]))
    assert "formatting conversations as ChatML" in caplog.text
    assert len(plan.dataset) > 0 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------ data


def test_dataset_missing(tmp_path, capsys):
    _refused(capsys, tmp_path / "run", [f"datasets={tmp_path / 'nope.jsonl'}"], "nope.jsonl: no such file")


def test_dataset_empty(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    _refused(capsys, tmp_path / "run", [f"datasets={tmp_path / 'empty.jsonl'}"], "the file is empty")


def test_dataset_unreadable(tmp_path, capsys):
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": "cut short\n')
    _refused(capsys, tmp_path / "run", [f"datasets={tmp_path / 'broken.jsonl'}"], "cannot be read as json")
    (tmp_path / "data.txt").write_text("hello\n")
    _refused(capsys, tmp_path / "run", [f"datasets={tmp_path / 'data.txt'}"], "unsupported file type '.txt'")


def _instruction_rows(n, bad):
    return [{"instruction": f"Say {i}.", **({} if i in bad else {"output": f"{i}"})} for i in range(1, n + 1)]


def test_rows_missing_fields_are_reported_by_row_number(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", _instruction_rows(20, bad={3, 7}))
    line = _refused(capsys, tmp_path / "run", [f"datasets={data}"], "2 of 20 rows do not fit the instruction format")
    assert "rows 3 (missing or empty 'instruction'/'output'), 7 (" in line and "skip_bad_rows=true" in line


def test_bad_row_past_the_quick_check_still_fails_before_anything_is_written(tmp_path, capsys):
    """validate_data reads only the first rows; the full build in preflight catches row 60 before any write."""
    data = _jsonl(tmp_path / "d.jsonl", _instruction_rows(64, bad={60}))
    _refused(capsys, tmp_path / "run", [f"datasets={data}", "max_samples=null"], "rows 60 (")


def test_skip_bad_rows_skips_and_counts(tmp_path, caplog):
    data = _jsonl(tmp_path / "d.jsonl", _instruction_rows(20, bad={3, 7}))
    with caplog.at_level(logging.INFO):
        plan = preflight(load_config([f"datasets={data}", "skip_bad_rows=true", f"output_dir={tmp_path / 'r'}", *FAST]))
    assert "skipped 2 of 16 rows that do not fit the instruction format" in caplog.text
    assert (
        plan.dataset.stats.num_bad_rows == 2 and plan.dataset.stats.num_samples == 14
    )  # max_samples=16, 2 of them bad


def test_too_little_data_for_one_batch(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", _instruction_rows(2, bad=set()))
    _refused(capsys, tmp_path / "run", [f"datasets={data}", "per_device_train_batch_size=8"], "fewer than one batch")


# ------------------------------------------------------------------------------------------------ output_dir


def test_output_dir_holding_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "checkpoint-5").mkdir()
    with pytest.raises(SystemExit) as e:
        main([f"output_dir={out}", *FAST])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "already holds a run" in err and "overwrite_output_dir=true" in err
    assert "resume_from_checkpoint=true" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", "metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def _moe_model_dir(path, **moe):
    """A tiny Qwen3-MoE checkpoint directory that passes inspection (no weights are read)."""
    moe_config = dataclasses.replace(PRESETS["tiny"], num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    return _model_dir(path, **{**moe_config.to_hf_config(), **moe})


@pytest.mark.parametrize(
    "targets,moe,needle",
    [
        ("[q_proj,gate_proj,down_proj]", {}, "has gate_proj but not up_proj: PEFT fuses"),
        ("[q_proj,gate_proj,up_proj]", {"mlp_only_layers": [1]}, "has dense MLP layers"),
        ("[q_proj,gate]", None, "'gate' is the Qwen3-MoE router and this model is dense"),
    ],
    ids=["gate-without-up", "dense-layers-of-moe", "router-of-dense"],
)
def test_lora_targets_a_peft_adapter_cannot_hold_are_refused(tmp_path, capsys, targets, moe, needle):
    """Refused up front, not when the adapter is written after hours of training."""
    model = _model_dir(tmp_path / "dense") if moe is None else _moe_model_dir(tmp_path / "moe", **moe)
    _refused(capsys, tmp_path / "run", [f"model={model}", f"lora_target_modules={targets}"], needle)
