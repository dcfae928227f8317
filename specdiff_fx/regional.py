"""Compile a variant block by block, each distinct block once (``regional_compile=True``).

Reads: a rewritten variant graph (what :func:`~specdiff_fx.variants.build_variant` hands to
Inductor), its example inputs and the plan's blocks. Writes: a ``GraphModule`` that calls one
compiled region after another: the nodes before the first block, each block's nodes, the nodes
between and after, in graph order (``torch.fx.passes.split_module``). Nodes that a pass inserted
without a module stack belong to the region of the node before them.

Keeps true: the same outputs and the same in-place cache updates as compiling the whole graph
(the regions run in graph order, each an Inductor graph of its own). Two regions share one
compiled function only when their graphs are identical node for node (op, target, arguments
with nodes by position, constants; tensor constants by identity) and their inputs have the same
shapes, strides, offsets, dtypes and aliasing among them: in a Dynamo graph a block's weights are
inputs, so the blocks of one kind differ only there. A region that reads a module attribute
(``get_attr``) is shared only with regions reading the same object.

Why: Inductor compiles a whole graph's nodes in one process; a DiT repeats one or two block
kinds 20-60 times, and specdiff compiles three variants of it. Compiling each kind once makes
the first generation's wait shorter (``BENCHMARKS.md``, the GPU section); what it costs is
Inductor's fusion across block boundaries (a residual add and the next block's norm) and a
Python call per region.
"""

from __future__ import annotations

import operator
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from .graph_utils import module_paths
from .plan import DiTPlan


def region_labels(gm: fx.GraphModule, plan: DiTPlan) -> dict[fx.Node, int]:
    """Each computing node's region number: consecutive nodes of one block, or consecutive
    nodes of no block, share one; a node without a module stack joins the node before it."""
    blocks = {b.path for b in plan.blocks}
    labels: dict[fx.Node, int] = {}
    region, current, last = -1, None, object()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        paths = [p for p, _ in module_paths(node)]
        if paths:
            current = next((p for p in paths if p in blocks), None)
        if current != last:
            region, last = region + 1, current
        labels[node] = region
    return labels


def region_signature(sub: fx.GraphModule, args: Sequence[Any]) -> tuple:
    """What must agree for two regions to share one compiled function (see the module docstring)."""
    index: dict[fx.Node, int] = {}
    items: list[tuple] = []
    placeholders = 0
    storages: dict[tuple[Any, int], int] = {}  # inputs sharing memory: the compile assumed that aliasing

    def leaf(a: Any) -> Any:  # nodes by position; a tensor constant by identity (its repr elides values)
        if isinstance(a, fx.Node):
            return ("node", index[a])
        return ("tensor", id(a)) if isinstance(a, torch.Tensor) else a

    for i, node in enumerate(sub.graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            a = args[placeholders]
            if isinstance(a, torch.Tensor):
                key = (a.device, a.untyped_storage().data_ptr()) if a.device.type != "meta" else (a.device, id(a))
                alias = storages.setdefault(key, placeholders)
                items.append(("in", tuple(a.shape), a.stride(), a.storage_offset(), a.dtype, a.device, alias))
            else:
                items.append(("in", type(a).__name__, repr(a)))
            placeholders += 1
        elif node.op == "get_attr":
            obj = sub
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            items.append(("attr", id(obj)))
        else:
            where = fx.node.map_aggregate((node.args, node.kwargs), leaf)
            items.append((node.op, str(node.target), repr(where)))
    return tuple(items)


def canonical_outputs(split: fx.GraphModule) -> None:
    """Each region returns its outputs in the order its graph defines them (``split_module``
    orders them by their first use in later regions, which differs between the last block of
    a kind and the others); the parent's ``getitem`` users follow. In place."""
    for call in split.graph.find_nodes(op="call_module"):
        sub = getattr(split, call.target)
        out = sub.graph.output_node()
        values = out.args[0]
        if not isinstance(values, (tuple, list)) or len(values) < 2:
            continue
        position = {n: i for i, n in enumerate(sub.graph.nodes)}
        order = sorted(range(len(values)), key=lambda i: position.get(values[i], -1))
        if order == list(range(len(values))):
            continue
        users = list(call.users)
        if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
            continue  # the tuple is used whole: keep its order
        out.args = (type(values)(values[i] for i in order),)
        sub.recompile()
        new_index = {old: new for new, old in enumerate(order)}
        for u in users:
            u.args = (call, new_index[u.args[1]])
    split.recompile()


class _Compiled(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def compile_regions(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: DiTPlan,
                    compile_fn: Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]
                    ) -> fx.GraphModule:
    """Split ``gm`` at block boundaries, compile each distinct region once with
    ``compile_fn(region, example_inputs)``, and return the stitched graph module (call as
    ``fn(*args)``; ``fn.meta["specdiff_regions"]`` says what it did: ``regions``, ``compiled``,
    ``seconds``). Runs ``gm`` once on
    ``example_inputs`` (each region compiles with the tensors that reach it; the example
    inputs' caches are written in place, as a call writes them)."""
    from torch.fx.passes.split_module import split_module

    t0 = time.perf_counter()
    labels = region_labels(gm, plan)
    split = split_module(gm, None, lambda node: labels[node])
    canonical_outputs(split)
    compiled: dict[tuple, Callable[..., Any]] = {}
    names: list[str] = []

    class Compile(fx.Interpreter):
        def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
            sub = getattr(split, target)
            sig = region_signature(sub, args)
            if sig not in compiled:
                compiled[sig] = compile_fn(sub, list(args))
            names.append(target)
            setattr(split, target, _Compiled(compiled[sig]))
            return compiled[sig](*args)

    with torch.no_grad():
        Compile(split).run(*example_inputs)
    split.recompile()
    split.meta["specdiff_regions"] = {"regions": len(names), "compiled": len(compiled),
                                      "seconds": time.perf_counter() - t0}
    return split


def regional_compile_fx(patches: Mapping[str, Any] | None) -> Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]:
    """``compile_fn`` for :func:`compile_regions`: Inductor with ``patches``, each region
    compiled outside Dynamo's tracing context. The full variant is built while Dynamo compiles
    the frame; inside its context Inductor takes Dynamo's fake mode and shape environment, but a
    region's inputs (the tensors one region hands the next) have no source in the frame, and a
    guard Inductor records on them breaks the frame's guards (``IndexError`` in
    ``produce_guards``: FLUX's regions receive non-contiguous views, whose strides it checks).
    The regions' shapes are static; the frame's own guards on its inputs cover them."""
    from torch._inductor.compile_fx import compile_fx

    def compile_fn(sub: fx.GraphModule, args: list[Any]) -> Callable[..., Any]:
        with torch._guards.tracing(None):
            return compile_fx(sub, args, config_patches=dict(patches) if patches else None)

    return compile_fn
