"""Before analysis, for dynamic graphs: specialise a symbolic-shape graph to one concrete shape.

Dynamo turns a dimension dynamic once it has seen two sizes (a second resolution), so a
plain ``torch.compile(..., backend="specdiff")`` receives symbolic graphs after a
resolution change. The rewrite needs static token counts (``k`` is static per variant),
so the backend specialises such a graph per concrete input shape, as ``dynamic=False``
would, and keeps one runtime (with its own state) per shape; a shape whose static graph the
backend compiled before (Dynamo's graph before it went symbolic) gets that graph's runtime.

Reads: the graph and one concrete call's arguments (tensors, and ints for SymInt inputs).
Writes: a new graph in which every non-tensor value (SymInt inputs, size arithmetic,
shape asserts, ``.item()`` of scalar inputs) is replaced by its constant, SymInt inputs are removed, and every node's
``meta["val"]`` is a fake tensor with static shapes (Dynamo's symbolic
``example_value`` is dropped); each tensor input's ``meta["specdiff_example"]`` is a weak
reference to the concrete argument (read by :func:`~specdiff_fx.graph_utils.example_value`
while the call that specialises is running; never kept alive by the graph).
A number read from a scalar input with ``.item()`` (Dynamo passes a float that changed between
calls, e.g. a LoRA adapter's scale, as a 0-d tensor) is baked in too: the caller keys each
specialisation on those inputs' values as well (:func:`read_scalars`).
Keeps true: for inputs of that concrete shape the new graph computes what the old one did
(side-effectful nodes, e.g. the ``setitem`` of an in-place write, are never removed).
Returns the graph and the indices of the inputs it still takes.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ..graph_utils import clone_graph_module


def _is_constant(value: Any) -> bool:
    if isinstance(value, (int, float, bool, type(None), torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if isinstance(value, (tuple, list, torch.Size)):
        return all(_is_constant(v) for v in value)
    return False


def _concrete(value: Any) -> Any:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.pytype(value)  # hint of a backed symbol
    if isinstance(value, torch.Size):
        return tuple(_concrete(v) for v in value)
    if isinstance(value, (tuple, list)):
        return type(value)(_concrete(v) for v in value)
    return value


def read_scalars(gm: fx.GraphModule) -> list[int]:
    """The indices of the inputs whose value :func:`specialize_shapes` bakes in: those read
    with ``.item()``."""
    return [i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))
            if any(u.op == "call_method" and u.target == "item" for u in p.users)]


def specialize_shapes(gm: fx.GraphModule, args: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    new = clone_graph_module(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
    values: dict[fx.Node, Any] = {}

    # scalar inputs' values, read outside the fake mode (which would turn them fake)
    scalars = {p: a.item() for p, a in zip(new.graph.find_nodes(op="placeholder"), args)
               if isinstance(a, torch.Tensor) and a.numel() == 1}

    class Interp(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            source = n.args[0] if n.args else None
            if n.op == "call_method" and n.target == "item" and source in scalars:
                result = scalars[source]  # a scalar input Dynamo made dynamic (e.g. an eps)
            else:
                result = super().run_node(n)
            values[n] = result
            return result

    with mode, torch.no_grad():
        Interp(new).run(*fake_args)

    placeholders = list(new.graph.find_nodes(op="placeholder"))
    for node, a in zip(placeholders, args):  # the concrete inputs, for analyses that read values
        node.meta.pop("specdiff_example", None)
        if isinstance(a, torch.Tensor):
            node.meta["specdiff_example"] = weakref.ref(a)
    for node in list(new.graph.nodes):
        if node.op == "output":
            continue
        value = values.get(node)
        if isinstance(value, torch.Tensor):
            node.meta["val"] = value
            node.meta.pop("example_value", None)
            continue
        if not _is_constant(value):
            continue  # tuples of tensors (split results) etc. stay
        constant = _concrete(value)
        for user in list(node.users):
            user.args = fx.map_arg(user.args, lambda x, node=node, c=constant: c if x is node else x)
            user.kwargs = fx.map_arg(user.kwargs, lambda x, node=node, c=constant: c if x is node else x)
    for node in reversed(list(new.graph.nodes)):  # unused constants; in-place writes (value None) stay
        if node.op != "output" and not node.users and not isinstance(values.get(node), torch.Tensor) \
                and _is_constant(values.get(node)) and (node.op == "placeholder" or not node.is_impure()):
            new.graph.erase_node(node)
    remaining = {n.name for n in new.graph.find_nodes(op="placeholder")}
    kept = [i for i, p in enumerate(placeholders) if p.name in remaining]
    new.graph.lint()
    new.recompile()
    return new, kept
