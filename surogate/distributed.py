"""Data-parallel training on N GPUs (and nodes): torchrun, and either replicated LoRA or FSDP2.

    torchrun --nproc-per-node N -m surogate.train ...        (docs/multi_gpu.md: two nodes, rendezvous)

Same code on 1 GPU and N: without torchrun's environment (or with WORLD_SIZE=1) nothing here initializes a process
group and every helper is the identity, so the single-GPU run is the N=1 case, not a separate trainer.

Two modes, chosen by whether the frozen base is sharded (`shard_base_weights`, `decide_shard_base`; printed at start):

Replicated base (the default whenever the model fits one GPU): no FSDP at all. Every rank holds the whole model,
base and LoRA, as plain tensors; `replicate_lora` broadcasts the LoRA parameters from rank 0 once after the build (the
seeded init is the same on every rank already; the broadcast makes it certain). Micro-steps run exactly as on one
GPU, so each can be replayed from one CUDA graph (surogate/cuda_graphs.py); gradients accumulate locally and, at the
end of the window, `reduce_gradients` all-reduces them once: flattened into fp32 buckets (`BUCKET_BYTES`, one bucket
for Qwen3-8B r16), summed, divided by the world size (the mean FSDP leaves, so the trainer normalizes the same way in
both modes) and copied back into the same `.grad` tensors (a captured backward keeps adding into them). Why not FSDP
here: FSDP on the replicated LoRA puts its hooks and collectives inside every micro-step, which a whole-micro-step
CUDA graph cannot contain, and the graph is worth more than overlap. Why not overlap the all-reduce with the last
backward (DDP's buckets): it is ~170 MB of fp32 for Qwen3-8B r16 on q,k,v,o,gate,up,down, ~1-2 ms on NVLink, about
0.2% of a 1.1 s step; not overlapping it is deliberate, and keeps it outside the graph. The collective runs on the
current stream's order (NCCL waits on it), so it follows a replay with no host sync. With NCCL the watchdog thread's
event queries do not disturb a capture (torch >= 2.7 queries in thread-local capture mode, pytorch#148594).

Sharded base (`shard_base_weights=true`, or auto when the base does not fit): FSDP2. `apply_fsdp` runs after
`surogate.parallelize` (activation checkpointing -> per-block compile -> fully_shard, torchtitan's order):
`fully_shard` on every decoder block (the compiled module: FSDP's hooks run outside the compiled region, so our
custom ops see plain, local, unsharded tensors inside it), then the input embedding, then the root. The final norm
and the LM head stay with the root: the chunked loss reads `lm_head.weight` directly (no `lm_head` forward for FSDP
to hook), and the root is not resharded after forward, so the weight stays gathered for the loss's backward. A tied
embedding goes to the root too (one parameter, one unit). Base and LoRA parameters are both sharded (bf16, fp8 codes
with qfp8 or NF4 codes with qnf4: FSDP shards parameters, the small scale buffers stay replicated); the model is
loaded on the CPU and each `fully_shard` moves its block's shards to the GPU. FSDP all-gathers each group's weights
into separate allocations that are freed and re-made every step, so the fused q/k/v op cannot find them adjacent;
the frozen-concat cache is switched off (`ops.lora_linear.set_frozen_concat_cache(False)`) and the group is
concatenated per call instead (a transient copy of one group, ~2% of a step for 8B), never a cache that would miss
and grow every step. The fp8 recipe (bf16 storage quantized once, cached by address) cannot cache either, so it is
refused with sharding: use qfp8. No CUDA graphs in this mode (FSDP communicates inside the step).

    auto    replicate when the base fits (its bytes at most half the smallest free GPU memory of all ranks, the rest
            left for activations), shard otherwise.

FSDP mixed precision: `MixedPrecisionPolicy(param_dtype=None, reduce_dtype=fp32)`. No cast at all-gather: LoRA
masters are fp32 (the model casts A and B to the activation dtype itself, so compute is bf16 exactly as on one GPU)
and the base keeps its storage dtype (a bf16 param_dtype would turn fp8 codes into bf16). Unsharded LoRA gradients
are then fp32, so accumulating them over micro-steps without a reduction loses nothing; they are reduce-scattered in
fp32. Non-final micro-steps of a window run with `set_requires_gradient_sync(False)` (gradients accumulate locally,
no communication); the final micro-step's reduce-scatters overlap its backward.

Gradient scale, both modes: the ranks' gradients end up averaged (FSDP's default; a divide factor of 1 would need
PREMUL_SUM, which gloo lacks; the replicated all-reduce divides its sum to match), so the trainer divides by the
window's token count summed over all ranks over the world size. That count (and the loss sum) is all-reduced
asynchronously, so the step is the single-process step over the global batch.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "init_distributed",
    "shutdown",
    "is_distributed",
    "rank0",
    "barrier",
    "base_weight_bytes",
    "decide_shard_base",
    "setup_data_parallel",
    "apply_fsdp",
    "replicate_lora",
    "uses_fsdp",
    "set_gradient_sync",
    "reduce_gradients",
    "all_reduce_async",
    "clip_grad_norm_",
    "local_tensor",
    "full_tensor",
    "shard_like",
    "gather_optimizer_state",
    "shard_optimizer_state",
    "gather_objects",
]

log = logging.getLogger(__name__)
REPLICATE_FRACTION = 0.5  # auto: replicate the base when it takes at most this share of the free GPU memory
BUCKET_BYTES = 256 * 2**20  # replicated LoRA: fp32 gradients per all-reduce (Qwen3-8B r16, all linears: ~170 MB)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(device: torch.device) -> DistInfo:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and pick this rank's device (cuda:LOCAL_RANK).
    Without torchrun's environment (or WORLD_SIZE=1) this does nothing and returns rank 0 of 1 on `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "set --nproc-per-node to at most the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=dt.timedelta(minutes=30), device_id=device if device.type == "cuda" else None
        )
    dist.barrier()  # every rank is past its preflight before any of them writes to output_dir
    return DistInfo(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- the plan


NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # codes + int8 absmax per 64 + fp32 factor per 256 blocks


FP4_BYTES_PER_WEIGHT = (4 + 8 / 16) / 8  # nvfp4: e2m1 codes + an e4m3 scale per 16 (mxfp4: 4.25 bits, less)


def base_weight_bytes(
    args, dtype: torch.dtype, fp8_blocks: bool = False, nf4_blocks: bool = False, fp4_blocks: bool = False
) -> int:
    """Bytes of the frozen base as stored: every weight in `dtype`, block linears at 1 byte with fp8 storage,
    ~0.52 bytes with nf4 storage and ~0.56 with fp4 storage. Qwen3-MoE expert stacks are stored like the block
    linears with fp8 and nf4 (qfp8, qnf4), in `dtype` with fp4; routers, norms and embeddings stay in `dtype`."""
    h, inter = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    moe_layers = sum(args.is_moe_layer(i) for i in range(args.num_layers))
    linears = args.num_layers * (h * q + 2 * h * kv + q * h) + (args.num_layers - moe_layers) * 3 * h * inter
    experts = moe_layers * args.num_experts * 3 * h * args.moe_intermediate_size
    routers = moe_layers * args.num_experts * h
    norms = 2 * h + (2 * args.head_dim if args.qk_norm else 0)
    embed = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    item = torch.finfo(dtype).bits // 8
    linear_item = 1 if fp8_blocks else NF4_BYTES_PER_WEIGHT if nf4_blocks else item
    expert_item = linear_item
    if fp4_blocks:
        linear_item, expert_item = FP4_BYTES_PER_WEIGHT, item
    return int(linears * linear_item + experts * expert_item + (args.num_layers * norms + routers + embed + h) * item)


def _min_free_gpu_bytes(device: torch.device) -> int:
    free = torch.tensor(torch.cuda.mem_get_info(device)[0], device=device, dtype=torch.int64)
    if is_distributed():
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return int(free.item())


def decide_shard_base(setting: str, base_bytes: int, device: torch.device, recipe_precision=None) -> tuple[bool, str]:
    """(shard the frozen base?, one line saying why). Same answer on every rank (auto reads the minimum free
    memory over ranks). ValueError for a combination that cannot work."""
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"shard_base_weights={setting!r}: set auto, true or false")
    gib = base_bytes / 2**30
    if setting == "auto":
        if not is_distributed():
            shard, why = False, "one process"
        elif device.type != "cuda":
            shard, why = False, "auto on CPU"
        else:
            free = _min_free_gpu_bytes(device)
            shard = base_bytes > REPLICATE_FRACTION * free
            why = f"auto: {gib:.1f} GiB base vs {free / 2**30:.1f} GiB free per GPU"
    else:
        shard, why = setting == "true", f"shard_base_weights={setting}"
    if not is_distributed():
        shard = False
    p = recipe_precision
    if shard and p is not None and p.compute in ("fp8", "fp4") and p.weights == "bf16":
        raise ValueError(
            f"recipe {p.compute} quantizes the bf16 base once and caches it by address, which a sharded base "
            f"(re-gathered every step) defeats: set shard_base_weights=false, or use recipe=q{p.compute} "
            f"({p.compute} storage, shards)"
        )
    if shard:
        how = "sharded across ranks (FSDP2: base and LoRA sharded, no CUDA graphs)"
    else:
        how = "replicated on every rank (no FSDP: LoRA replicated, one gradient all-reduce per optimizer step)"
    return shard, f"frozen base {gib:.1f} GiB {how} ({why})"


# ---------------------------------------------------------------------------------------------------- the two modes


def setup_data_parallel(model: nn.Module, shard_base: bool) -> None:
    """After `parallelize`: FSDP2 when the base is sharded, else replicated LoRA (no wrapping). Several ranks only."""
    if shard_base:
        apply_fsdp(model)
    else:
        replicate_lora(model)


def uses_fsdp(model: nn.Module) -> bool:
    """Whether FSDP manages the model (sharded base): its gradients are reduced inside the backward."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------------------------------------------- replicated


def _buckets(tensors: list[Tensor], cap_bytes: int = BUCKET_BYTES) -> list[list[Tensor]]:
    """Consecutive groups of `tensors` of at most `cap_bytes` in fp32 each (a larger tensor gets its own group)."""
    groups: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + 4 * t.numel() > cap_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += 4 * t.numel()
    return [g for g in groups if g]


def _flat_fp32(group: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in group])


def _copy_back(flat: Tensor, group: list[Tensor]) -> None:
    """`flat` (fp32) into the tensors it was flattened from, in place (a captured backward keeps their storage)."""
    pieces = flat.split([t.numel() for t in group])
    torch._foreach_copy_(group, [p.view(t.shape) for p, t in zip(pieces, group)])


@torch.no_grad()
def replicate_lora(model: nn.Module) -> None:
    """Make every rank's trainable parameters rank 0's (one broadcast per bucket, once after the build)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for group in _buckets(params):
        flat = _flat_fp32(group)
        dist.broadcast(flat, src=0)
        _copy_back(flat, group)


@torch.no_grad()
def reduce_gradients(model: nn.Module, params: list[nn.Parameter]) -> None:
    """End of an accumulation window: average the replicated LoRA gradients over ranks (coalesced fp32 all-reduce).

    Nothing to do on one process, nor under FSDP (its last backward reduce-scattered them already). A parameter
    without a gradient gets zeros first, so every rank flattens the same layout."""
    if not is_distributed() or uses_fsdp(model):
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    world = dist.get_world_size()
    for group in _buckets(grads):
        flat = _flat_fp32(group)
        dist.all_reduce(flat)  # SUM: gloo has no AVG
        flat.div_(world)  # the mean, as FSDP leaves it (the trainer divides by the global token count / world)
        _copy_back(flat, group)


# ---------------------------------------------------------------------------------------------------- FSDP2


def apply_fsdp(model: nn.Module) -> nn.Module:
    """Sharded base: fully_shard every decoder block, then the input embedding, then the root (after `parallelize`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ops.lora_linear import set_frozen_concat_cache

    set_frozen_concat_cache(False)  # FSDP re-gathers into fresh memory every step: a cache would only grow
    device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp)
    # Our blocks return views (reshapes) that nothing modifies in place (`x = x + ...` throughout the model), so
    # FSDP's warning about in-place ops on such views does not apply; silence just that message.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # The model was loaded on the CPU: each fully_shard moves its parameters' shards (and buffers) to the mesh's GPU.
    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=True, **kw)
    if not model.args.tie_word_embeddings:
        fully_shard(model.model.embed_tokens, reshard_after_forward=True, **kw)
    # The root keeps norm + LM head (+ a tied embedding) and stays gathered after forward: the loss's backward
    # reads lm_head.weight right away.
    fully_shard(model, reshard_after_forward=False, **kw)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP: reduce gradients in this backward (the final micro-step of a window) or only accumulate them locally.
    Replicated LoRA and one process: nothing (`reduce_gradients` runs once after the window)."""
    if uses_fsdp(model):
        model.set_requires_gradient_sync(sync)


def all_reduce_async(t: Tensor):
    """Start a sum all-reduce of `t` in place; returns a handle with `.wait()` (None when not distributed). On
    NCCL `wait` only orders the current stream after the collective: no host sync."""
    if not is_distributed():
        return None
    return dist.all_reduce(t, async_op=True)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view: in-place ops write through), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_`, also for FSDP-sharded gradients: the squared norms of the local shards are
    summed over ranks (one all-reduce of a scalar, on the device), then every shard is scaled by the same factor.
    Replicated gradients (one process, or after `reduce_gradients`) are whole on every rank: torch's own."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    local = [local_tensor(g) for g in grads]
    norms = torch._foreach_norm(local, 2.0)
    total_sq = torch.stack([n.float() for n in norms]).square().sum()
    dist.all_reduce(total_sq)
    total = total_sq.sqrt()
    if max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total


# ---------------------------------------------------------------------------------------------------- state


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank must call), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` laid out like `like`: this rank's shard as a DTensor when `like` is one (every rank holds `full`:
    no communication), else `full` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole on the CPU: the same format as a
    single-process run (every rank must call; LoRA state is small)."""
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: full_tensor(v).cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return sd


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """The inverse of `gather_optimizer_state`: whole state tensors -> this rank's shards, for `load_state_dict`."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: shard_like(v, p) if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in s.items()}
    return {**sd, "state": state}


def gather_objects(obj) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere); `[obj]` when not distributed."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
