"""ops/compile_ahead.py: what an op's fake implementation compiles ahead is exactly what its real call launches, so
the real call (forward and backward) compiles nothing on the launching thread."""

import threading
from contextlib import contextmanager

import pytest
import torch
from test_qkv_rope_lora import qkv_inputs
from test_swiglu_lora import down_inputs, swiglu_inputs
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

import ops.compile_ahead as ahead
import ops.low_rank_add  # noqa: F401  (registers surogate::low_rank_add)
import ops.qkv_rope_lora  # noqa: F401
import ops.swiglu_lora  # noqa: F401

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
surogate = torch.ops.surogate


def test_cpu_tensors_submit_nothing():
    with FakeTensorMode() as mode:
        y = mode.from_tensor(torch.randn(4, 8))
        assert ahead.compile_ahead(lambda t: t, y) is None


class _RecordingKernel:
    """Stands in for a Triton kernel: records warmups, refuses to run."""

    def __init__(self):
        self.warmups = []

    def warmup(self, *args, grid, **meta):
        self.warmups.append((args, grid, meta))

    def __getitem__(self, grid):
        raise AssertionError("a compile-ahead worker ran a kernel")


def test_launch_on_a_worker_compiles_with_dtypes_in_place_of_tensors():
    kernel = _RecordingKernel()
    x = torch.empty(4, 8, dtype=torch.bfloat16, device="meta")
    ahead._local.device = torch.device("cuda", 0)  # what `_run` sets on a worker thread
    try:
        assert ahead.on_gpu(x)
        ahead.launch(kernel, (3, 2), x, 4, 0.5, BM=16, num_warps=4)
    finally:
        ahead._local.device = None
    assert kernel.warmups == [((torch.bfloat16, 4, 0.5), (3, 2), {"BM": 16, "num_warps": 4})]
    assert not ahead.on_gpu(x)  # off a worker, a meta tensor is no GPU tensor


def _cases(device):
    """(op, its arguments): shapes no other test uses, so that each case's layouts are submitted here first."""
    y, xa, bs, s, ws, cos, sin = qkv_inputs(2, 37, 4, 2, 64, (16, 16, 16), dtype=torch.bfloat16, device=device)
    yield surogate.qkv_rope_lora, (y, xa, bs, s, ws, cos, sin, 64, 1e-6)
    yield surogate.swiglu_lora, swiglu_inputs((3, 29), 320, (16, 16), torch.bfloat16, device)
    yield surogate.swiglu_lora_down, down_inputs((2, 41), 192, (16, 16), 16, torch.bfloat16, device)
    g = torch.Generator().manual_seed(5)
    y, residual = (torch.randn(4099, 5632, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    xa = torch.randn(4099, 16, generator=g).to(device, torch.bfloat16).requires_grad_()
    b = torch.randn(5632, 16, generator=g).to(device, torch.bfloat16).requires_grad_()
    yield surogate.low_rank_add, (y, xa, b, 2.0, residual)  # 44 MiB: over the Triton path's size floor


def _forward_backward(op, args):
    outs = op(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(outs, leaves, [torch.randn_like(o) for o in outs])


@contextmanager
def _compiles():
    """(on a compile-ahead worker?, kernel name) for each Triton compile while open."""
    from triton import knobs

    seen, old = [], knobs.runtime.jit_post_compile_hook

    def hook(**kw):
        seen.append((threading.current_thread().name.startswith("compile-ahead"), kw["fn"].name))

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_post_compile_hook = old


def _clear_triton_memory_caches():
    """Drop the in-memory compiled kernels of our ops (Triton's disk cache stays), so every launch must compile."""
    from ops import low_rank_add, qkv_rope_lora_kernels, swiglu_lora_kernels

    kernels = [
        qkv_rope_lora_kernels.qkv_rope_lora_fwd_kernel,
        qkv_rope_lora_kernels.qkv_rope_lora_bwd_kernel,
        swiglu_lora_kernels.swiglu_lora_fwd_kernel,
        swiglu_lora_kernels.swiglu_lora_bwd_kernel,
        low_rank_add._low_rank_kernel(),
    ]
    for k in kernels:
        k.device_caches.clear()


@pytest.mark.gpu
@needs_cuda
def test_real_calls_compile_nothing_after_the_fake_trace(monkeypatch):
    monkeypatch.setenv("SUROGATE_COMPILE_AHEAD", "1")
    cases = list(_cases("cuda"))
    ahead.wait()  # nothing left over from earlier tests compiles while the hook counts
    _clear_triton_memory_caches()
    with _compiles() as seen:
        with FakeTensorMode() as mode:
            for op, args in cases:
                fake = tree_map_only(torch.Tensor, mode.from_tensor, args)
                _forward_backward(op, fake)
        ahead.wait()
        ahead_compiled = list(seen)
        seen.clear()
        for op, args in cases:
            _forward_backward(op, args)
        torch.cuda.synchronize()
    assert all(by_worker for by_worker, _ in ahead_compiled), ahead_compiled
    names = sorted(name.rsplit(".", 1)[-1] for _, name in ahead_compiled)
    assert names == sorted(  # swiglu_lora and swiglu_lora_down: one kernel each way, two specializations
        ["qkv_rope_lora_fwd_kernel", "qkv_rope_lora_bwd_kernel", "low_rank_add_kernel"]
        + 2 * ["swiglu_lora_fwd_kernel", "swiglu_lora_bwd_kernel"]
    )
    assert seen == [], f"compiled at the real launch: {seen}"


@pytest.mark.gpu
@needs_cuda
def test_turned_off_submits_nothing(monkeypatch):
    monkeypatch.setenv("SUROGATE_COMPILE_AHEAD", "0")
    op, args = next(_cases("cuda"))
    with FakeTensorMode() as mode:
        fake = tree_map_only(torch.Tensor, mode.from_tensor, args)
        assert ahead.compile_ahead(lambda *a: None, *fake) is None
