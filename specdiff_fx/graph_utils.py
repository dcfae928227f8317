"""Helpers shared by the passes: cloning Dynamo graphs, module paths, placeholders."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

_MODULES = re.compile(r"__dict__\['_modules'\]\['([^']+)'\]|\['([^']+)'\]|\.([A-Za-z_0-9]+)")


#: how Dynamo names the compiled module in module stacks: itself, or (a model with diffusers
#: hooks, e.g. context parallelism) the ``function_reference`` its hook registry's forward calls
_ROOTS = ("L['function_reference'].forward.__self__", "L['self']")
#: ... and in placeholder names of its parameters and buffers
MODULE_STATE_PREFIXES = ("l_self_", "l_function_reference_forward_self_")


def static_fake_mode() -> FakeTensorMode:
    """A fake mode for the passes' shape propagation and FLOP counts: static shapes, and a
    shape environment so that a graph that reads a Python number from a tensor (``.item()``:
    Dynamo passes a float attribute that changed between calls, such as a LoRA adapter's scale
    after ``set_adapters``, as a 0-d tensor input) propagates it as an unknown number instead
    of failing."""
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)


def is_parameter_input(placeholder: fx.Node) -> bool:
    """Whether a placeholder of a Dynamo graph is one of the compiled module's parameters
    (Dynamo names them ``..._parameters_<name>_``)."""
    return "_parameters_" in placeholder.name


def module_path(key: str) -> str:
    """``L['self'].__dict__['_modules']['transformer_blocks'].0.attn`` -> ``transformer_blocks.0.attn``."""
    for root in _ROOTS:
        if key.startswith(root):
            key = key[len(root):]
            break
    parts = [a or b or c for a, b, c in _MODULES.findall(key)]
    return ".".join(p for p in parts if p not in ("__dict__", "_modules"))


def innermost_module(node: fx.Node) -> tuple[str, str] | None:
    """(path, class name) of the innermost module that produced ``node``, if any."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return module_path(path), getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))


def module_paths(node: fx.Node) -> list[tuple[str, str]]:
    """Every (path, class name) on ``node``'s module stack, outermost first."""
    out = []
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        out.append((module_path(path), getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))))
    return out


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo graph module that passes may edit freely.

    Node metadata is copied shallowly (fake tensors are shared, never mutated), and the
    attributes AOT autograd reads from Dynamo graphs (``_param_name_to_source`` and each
    placeholder's ``_dynamo_source``) are carried over.
    """
    graph = fx.Graph()
    value, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(value).meta = dict(old_output.meta)
    new = fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, cur in zip(gm.graph.find_nodes(op="placeholder"), new.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            cur._dynamo_source = old._dynamo_source
    return new


def add_placeholder(gm: fx.GraphModule, name: str, example: torch.Tensor) -> fx.Node:
    """Append a graph input after the last placeholder; ``example`` is its fake value."""
    last = list(gm.graph.find_nodes(op="placeholder"))[-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    node.meta["val"] = example
    node._dynamo_source = None  # a new input: no source in user code
    return node


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def set_operand(node: fx.Node, path: tuple, value: Any) -> None:
    """Replace the operand at ``path`` (from :func:`layout._tensor_operands`)."""
    where = path[0]
    if where == "args":
        args = list(node.args)
        if len(path) == 2:
            args[path[1]] = value
        else:
            seq = list(args[path[1]])
            seq[path[2]] = value
            args[path[1]] = type(node.args[path[1]])(seq)
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[path[1]] = value
        node.kwargs = kwargs


def get_operand(node: fx.Node, path: tuple) -> Any:
    if path[0] == "args":
        v = node.args[path[1]]
        return v if len(path) == 2 else v[path[2]]
    return node.kwargs[path[1]]


def example_value(placeholder: fx.Node) -> torch.Tensor | None:
    """The concrete tensor a graph input held when the graph was compiled, if still known:
    what :func:`~specdiff_fx.passes.specialize_shapes` recorded for a specialised graph
    (``meta["specdiff_example"]``, a weak reference), else Dynamo's ``meta["grapharg"]``.
    ``None`` when neither is available or the value no longer matches the input's shape."""
    ref = placeholder.meta.get("specdiff_example")
    value = ref() if callable(ref) else None
    if value is None:
        try:
            value = placeholder.meta["grapharg"].example
        except (KeyError, AttributeError, TypeError):
            value = None
    if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
        return None
    fake = placeholder.meta.get("val", placeholder.meta.get("example_value"))
    if isinstance(fake, torch.Tensor) and tuple(fake.shape) != tuple(value.shape):
        return None
    return value


def graph_fingerprint(gm: fx.GraphModule, example_inputs: list[Any] | tuple[Any, ...]) -> tuple | None:
    """A hashable key for "the same computation on the same kind of inputs": every node's op,
    target and operands (operands by position, so node names do not matter; a placeholder by
    its target, which the passes read), each input's shape, strides, dtype, device and
    ``requires_grad``, and the identity of each parameter input and of each ``get_attr``
    value. Two graphs with equal keys compute the same thing for the same arguments.
    ``None`` for a graph with a non-tensor input (a symbolic size) or an operand that cannot
    be keyed."""
    if not all(isinstance(a, torch.Tensor) for a in example_inputs):
        return None
    index: dict[fx.Node, int] = {}

    def key(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return ("%", index[value])
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, *(key(v) for v in value))
        if isinstance(value, dict):
            return ("dict", *((k, key(v)) for k, v in value.items()))
        if isinstance(value, slice):
            return ("slice", key(value.start), key(value.stop), key(value.step))
        if isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise TypeError("a tensor or symbolic operand")
        return value

    nodes = []
    try:
        for i, node in enumerate(gm.graph.nodes):
            index[node] = i
            target = node.target
            if node.op == "get_attr":
                target = ("attr", target, id(getattr(gm, target, None)))
            elif node.op == "call_module":
                target = ("module", target, id(gm.get_submodule(target)))
            nodes.append((node.op, target, key(node.args), key(node.kwargs)))
        inputs = tuple((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad,
                        id(a) if isinstance(a, torch.nn.Parameter) else None) for a in example_inputs)
        fingerprint = (tuple(nodes), inputs)
        hash(fingerprint)
    except (TypeError, KeyError, RuntimeError, AttributeError):
        return None
    return fingerprint
