"""Compile our ops' Triton kernels in worker threads while Inductor compiles the graph around them.

    @qkv_rope_lora.register_fake
    def _fake(y, xa, ...):
        compile_ahead(_forward, y, xa, ...)  # the op's own launcher, on meta tensors of the fakes' layout
        return ...

    launch(kernel, grid, *args, **meta)  # in the launchers, instead of kernel[grid](*args, **meta)

Why: Triton compiles a kernel at its first launch, on the thread that launches it, and ours first launch inside
the first training step, one after another: 6.2 s of Qwen3-8B bf16's 24.1 s first step and 9.7 s of Qwen3-14B
fp8's 31.7 s (H100, cold caches, benchmarks/NOTES.md). Their fake implementations run seconds earlier, when
AOTAutograd traces the block (forward and backward) with fake tensors of the exact shapes, strides and dtypes the
real calls will get. `compile_ahead` hands the op's launcher meta tensors of that layout on a worker thread, where
`launch` compiles (`JITFunction.warmup`) instead of running; the kernel is then in Triton's in-memory cache when
the step launches it. Triton holds the GIL little while it compiles (LLVM, ptxas), so the workers run beside
Dynamo and Inductor (two specializations of the q/k/v backward: 9.5 s one after the other, 5.8 s on two threads,
on the H100 machine's CPU).

Best effort by design: a launcher that fails on meta tensors, or a specialization that differs from the real
call's (a pointer that is not 16-byte aligned, say), only means that the real launch compiles, as it always did.
`SUROGATE_COMPILE_AHEAD=0` turns it off (to measure what it saves).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map_only

__all__ = ["compile_ahead", "gpu_multiprocessors", "launch", "on_gpu", "wait"]

log = logging.getLogger(__name__)

_local = threading.local()  # .device: the CUDA device a worker compiles for (set only on worker threads)
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_submitted: dict[tuple, Future] = {}
_kernel_locks: dict[int, threading.Lock] = {}  # id(kernel) -> held by a worker while it compiles that kernel


class _MetaSpec:
    """A fake tensor's layout, taken on the tracing thread (where a fake mode is active) and made into a meta
    tensor on the worker (where none is)."""

    def __init__(self, t: Tensor):
        self.shape, self.stride, self.dtype = tuple(t.shape), tuple(t.stride()), t.dtype

    def key(self) -> tuple:
        return self.shape, self.stride, self.dtype

    def meta(self) -> Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def enabled() -> bool:
    return os.environ.get("SUROGATE_COMPILE_AHEAD", "1") != "0"


def compile_ahead(launcher: Callable[..., Any], *args: Any) -> Future | None:
    """Run `launcher(*args)` on a worker thread with meta tensors in place of the (fake) CUDA tensors in `args`,
    compiling each kernel it launches without running it. Once per launcher and layout; None when nothing was
    submitted (CPU tensors, symbolic shapes, turned off, already submitted)."""
    tensors = [a for a in tree_flatten(args)[0] if isinstance(a, Tensor)]
    cuda = [t.device for t in tensors if t.device.type == "cuda"]
    if not enabled() or not cuda or not all(_static(t) for t in tensors):
        return None
    specs = tree_map_only(Tensor, _MetaSpec, args)
    key = (launcher.__module__, launcher.__qualname__, _layout_key(specs))
    global _pool
    with _lock:
        if key in _submitted:
            return None
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="compile-ahead")
        device = cuda[0].index if cuda[0].index is not None else torch.cuda.current_device()
        future = _submitted[key] = _pool.submit(_run, launcher, specs, device)
    return future


def wait() -> None:
    """Block until every kernel submitted so far has compiled (or failed to)."""
    with _lock:
        futures = list(_submitted.values())
    for f in futures:
        f.exception()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """`kernel[grid](*args, **meta)`; on a compile-ahead worker, only the compile."""
    if _worker_device() is not None:
        with _kernel_lock(kernel):
            kernel.warmup(*(a.dtype if isinstance(a, Tensor) else a for a in args), grid=grid, **meta)
        return
    busy = _kernel_locks.get(id(kernel)) if _kernel_locks else None
    if busy is not None and busy.locked():  # a worker is compiling it: wait, rather than compile it twice
        with busy:
            pass
    kernel[grid](*args, **meta)


def on_gpu(t: Tensor) -> bool:
    """t is a CUDA tensor, or a meta tensor standing in for one on a compile-ahead worker."""
    return t.is_cuda or (t.is_meta and _worker_device() is not None)


def gpu_multiprocessors(t: Tensor) -> int | None:
    """The SM count of t's GPU (of the GPU a worker compiles for, for its meta tensors); None off the GPU."""
    device = t.device if t.is_cuda else _worker_device() if t.is_meta else None
    return None if device is None else torch.cuda.get_device_properties(device).multi_processor_count


def _worker_device() -> torch.device | None:
    """The device this thread compiles for when it is a compile-ahead worker (set by `_run`); None elsewhere."""
    return getattr(_local, "device", None)


def _static(t: Tensor) -> bool:
    return all(type(n) is int for n in (*t.shape, *t.stride()))


def _layout_key(specs: Any) -> tuple:
    leaves = tree_flatten(specs)[0]
    return tuple(s.key() if isinstance(s, _MetaSpec) else repr(s) for s in leaves)


def _kernel_lock(kernel: Any) -> threading.Lock:
    with _lock:
        return _kernel_locks.setdefault(id(kernel), threading.Lock())


def _run(launcher: Callable[..., Any], specs: Any, device: int) -> None:
    torch.cuda.set_device(device)  # the current device is per thread; Triton compiles for (and caches under) it
    _local.device = torch.device("cuda", device)
    try:
        launcher(*tree_map_only(_MetaSpec, _MetaSpec.meta, specs))
    except Exception as e:  # best effort (module docstring): the real launch compiles what this could not
        log.debug("compile ahead of %s failed: %r", launcher.__qualname__, e)
    finally:
        _local.device = None
