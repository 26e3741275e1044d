"""Small FX helpers shared by the passes: reading a node's example tensor, moving nodes earlier, fake propagation."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
ADD_TARGETS = (operator.add, torch.add, torch.Tensor.add)
MUL_TARGETS = (operator.mul, torch.mul, torch.Tensor.mul)
DROPOUT_TARGETS = (F.dropout, torch.dropout, torch.nn.functional.dropout)


def example_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The (fake or real) tensor a node stands for: Dynamo's `example_value`/`val` meta, or a get_attr's tensor."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None and node.op == "get_attr":
        value = operator.attrgetter(node.target)(gm)
    return value if isinstance(value, torch.Tensor) else None


def is_frozen(gm: fx.GraphModule, node: fx.Node | None) -> bool:
    """True for a tensor we know does not require grad (unknown counts as not frozen: never drop a gradient)."""
    if node is None:
        return True
    value = example_value(gm, node)
    return value is not None and not value.requires_grad


def is_call(node: object, targets: tuple) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(input, weight, bias) of a `linear` call, whether given positionally or by keyword."""
    names = ("input", "weight", "bias")
    values = dict(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    return values["input"], values["weight"], values.get("bias")


def hoist_before(node: fx.Node, anchor: fx.Node) -> None:
    """Move `node` (and, first, whatever it needs) just before `anchor` if it currently comes after it."""
    position = {n: i for i, n in enumerate(anchor.graph.nodes)}
    if position[node] < position[anchor]:
        return
    for dependency in node.all_input_nodes:
        hoist_before(dependency, anchor)
    anchor.prepend(node)


def depends_on(node: fx.Node, others: set[fx.Node]) -> bool:
    """Whether `node` is (transitively) computed from any node in `others`."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in others:
            return True
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


def propagate_fake(gm: fx.GraphModule, node: fx.Node) -> None:
    """Fill `example_value` of a new call node by running it on its inputs' fake tensors (later passes read it); a
    getitem of a tuple-valued op takes its item."""
    if node.target is operator.getitem:
        value = node.args[0].meta.get("example_value")
        if isinstance(value, (tuple, list)):
            node.meta["example_value"] = value[node.args[1]]
        return
    fakes = [example_value(gm, n) for n in node.all_input_nodes]
    if any(f is None for f in fakes):
        return
    # The inputs' own fake mode (not detect_fake_mode: inside a backend that finds the tracing context's mode).
    modes = {id(f.fake_mode): f.fake_mode for f in fakes if isinstance(f, FakeTensor)}
    if len(modes) != 1 or len(fakes) != sum(isinstance(f, FakeTensor) for f in fakes):
        return
    (fake_mode,) = modes.values()
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: example_value(gm, n))
    with fake_mode:
        node.meta["example_value"] = node.target(*args, **kwargs)
