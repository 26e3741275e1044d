"""ops/compile_ahead.py: what an op's fake implementation compiles ahead is exactly what its real call launches, so
the real call (forward and backward) compiles nothing on the launching thread."""

import threading
import time
from contextlib import contextmanager
from functools import partial

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
    """Stands in for a Triton kernel: records warmups and the loading of what they compiled, refuses to run."""

    def __init__(self):
        self.warmups, self.loaded = [], []

    def warmup(self, *args, grid, **meta):
        self.warmups.append((args, grid, meta))
        return self  # the compiled kernel, as Triton's warmup returns it

    def __getitem__(self, grid):  # Triton's CompiledKernel[grid]: loads the binary, returns a launcher
        self.loaded.append(grid)

        def run(*args, **kwargs):
            raise AssertionError("a compile-ahead worker ran a kernel")

        return run

    def __call__(self, *args, **kwargs):
        raise AssertionError("a compile-ahead worker ran a kernel")


@contextmanager
def _as_worker():
    """This thread as a compile-ahead worker for GPU 0 (what `_run` sets up), without a GPU."""
    ahead._local.device = torch.device("cuda", 0)
    try:
        yield
    finally:
        ahead._local.device = None


def test_launch_on_a_worker_compiles_with_dtypes_in_place_of_tensors_and_loads_without_running():
    kernel = _RecordingKernel()
    x = torch.empty(4, 8, dtype=torch.bfloat16, device="meta")
    with _as_worker():
        assert ahead.on_gpu(x)
        ahead.launch(kernel, (3, 2), x, 4, 0.5, BM=16, num_warps=4)
    assert kernel.warmups == [((torch.bfloat16, 4, 0.5), (3, 2), {"BM": 16, "num_warps": 4})]
    assert kernel.loaded == [(3, 2)]
    assert not ahead.on_gpu(x)  # off a worker, a meta tensor is no GPU tensor


def test_shared_makes_one_object_for_every_thread():
    made = []

    def make():
        time.sleep(0.05)  # long enough for the other threads to ask meanwhile
        made.append(object())
        return made[-1]

    get = ahead.shared(make)
    got = []
    threads = [threading.Thread(target=lambda: got.append(get())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(g is made[0] for g in got)


def _quantized_op_cases(device, dtype=torch.bfloat16):
    """(name, forward, its arguments, backward, its arguments) of the FP8 and 4-bit storage ops, FP8 compute: x [2, 40,
    512] through a q/k/v-like group (512 + 128 + 128 out, rank 16), shapes no other test uses."""
    from ops import fp4, fp8, nf4

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 40, 512, generator=g).to(dtype)
    ws = [torch.randn(o, 512, generator=g).to(dtype) / 20 for o in (512, 128, 128)]
    As = [torch.randn(16, 512, generator=g).to(dtype) / 20 for _ in ws]
    Bs = [torch.randn(w.shape[0], 16, generator=g).to(dtype) / 20 for w in ws]
    dy, xa = torch.randn(2, 40, 768, generator=g).to(dtype), torch.randn(80, 48, generator=g).to(dtype)
    on = partial(tree_map_only, torch.Tensor, lambda t: t.to(device))
    lora = on((As, Bs))
    fp4_stored = [list(t) for t in zip(*(fp4.quantize_fp4(w, "nvfp4") for w in ws))]
    nf4_stored = [list(t) for t in zip(*(nf4.quantize_nf4(w) for w in ws))]
    yield (
        "fp8",
        fp8._lora_linear_fp8, on((x, ws, None, *lora, [2.0] * 3, [])),
        fp8._lora_linear_fp8_backward, on((dy, [x], xa, ws, None, *lora, [2.0] * 3, True, True, "e5m2", "fp8", True)),
    )  # fmt: skip
    codes, scales, globals_ = on(fp4_stored)
    options = ("nvfp4", "fp8", True, True, "e5m2")
    yield (
        "qfp4",
        fp4._lora_linear_fp4, (on(x), codes, None, *lora, [2.0] * 3, [], scales, globals_, *options),
        fp4._lora_linear_fp4_grad,
        (*on((dy, [x], xa)), codes, scales, globals_, *lora, [2.0] * 3, True, True, *options),
    )  # fmt: skip
    codes, absmax_q, factors, means = on(nf4_stored)
    yield (
        "qnf4",
        nf4._lora_linear_nf4, (on(x), codes, None, *lora, [2.0] * 3, [], absmax_q, factors, means, "fp8", "e5m2"),
        nf4._lora_linear_nf4_grad,
        (*on((dy, [x], xa)), codes, absmax_q, factors, means, *lora, [2.0] * 3, True, True, "fp8", "e5m2"),
    )  # fmt: skip


@pytest.mark.parametrize("case", list(_quantized_op_cases("meta")), ids=lambda c: c[0])
def test_quantized_ops_on_a_worker_reach_their_kernels_and_leave_caches_and_counts_alone(case, monkeypatch):
    from ops import fp4, fp8, low_rank_add, nf4

    name, forward, forward_args, backward, backward_args = case
    launched = []
    for module in (fp4, fp8, nf4, low_rank_add):
        monkeypatch.setattr(module, "launch", lambda kernel, grid, *a, **k: launched.append(kernel.__name__))
    caches = (fp8.WEIGHT_CACHE, fp8.ROW_ABSMAX_CACHE, fp4.WEIGHT_CACHE)
    before = [len(c) for c in caches], [dict(m.stats) for m in (fp4, fp8, nf4)]
    with _as_worker():
        y, xa = forward(*forward_args)
        forward_kernels, launched[:] = list(launched), []
        backward(*backward_args)
    assert y.is_meta and y.shape == (2, 40, 768) and xa.shape == (80, 48)
    stored = {"fp8": [], "qfp4": ["fp4_dequantize_kernel"] * 3, "qnf4": ["nf4_dequantize_kernel"] * 3}[name]
    # fp8: each weight group quantized (W and W^T's codes, made anew: the cache keeps nothing from a worker), then x
    quantize = ["quantize_rows_kernel"] * (3 if name == "fp8" else 1)
    assert forward_kernels == stored + quantize
    assert launched == stored + quantize  # dX: the transposed codes (made anew), dy quantized
    assert ([len(c) for c in caches], [dict(m.stats) for m in (fp4, fp8, nf4)]) == before


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


def _on_worker_thread() -> bool:
    return threading.current_thread().name.startswith("compile-ahead")


@contextmanager
def _compiles(loads: list | None = None):
    """(on a compile-ahead worker?, kernel name) for each Triton compile while open; in `loads`, the same for each
    binary loaded (a kernel's first launch in the process, or a worker's `launch`)."""
    from triton import knobs

    seen, old = [], knobs.runtime.jit_post_compile_hook

    def hook(**kw):
        seen.append((_on_worker_thread(), kw["fn"].name))

    def load_hook(module, function, name, *rest):
        loads.append((_on_worker_thread(), name))

    chain = knobs.runtime.kernel_load_start_hook  # a HookChain on newer Triton, a plain hook before
    old_load = None
    if loads is not None:
        if hasattr(chain, "add"):
            chain.add(load_hook)
        else:
            old_load, knobs.runtime.kernel_load_start_hook = chain, load_hook
    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_post_compile_hook = old
        if loads is not None:
            if hasattr(chain, "add"):
                chain.remove(load_hook)
            else:
                knobs.runtime.kernel_load_start_hook = old_load


def _clear_triton_memory_caches():
    """Drop the in-memory compiled kernels of our ops (Triton's disk cache stays), so every launch must compile."""
    from ops import cross_entropy, dequant_kernels, fp8, low_rank_add, qkv_rope_lora_kernels, swiglu_lora_kernels

    kernels = [
        qkv_rope_lora_kernels.qkv_rope_lora_fwd_kernel,
        qkv_rope_lora_kernels.qkv_rope_lora_bwd_kernel,
        swiglu_lora_kernels.swiglu_lora_fwd_kernel,
        swiglu_lora_kernels.swiglu_lora_bwd_kernel,
        low_rank_add._low_rank_kernel(),
        *fp8._quantize_kernels(),
        fp8._transpose_kernel(),
        dequant_kernels.fp4_dequantize_kernel,
        dequant_kernels.nf4_dequantize_kernel,
        cross_entropy._ce_kernel(),
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
    loads = []
    with _compiles(loads) as seen:
        with FakeTensorMode() as mode:
            for op, args in cases:
                fake = tree_map_only(torch.Tensor, mode.from_tensor, args)
                _forward_backward(op, fake)
        ahead.wait()
        ahead_compiled = list(seen)
        seen.clear()
        ahead_loaded = list(loads)
        loads.clear()
        for op, args in cases:
            _forward_backward(op, args)
        torch.cuda.synchronize()
    assert all(by_worker for by_worker, _ in ahead_compiled + ahead_loaded), (ahead_compiled, ahead_loaded)
    assert len(ahead_loaded) == len(ahead_compiled)  # each compiled kernel loaded by its worker
    assert loads == [], f"loaded at the real launch: {loads}"
    names = sorted(name.rsplit(".", 1)[-1] for _, name in ahead_compiled)
    assert names == sorted(  # swiglu_lora and swiglu_lora_down: one kernel each way, two specializations
        ["qkv_rope_lora_fwd_kernel", "qkv_rope_lora_bwd_kernel", "low_rank_add_kernel", "low_rank_grad_kernel"]
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


@pytest.mark.gpu
@needs_cuda
def test_quantized_ops_and_the_loss_compile_and_load_nothing_at_their_real_launch(monkeypatch):
    """The FP8 and 4-bit ops' fakes submit the whole op (weight quantization, dequantize, quantize, transpose);
    the model's builder submits the loss's kernel."""
    from ops.cross_entropy import ce_chunk_, compile_ce_ahead

    monkeypatch.setenv("SUROGATE_COMPILE_AHEAD", "1")
    calls = []
    for _, forward, forward_args, backward, backward_args in _quantized_op_cases("cuda"):
        # the registered op of each implementation: surogate::lora_linear_fp8 for _lora_linear_fp8, ...
        calls += [
            (getattr(surogate, f.__name__.lstrip("_")), args)
            for f, args in ((forward, forward_args), (backward, backward_args))
        ]
    logits = torch.randn(8, 1000, device="cuda", dtype=torch.bfloat16)  # a vocab no other test uses
    labels = torch.randint(0, 1000, (8,), device="cuda")
    ahead.wait()
    _clear_triton_memory_caches()
    loads = []
    with _compiles(loads) as seen:
        compile_ce_ahead(1000, torch.bfloat16, logits.device)
        with FakeTensorMode() as mode:
            for op, args in calls:
                op(*tree_map_only(torch.Tensor, mode.from_tensor, args))
        ahead.wait()
        ahead_compiled, ahead_loaded = list(seen), list(loads)
        seen.clear()
        loads.clear()
        for op, args in calls:
            op(*args)
        ce_chunk_(logits, labels, labels > 100)
        torch.cuda.synchronize()
    names = sorted({name.rsplit(".", 1)[-1] for _, name in ahead_compiled})
    assert names == sorted(["ce_rows_kernel", "fp4_dequantize_kernel", "nf4_dequantize_kernel", "quantize_rows_kernel"])
    assert all(by_worker for by_worker, _ in ahead_compiled + ahead_loaded), (ahead_compiled, ahead_loaded)
    assert seen == [], f"compiled at the real launch: {seen}"
    assert loads == [], f"loaded at the real launch: {loads}"
