"""Causal attention through FlashAttention-4's Hopper kernels (the optional `flash-attn-4` package, CuTe DSL), one
custom op each way.

Why: for rows of one document (plain causal attention) this is the fastest kernel we can run on an H100. At Qwen3
shapes (batch 2, 2048 tokens, head dim 128, GQA; CUDA time per forward + backward, benchmarks/NOTES.md) it takes
590 us against cuDNN's 640 (32 q / 8 kv heads) and 715 against 779 (40 / 8): its backward kernel is faster (342 vs
377 us), its forward a little (132 vs 142), and the helper passes around the backward cost the same in both.

The kernels are FlashAttention's; this file makes them ops a compiled block and a CUDA graph see as one opaque call
each way: the forward returns the output and the row log-sum-exp, the backward takes them back. q, k, v are
[B, S, H, D] with unit last stride (the projections' own layout), k/v may have fewer heads (GQA).

The first step: FlashAttention compiles its kernels at their first call (CuTe DSL, ~8.6 s for the five of one
layout), and importing it takes ~4.7 s; both hold the interpreter that Dynamo and Inductor need, so done in the
training process they added 10-15 s to a cold first step. Two things keep most of that off the critical path:
`compile_in_background`, called before the model is built, compiles the layout's kernels in two fresh processes
(forward; backward: their own interpreters, nothing shared with the compile) into the package's disk cache, which is
turned on below; and the op's fake hands the import and a load of those kernels to a compile-ahead worker, which
imports while those processes run, then waits for them. The first step then takes 1-4 s longer than with cuDNN
(benchmarks/NOTES.md). A later run finds the kernels on disk either way.

`reference` is SDPA in fp32: what the kernels must match within bf16 rounding.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ops.compile_ahead import compile_ahead, on_worker

__all__ = ["available", "compile_in_background", "flash_causal_attention", "reference"]

log = logging.getLogger(__name__)

_HEAD_DIMS = (64, 96, 128)  # what FlashAttention-4's sm90 backward is tuned for and we test
# Held by a compile-ahead worker while it compiles, so the first real call waits for its kernels instead of
# compiling them a second time.
_ahead_lock = threading.Lock()
_CACHE_ENV = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"  # the package's disk cache of compiled kernels
_background: dict[tuple, _Background] = {}  # layout -> the processes compiling its kernels
_background_lock = threading.Lock()


@functools.cache
def installed() -> bool:
    """The flash-attn-4 package is importable (found without importing it: the import takes seconds)."""
    return (
        importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None
    )


def available(device: torch.device | str, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """FlashAttention-4 can run this attention: the package is installed, the device is a Hopper GPU (the kernels we
    measured; Blackwell has its own path in the package, not tested here), and the head dim and dtype are covered."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not installed():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major == 9 and head_dim in _HEAD_DIMS and dtype in (torch.bfloat16, torch.float16)


@functools.cache
def _interface():
    # The package's on-disk kernel cache is opt-in through its environment; turn it on (unless the user chose) so a
    # second run loads the compiled kernels instead of compiling them again.
    os.environ.setdefault(_CACHE_ENV, "1")
    from flash_attn.cute import interface

    return interface


def _layout(q_shape, kv_shape, dtype: torch.dtype) -> tuple:
    """What one set of kernels is compiled for: (batch, seq_len, q heads, kv heads, head dim, dtype name)."""
    B, S, H, D = q_shape
    return (B, S, H, kv_shape[2], D, str(dtype).removeprefix("torch."))


def compile_in_background(
    batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16
) -> None:
    """Start compiling the kernels of this attention layout in two separate processes (forward; backward), into the
    package's disk cache, so that the training process only loads them (module docstring). Call it as early as the
    layout is known. Best effort: without the package, with its disk cache turned off, under torchrun (every rank
    would compile the same kernels), with `SUROGATE_FLASH4_BACKGROUND=0` (to measure what this saves) or if a
    process fails, the first call compiles in-process as before."""
    if not installed() or os.environ.get(_CACHE_ENV, "1") != "1" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    if os.environ.get("SUROGATE_FLASH4_BACKGROUND", "1") == "0":
        return
    layout = _layout((batch, seq_len, heads, head_dim), (batch, seq_len, kv_heads, head_dim), dtype)
    root = str(Path(__file__).resolve().parents[1])  # where `ops` is importable from
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, **{_CACHE_ENV: "1"}, PYTHONPATH=path)
    with _background_lock:
        if layout in _background:
            return
        logs = [tempfile.TemporaryFile() for _ in _PARTS]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ops.flash_attention", *map(str, layout), part],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            for part, out in zip(_PARTS, logs)
        ]
        _background[layout] = _Background(procs, logs, time.perf_counter())
    log.debug("FlashAttention-4 kernels for %s compiling in processes %s", layout, [p.pid for p in procs])


_PARTS = ("fwd", "bwd")  # one process each: the two compiles run side by side


@dataclass
class _Background:
    procs: list[subprocess.Popen]
    logs: list
    started: float


def _wait_for_background(layout: tuple) -> int | None:
    """Wait (without the interpreter lock) for the background compile of `layout`, if one was started; returns its
    exit code (None if none was started, or an earlier call already waited for it)."""
    entry = _background.get(layout)
    if entry is None:
        return None
    codes = []
    for proc in entry.procs:
        try:
            codes.append(proc.wait(timeout=600))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    code = next((c for c in codes if c), 0)
    with _background_lock:
        if _background.pop(layout, None) is None:  # another thread reported it
            return code
    if code:
        tails = []
        for out in entry.logs:
            out.seek(0)
            tails.append(out.read().decode(errors="replace")[-1500:])
        log.warning(
            "FlashAttention-4's background compile failed (%s); compiling in-process:\n%s", codes, "\n".join(tails)
        )
    else:
        log.debug(
            "FlashAttention-4's background compile of %s took %.1f s", layout, time.perf_counter() - entry.started
        )
    for out in entry.logs:
        out.close()
    return code


def reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax(q k^T / sqrt(D)) v in fp32 on [B, S, H, D] tensors (k/v heads repeated for GQA)."""
    group = q.shape[2] // k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(qf, kf, vf, is_causal=True).transpose(1, 2).to(q.dtype)


@torch.library.custom_op("surogate::flash_causal_fwd", mutates_args=(), device_types="cuda")
def flash_causal_fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """-> (out [B, S, H, D], lse [B, H, S] fp32)."""
    _wait_for_background(_layout(q.shape, k.shape, q.dtype))  # a no-op once a compile-ahead worker has waited
    if _ahead_lock.locked():  # the first call, while a worker still compiles: how long the step waits for it
        start = time.perf_counter()
        with _ahead_lock:
            log.debug("waited %.1f s for FlashAttention-4's compile-ahead worker", time.perf_counter() - start)
    with _ahead_lock:
        out, lse = _interface()._flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2]
    return out, lse


@flash_causal_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    compile_ahead(_compile_kernels, q, k, v)
    B, S, H, _ = q.shape
    return q.new_empty(B, S, H, v.shape[-1]), q.new_empty(B, H, S, dtype=torch.float32)


@torch.library.custom_op("surogate::flash_causal_bwd", mutates_args=(), device_types="cuda")
def flash_causal_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    with _ahead_lock:
        dq, dk, dv = _interface()._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True)
    return dq, dk, dv


@flash_causal_bwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse = ctx.saved_tensors
    return flash_causal_bwd(q, k, v, out, lse, dout)


flash_causal_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of [B, S, Hq, D] q over [B, S, Hkv, D] k, v (Hq % Hkv == 0) -> [B, S, Hq, D]."""
    return flash_causal_fwd(q, k, v)[0]


def _compile_kernels(q: Tensor, k: Tensor, v: Tensor) -> None:
    """On a compile-ahead worker (meta tensors of the real layout): import the package and compile the forward and
    backward kernels for this layout, or load them from the disk cache once a background compile is done."""
    if not on_worker():
        return
    with _ahead_lock:
        start = time.perf_counter()
        _interface()  # imported while a background compile runs
        imported = time.perf_counter()
        _wait_for_background(_layout(q.shape, k.shape, q.dtype))
        waited = time.perf_counter()
        _compile_layout(q, k, v, torch.device("cuda", torch.cuda.current_device()))
        log.debug(
            "FlashAttention-4 for q %s, k %s: import %.1f s, background wait %.1f s, kernels %.1f s (compiled, or "
            "loaded from the disk cache)", tuple(q.shape), tuple(k.shape), imported - start, waited - imported,
            time.perf_counter() - waited,
        )  # fmt: skip


def _compile_layout(q: Tensor, k: Tensor, v: Tensor, device: torch.device, parts: tuple[str, ...] = _PARTS) -> None:
    """Run the forward and/or the backward once under a fake mode, where FlashAttention compiles without launching;
    q, k, v give only shapes, strides and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        interface = _interface()
        fq, fk, fv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device) for t in (q, k, v))
        if "fwd" in parts:
            interface._flash_attn_fwd(fq, fk, fv, causal=True, return_lse=True)
        if "bwd" in parts:
            B, S, H, _ = q.shape
            out, lse = torch.empty_like(fq), torch.empty(B, H, S, dtype=torch.float32, device=device)
            interface._flash_attn_bwd(fq, fk, fv, out, torch.empty_like(out), lse, causal=True)


def _main(argv: list[str]) -> None:
    """`python -m ops.flash_attention B S HEADS KV_HEADS HEAD_DIM DTYPE fwd|bwd`: compile that layout's forward or
    backward kernels into the disk cache (what `compile_in_background` runs)."""
    batch, seq_len, heads, kv_heads, head_dim = map(int, argv[:5])
    dtype, part = getattr(torch, argv[5]), argv[6]
    q = torch.empty(batch, seq_len, heads, head_dim, dtype=dtype, device="meta")
    kv = torch.empty(batch, seq_len, kv_heads, head_dim, dtype=dtype, device="meta")
    _compile_layout(q, kv, kv, torch.device("cuda", torch.cuda.current_device()), (part,))


if __name__ == "__main__":
    _main(sys.argv[1:])
