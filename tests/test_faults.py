"""Faults: kill -9 during training and during a checkpoint save, SIGTERM, non-finite steps, CUDA out of memory.

The kill tests run `python -m surogate.train` as a real subprocess and kill it at a marker line; the resumed run
(in-process) must reproduce an uninterrupted run's loss curve exactly (CPU fp32: to 1e-6). Dropout and a warmup +
cosine schedule are on, so the RNG and scheduler states matter.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import surogate.models.qwen3 as qwen3
import surogate.trainer as trainer_mod
from surogate.checkpointing import list_checkpoints
from surogate.train import main

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "sequence_len=64",
    "per_device_train_batch_size=2",
    "lora_rank=4",
    "lora_alpha=8",
    "lora_dropout=0.1",
    "compile=false",
    "dtype=fp32",
    "device=cpu",
    "learning_rate=2e-3",
    "warmup_steps=2",
    "max_steps=6",
    "max_samples=24",
    "save_steps=2",
    "save_total_limit=2",
]
STEPS = 6


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's loss per step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([f"output_dir={out}", *RUN]) == 0
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _assert_same_curve(out, reference):
    got = _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    for step, loss in reference.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


def _run_until(out, marker, extra_env=None, action=signal.SIGKILL, timeout=240):
    """Start a training subprocess, send `action` when a line containing `marker` appears; return (rc, output)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "surogate.train", f"output_dir={out}", *RUN],
        cwd=out.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent and marker in line:
                proc.send_signal(action)
                sent = True
        rc = proc.wait()
    finally:
        watchdog.cancel()
    output = "".join(lines)
    assert sent, f"marker {marker!r} never appeared:\n{output}"
    return rc, output


def test_kill_9_during_training_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    rc, output = _run_until(out, "step 3/")
    assert rc == -signal.SIGKILL, output
    ckpts = list_checkpoints(out)
    assert ckpts and ckpts[-1].name in ("checkpoint-2", "checkpoint-4"), ckpts
    assert main([f"output_dir={out}", "resume_from_checkpoint=true", *RUN]) == 0
    _assert_same_curve(out, reference)


def test_kill_9_during_checkpoint_save_keeps_the_previous_one(tmp_path, reference):
    out = tmp_path / "run"
    rc, output = _run_until(out, "checkpoint-4.tmp written", {"SUROGATE_TEST_PAUSE_SAVE_AT_STEP": "4"})
    assert rc == -signal.SIGKILL, output
    assert (out / ".checkpoint-4.tmp" / "trainer_state.json").is_file()  # fully written, never renamed
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]  # the half-saved one is invisible
    assert main([f"output_dir={out}", "resume_from_checkpoint=true", *RUN]) == 0
    assert not (out / ".checkpoint-4.tmp").exists()  # the stale temp dir was cleaned up
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]  # save_total_limit=2
    _assert_same_curve(out, reference)


def test_sigterm_saves_and_prints_the_resume_command(tmp_path, reference):
    out = tmp_path / "run"
    rc, output = _run_until(out, "step 1/", action=signal.SIGTERM)
    assert rc == 0, output
    assert "SIGTERM: stopping after the current optimizer step" in output
    assert "Traceback" not in output
    stopped = max(int(p.name.split("-")[1]) for p in list_checkpoints(out))
    assert 1 <= stopped < STEPS and f"checkpoint saved to {out / f'checkpoint-{stopped}'}" in output
    command = output.split("Resume with:\n")[1].splitlines()[0].strip()
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "surogate.train"] and argv[-1] == "resume_from_checkpoint=true"
    assert main(argv[3:]) == 0  # the printed command, run in-process
    _assert_same_curve(out, reference)


# ----------------------------------------------------------------------------------------- non-finite steps


def _poison_forward(monkeypatch, bad_calls):
    """Make the model's loss NaN on the given (1-based) forward calls."""
    real = qwen3.Qwen3ForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss_sum, n_tok = real(self, *args, **kwargs)
        return (loss_sum * float("nan"), n_tok) if calls["n"] in bad_calls else (loss_sum, n_tok)

    monkeypatch.setattr(qwen3.Qwen3ForCausalLM, "forward", forward)


def test_a_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_forward(monkeypatch, {2})
    assert main([f"output_dir={out}", *RUN]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in rows] == [0, 1, 1, 1, 1, 1]
    assert rows[1]["loss"] is None and all(isinstance(r["loss"], float) for r in rows if r["step"] != 2)


def test_too_many_nan_steps_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _poison_forward(monkeypatch, set(range(3, 100)))
    with pytest.raises(SystemExit) as e:
        main([f"output_dir={out}", "max_bad_steps=2", *RUN])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert "2 optimizer steps in a row had a non-finite loss or gradient (max_bad_steps=2)" in err
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


# ---------------------------------------------------------------------------------------------------- OOM


def _oom_on_first_window(monkeypatch):
    """Raise CUDA OOM from the first micro-batch window of 2 rows (what a too-large micro batch does on a GPU)."""
    real = trainer_mod.Trainer.accumulate

    def accumulate(self, window):
        if window[0]["input_ids"].shape[0] == 2 and self.state.step == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, window)

    monkeypatch.setattr(trainer_mod.Trainer, "accumulate", accumulate)


def test_oom_says_what_to_change(tmp_path, monkeypatch, capsys):
    _oom_on_first_window(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main([f"output_dir={tmp_path / 'run'}", *RUN])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("error: CUDA out of memory"))
    assert "estimated need ~" in line and "peak" in line
    assert "per_device_train_batch_size=1 gradient_accumulation_steps=2 (same global batch)" in line
    assert "oom_retry=true" in line and "recompute=true" in line and "recipe=qfp8" in line


def test_oom_retry_halves_the_micro_batch_and_keeps_the_curve(tmp_path, monkeypatch, capsys):
    """Same rows per optimizer step, so the same curve up to float summation order. Without dropout: the masks of
    two half micro-batches are drawn in another order than those of one full one."""
    args = [*RUN, "lora_dropout=0.0"]
    assert main([f"output_dir={tmp_path / 'reference'}", *args]) == 0
    _oom_on_first_window(monkeypatch)
    out = tmp_path / "run"
    assert main([f"output_dir={out}", "oom_retry=true", *args]) == 0
    err = capsys.readouterr().err
    assert "retrying with per_device_train_batch_size=1 gradient_accumulation_steps=2" in err
    got, want = _losses(out), _losses(tmp_path / "reference")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["config"]["per_device_train_batch_size"] == 1 and state["config"]["gradient_accumulation_steps"] == 2


def test_oom_suggests_a_recipe_that_stores_fewer_bytes():
    from types import SimpleNamespace

    from surogate.oom import oom_message

    def suggestion(recipe: str) -> str:
        cfg = SimpleNamespace(
            recipe=recipe, per_device_train_batch_size=1, gradient_accumulation_steps=1, sequence_len=64,
            recompute=True, oom_retry=False,
        )  # fmt: skip
        return oom_message(cfg, None, torch.device("cpu"), 2)

    assert "recipe=qfp8 (" in suggestion("bf16") and "recipe=qfp8 (" in suggestion("fp4")
    assert "recipe=qfp4 (" in suggestion("qfp8") and "recipe=qnf4 (" in suggestion("qfp4")
    assert "recipe=" not in suggestion("qnf4")  # nothing stores less


def test_oom_suggests_dropping_the_transposed_fp8_codes():
    from types import SimpleNamespace

    from surogate.oom import oom_message

    def message(cache_transposed: str, compute: str = "fp8") -> str:
        precision = SimpleNamespace(weights="bf16", compute=compute, fp8_cache_transposed=cache_transposed)
        cfg = SimpleNamespace(
            recipe="fp8", precision=precision, per_device_train_batch_size=1, gradient_accumulation_steps=1,
            sequence_len=64, recompute=True, oom_retry=False,
        )  # fmt: skip
        return oom_message(cfg, None, torch.device("cpu"), 2)

    assert "precision.fp8_cache_transposed=false" in message("auto")
    assert "fp8_cache_transposed" not in message("false") and "fp8_cache_transposed" not in message("auto", "bf16")
