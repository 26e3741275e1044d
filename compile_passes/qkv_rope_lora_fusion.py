"""Pass: move the q/k/v group's LoRA-B products, the q/k RMSNorm and RoPE into one op (`ops.qkv_rope_lora`).

Why: the fused q/k/v op writes y = x W^T + s xa B^T (one rank-r update kernel per projection), then the norm and
RoPE read it and write q and k again, and the backward passes over the q/k gradients in two more kernels before
`dy B` and `dy^T xa` read dy once per projection. With the B products inside the norm/RoPE kernel (see
`ops/qkv_rope_lora.py`) y is written once as the bare base output and every later pass happens in one kernel.

Pattern (as `shared_input_fusion.py` leaves Qwen3's attention; `surogate/models/qwen3.py`):

    fused = lora_op(x, [W_q, W_k, W_v], None, [A_q, A_k, A_v], [B_q, B_k, B_v], s, [])
    q, k, v = split(getitem(fused, 0), [Nq, Nk, Nv], dim=-1)
    q, k, v = q.view(B, S, -1, D), k.view(...), v.view(...)
    q, k = rms_norm(q), rms_norm(k)            # optional (Llama has none): weight * (xf * rsqrt(...)).to(dtype)
    q, k = rope(q, cos, sin), rope(k, cos, sin)   # x * cos + cat((-x2, x1), -1) * sin
                                               # (cos = cat((c, c), -1) when given as one half c: the op gets c)

becomes

    fused = lora_op(x, [W_q, W_k, W_v], None, [A_q, A_k, A_v], [], s, [])  # no B: y = x W^T, xa = x A^T
    q, k, v = qkv_rope_lora(getitem(fused, 0), getitem(fused, 1), [B_q, B_k, B_v], s, [w_q, w_k], cos, sin, D, eps)

Left alone: groups with LoRA dropout, bias or other than three projections; any intermediate value (y, a split,
a normalized q) that anything else reads; norms with different eps; trainable norm weights or cos/sin.

Checked on: torch 2.13 CPU, torch 2.11 GPU (Dynamo gives the norm's `.float()`, `.pow`, `.mean`, `.to` and RoPE's
`.chunk` as call_method nodes, the rest as call_function nodes).
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

import ops.qkv_rope_lora  # noqa: F401  (registers surogate::qkv_rope_lora)
from compile_passes._fx_utils import (
    ADD_TARGETS,
    MUL_TARGETS,
    depends_on,
    example_value,
    hoist_before,
    is_call,
    is_frozen,
    propagate_fake,
)

__all__ = ["fuse_qkv_rope_lora"]

log = logging.getLogger(__name__)

QKV_ROPE_LORA = torch.ops.surogate.qkv_rope_lora.default
_NEG = (operator.neg, torch.neg)


def _is_method(node: object, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: fx.Node, known: object) -> object | None:
    """The argument of a binary op that is not `known` (None if `known` is not one of its two arguments)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    return b if a is known else a if b is known else None


def _last_dim(dim: object, ndim: int) -> bool:
    return dim in (-1, ndim - 1)


def _match_rms_norm(z: fx.Node, ndim: int, dtype: torch.dtype) -> tuple[fx.Node, fx.Node, float, list[fx.Node]] | None:
    """(output, weight, eps, nodes) when z's only use is `weight * (xf * rsqrt(mean(xf^2, -1) + eps)).to(z.dtype)`."""
    xf = _only_user(z)
    if not (_is_method(xf, "float") and xf.args == (z,)) or len(xf.users) != 2:
        return None
    pow_ = next((u for u in xf.users if _is_method(u, "pow")), None)
    if pow_ is None or pow_.args != (xf, 2):
        return None
    mean = _only_user(pow_)
    dim = mean.args[1] if mean is not None and len(mean.args) == 2 else mean.kwargs.get("dim") if mean else None
    if not _is_method(mean, "mean") or not _last_dim(dim, ndim) or mean.kwargs.get("keepdim") is not True:
        return None
    add = _only_user(mean)
    eps = _other(add, mean) if is_call(add, ADD_TARGETS) else None
    rsqrt = _only_user(add) if isinstance(eps, float) else None
    if not is_call(rsqrt, (torch.rsqrt,)) or rsqrt.args != (add,):
        return None
    normed = _only_user(rsqrt)
    if not is_call(normed, MUL_TARGETS) or _other(normed, rsqrt) is not xf or set(xf.users) != {pow_, normed}:
        return None
    cast = _only_user(normed)
    if not _is_method(cast, "to") or cast.args != (normed, dtype) or cast.kwargs:
        return None
    out = _only_user(cast)
    weight = _other(out, cast) if is_call(out, MUL_TARGETS) else None
    if not isinstance(weight, fx.Node):
        return None
    return out, weight, eps, [xf, pow_, mean, add, rsqrt, normed, cast, out]


def _match_rope(z: fx.Node, ndim: int) -> tuple[fx.Node, fx.Node, fx.Node, list[fx.Node]] | None:
    """(output, cos, sin, nodes) when z's only uses are `z * cos + cat((-x2, x1), -1) * sin` (x1, x2 = z.chunk(2))."""
    if len(z.users) != 2:
        return None
    chunk = next((u for u in z.users if _is_method(u, "chunk")), None)
    mul_cos = next((u for u in z.users if is_call(u, MUL_TARGETS)), None)
    if chunk is None or mul_cos is None or chunk.args[:2] != (z, 2):
        return None
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    if not _last_dim(dim, ndim) or len(chunk.users) != 2:
        return None
    halves = {u.args[1]: u for u in chunk.users if is_call(u, (operator.getitem,))}
    if set(halves) != {0, 1}:
        return None
    x1, x2 = halves[0], halves[1]
    neg, cat = _only_user(x2), _only_user(x1)
    if not is_call(neg, _NEG) or _only_user(neg) is not cat or not is_call(cat, (torch.cat,)):
        return None
    cat_dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if list(cat.args[0]) != [neg, x1] or not _last_dim(cat_dim, ndim):
        return None
    mul_sin = _only_user(cat)
    sin = _other(mul_sin, cat) if is_call(mul_sin, MUL_TARGETS) else None
    cos = _other(mul_cos, z)
    add = _only_user(mul_sin) if isinstance(sin, fx.Node) else None
    if not isinstance(cos, fx.Node) or add is None or _only_user(mul_cos) is not add or not is_call(add, ADD_TARGETS):
        return None
    if _other(add, mul_cos) is not mul_sin:
        return None
    return add, cos, sin, [chunk, x1, x2, neg, cat, mul_sin, mul_cos, add]


def _one_half(t: fx.Node, ndim: int) -> fx.Node:
    """c for t = cat((c, c), -1): cos/sin given as the one half both halves share (`rope_cos_sin`); else t."""
    if not is_call(t, (torch.cat,)) or len(t.args[0]) != 2 or t.args[0][0] is not t.args[0][1]:
        return t
    dim = t.args[1] if len(t.args) > 1 else t.kwargs.get("dim", 0)
    return t.args[0][0] if _last_dim(dim, ndim) else t


class _Match:
    def __init__(self, call, y, split, views, outs, cos, sin, norm_weights, eps, head_dim, dead):
        self.call, self.y, self.split, self.views, self.outs = call, y, split, views, outs
        self.cos, self.sin, self.norm_weights, self.eps, self.head_dim, self.dead = (
            cos, sin, norm_weights, eps, head_dim, dead
        )  # fmt: skip


def _match(gm: fx.GraphModule, call: fx.Node, op) -> _Match | None:
    if not is_call(call, (op,)) or len(call.args) != 7 or call.kwargs:
        return None
    _x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = call.args
    if len(weights) != 3 or bias is not None or lora_inputs or len(lora_Bs) != 3:
        return None
    y = _only_user(call)
    split = _only_user(y) if is_call(y, (operator.getitem,)) and y.args[1] == 0 else None
    if not is_call(split, (torch.split,)) or len(split.args) != 2 or split.kwargs.get("dim") != -1:
        return None
    parts = {u.args[1]: u for u in split.users if is_call(u, (operator.getitem,))}
    if set(parts) != {0, 1, 2} or len(split.users) != 3:
        return None
    views = [_only_user(parts[i]) for i in range(3)]
    if not all(_is_method(v, "view") and v.args[0] is parts[i] for i, v in enumerate(views)):
        return None
    y_value, values = example_value(gm, y), [example_value(gm, v) for v in views]
    if y_value is None or any(v is None for v in values):
        return None
    head_dim, lead = values[0].shape[-1], y_value.shape[:-1]
    if any(v.shape[:-2] != lead or v.shape[-1] != head_dim or v.dim() != y_value.dim() + 1 for v in values):
        return None
    ndim = values[0].dim()
    outs, dead, norm = [], [], []
    cos_sin = set()
    for view in views[:2]:  # q and k: optional norm, then RoPE
        z = view
        n = _match_rms_norm(view, ndim, y_value.dtype)
        if n is not None:
            z, weight, eps, nodes = n
            norm.append((weight, eps))
            dead += nodes
        r = _match_rope(z, ndim)
        if r is None:
            return None
        out, cos, sin, nodes = r
        cos_sin.add((_one_half(cos, ndim), _one_half(sin, ndim)))
        dead = [t for t in (cos, sin) if _one_half(t, ndim) is not t] + dead + nodes  # erased last
        outs.append(out)
    if len(cos_sin) != 1 or len(norm) not in (0, 2) or len({eps for _, eps in norm}) > 1:
        return None
    (cos, sin), norm_weights = cos_sin.pop(), [w for w, _ in norm]
    if not all(is_frozen(gm, t) for t in (cos, sin, *norm_weights)):
        return None
    cos_value = example_value(gm, cos)
    if cos_value is None or cos_value.dim() != ndim or cos_value.shape[-2:] not in ((1, head_dim), (1, head_dim // 2)):
        return None
    if any(depends_on(t, {call}) for t in (cos, sin, *norm_weights)):
        return None
    out_values = [example_value(gm, o) for o in outs]
    if any(v is None or v.dtype != y_value.dtype or v.shape != values[i].shape for i, v in enumerate(out_values)):
        return None
    eps = norm[0][1] if norm else 0.0
    dead = [*reversed(dead), *views, *parts.values(), split, y]
    return _Match(call, y, split, views, [*outs, views[2]], cos, sin, norm_weights, eps, head_dim, dead)


def _rewrite(gm: fx.GraphModule, m: _Match) -> None:
    graph = gm.graph
    lora_Bs, scalings = list(m.call.args[4]), list(m.call.args[5])
    m.call.args = (*m.call.args[:4], [], *m.call.args[5:])  # no B; the scalings stay (unused by the op without B)
    propagate_fake(gm, m.call)
    for t in (m.cos, m.sin, *m.norm_weights):
        hoist_before(t, m.split)
    with graph.inserting_before(m.split):
        y = graph.call_function(operator.getitem, (m.call, 0))
        xa = graph.call_function(operator.getitem, (m.call, 1))
        args = (y, xa, lora_Bs, scalings, m.norm_weights, m.cos, m.sin, m.head_dim, m.eps)
        fused = graph.call_function(QKV_ROPE_LORA, args)
        outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
    meta = {k: m.outs[0].meta[k] for k in ("stack_trace", "nn_module_stack") if k in m.outs[0].meta}
    for new in (y, xa, fused, *outs):
        new.meta.update(meta)
    value = m.call.meta.get("example_value")
    if value is not None:
        y.meta["example_value"], xa.meta["example_value"] = value[0], value[1]
        propagate_fake(gm, fused)
        for i, new in enumerate(outs):
            if "example_value" in fused.meta:
                new.meta["example_value"] = fused.meta["example_value"][i]
    for old, new in zip(m.outs, outs):
        old.replace_all_uses_with(new)
    for node in m.dead:
        if not node.users:
            graph.erase_node(node)


def fuse_qkv_rope_lora(gm: fx.GraphModule, op) -> int:
    """Rewrite every q/k/v group of `op` (the recipe's LoRA op) feeding RoPE; returns how many."""
    matches = [m for n in list(gm.graph.nodes) if (m := _match(gm, n, op)) is not None]
    for m in matches:
        _rewrite(gm, m)
    if matches:
        gm.graph.lint()
        gm.recompile()
    log.debug("fuse_qkv_rope_lora: %d", len(matches))
    return len(matches)
