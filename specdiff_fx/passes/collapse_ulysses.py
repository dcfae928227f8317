"""Before analysis, for context-parallel graphs: fold diffusers' Ulysses exchanges into ops.

Under ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=W))``
each rank's Dynamo graph computes its shard of the tokens; every attention exchanges its
query, key and value (``reshape -> permute -> all_to_all_single -> wait -> reshape ->
flatten -> permute``) so that the rank attends over all tokens with ``H/W`` heads, and
exchanges the output back; after ``proj_out`` the shards are all-gathered. The token
layout rules cannot follow a token axis through those flattens (the rank axis merges into
it), so this pass rewrites each exchange-attend-exchange chain into one
:func:`specdiff_fx.ops.ulysses_attention` call on this rank's tokens with all heads
(``[B, H, S, d]``, the layout of a plain attention), and the final gather into one
top-level :func:`specdiff_fx.ops.gather_shards` (outside ``proj_out``'s module, so the
output projection ends at the rank's own tokens). After it the graph reads as a
single-device DiT over ``N / W`` image tokens whose attention happens to see every rank's
keys: the token subset and the tiers stay per rank. The variant passes then give the
attention its K/V caches in the layout after the exchange
(:func:`~specdiff_fx.passes.expose_attention_kv`,
:func:`~specdiff_fx.passes.attend_with_kv_cache`), so a cached step exchanges only the
queries, keys and values of this rank's computed tokens (and their outputs).

Reads: the Dynamo graph (op targets, ``example_value``/``val`` shapes, permute dims).
Writes: a copy of the graph with the chains replaced, ``gm.meta["specdiff_parallel"] =
(group_name, world_size, rank)`` (the rank in that group, read from the process group:
the pass runs in the rank's process); the input graph is returned untouched (same object) when it
holds no Ulysses exchange.
Keeps true: the new graph computes what the old one did (same exchanges, same head split,
the same attention), for inputs of the traced shapes. A chain that differs from the
template in any checked detail is left as it is (the analysis then rejects the graph and
the backend falls back, correctly, to plain Inductor).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from ..graph_utils import clone_graph_module
from ..layout import node_shape, node_value, op_name, sdpa_args


_COLLECTIVES = {"all_to_all_single": "a2a", "wait_tensor": "wait", "all_gather_into_tensor": "gather"}


def _kind(node: fx.Node) -> str | None:
    target = node.target
    packet = getattr(target, "overloadpacket", target)  # an overload (``.default``) or its packet
    if node.op == "call_function" and isinstance(packet, torch._ops.OpOverloadPacket):
        namespace, _, name = packet._qualified_op_name.partition("::")
        if namespace == "_c10d_functional":
            return _COLLECTIVES.get(name)
    return op_name(node)


def _dims(node: fx.Node) -> tuple:
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if "dims" in node.kwargs:
        rest = tuple(node.kwargs["dims"])
    return tuple(rest)


def _flatten_range(node: fx.Node) -> tuple:
    args = list(node.args[1:]) + [node.kwargs[k] for k in ("start_dim", "end_dim") if k in node.kwargs]
    return tuple(args) or (0, -1)


#: diffusers' ``TemplatedUlyssesAttention`` (``attention_dispatch.py``), walked backwards from
#: an SDPA operand: each entry is (op, dims) with dims checked for permutes and flattens
_INTO = (("permute", (0, 2, 1, 3)), ("contiguous", None), ("permute", (1, 0, 2, 3)), ("flatten", (0, 1)),
         ("reshape", None), ("wait", None), ("a2a", None), ("flatten", (0, -1)), ("contiguous", None),
         ("permute", (2, 1, 0, 3, 4)), ("reshape", None))
#: ... and forwards from the SDPA output
_BACK = (("permute", (0, 2, 1, 3)), ("reshape", None), ("permute", (1, 3, 0, 2, 4)), ("contiguous", None),
         ("flatten", (0, -1)), ("a2a", None), ("wait", None), ("reshape", None), ("flatten", (0, 1)),
         ("permute", (1, 2, 0, 3)), ("contiguous", None))


def _step_ok(node: fx.Node, kind: str, dims) -> bool:
    if _kind(node) != kind:
        return False
    if dims is None:
        return True
    return (_dims(node) if kind == "permute" else _flatten_range(node)) == dims


def _walk_into(arg: fx.Node) -> tuple[fx.Node, str, int] | None:
    """The ``[B, S, H, d]`` tensor a Ulysses-exchanged SDPA operand came from, the group
    name and the world size; None if ``arg`` is not such an operand."""
    node, group = arg, None
    for kind, dims in _INTO:
        if not isinstance(node, fx.Node) or not _step_ok(node, kind, dims) or len(node.users) != 1:
            return None
        if kind == "a2a":
            group = node.args[3] if len(node.args) > 3 else node.kwargs.get("group_name")
            if list(node.args[1]) != list(node.args[2]) or len(set(node.args[1])) != 1:
                return None
        last_reshape, node = node, node.args[0]
    src, split = node_shape(node), node_shape(last_reshape)
    if src is None or split is None or len(src) != 4 or len(split) != 5:
        return None
    b, s, h, d = src
    if split[:2] != (b, s) or split[4] != d or split[2] * split[3] != h or not isinstance(group, str):
        return None
    return node, group, split[2]


def _walk_back(out: fx.Node) -> tuple[fx.Node, str] | None:
    """The last node of the reverse exchange after an SDPA output, and its group name."""
    node, group = out, None
    for kind, dims in _BACK:
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if not _step_ok(node, kind, dims):
            return None
        if kind == "a2a":
            group = node.args[3] if len(node.args) > 3 else node.kwargs.get("group_name")
    return node, group


def _new(graph: fx.Graph, like: fx.Node, target, args, kwargs, val, stack: bool = True) -> fx.Node:
    node = graph.call_function(target, args, kwargs)
    node.meta["example_value"] = val
    if stack and "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    return node


def _collapse_attention(gm: fx.GraphModule, sdpa: fx.Node) -> tuple[str, int] | None:
    args = sdpa_args(sdpa)
    found = [_walk_into(args[name]) for name in ("query", "key", "value")]
    back = _walk_back(sdpa)
    if any(f is None for f in found) or back is None or args.get("attn_mask") is not None:
        return None
    groups = {f[1] for f in found} | {back[1]}
    worlds = {f[2] for f in found}
    if len(groups) != 1 or len(worlds) != 1:
        return None
    (group,), (world,) = groups, worlds
    last = back[0]
    b, s_q, h, d = node_shape(found[0][0])
    if node_shape(last) != (b, s_q, h, d):
        return None
    g = gm.graph
    with g.inserting_before(sdpa):
        heads_first = [_new(g, sdpa, torch.transpose, (f[0], 1, 2), {}, node_value(f[0]).transpose(1, 2))
                       for f in found]
        attended = _new(g, sdpa, ops.ulysses_attention, tuple(heads_first),
                        {"attn_mask": None, "dropout_p": args.get("dropout_p", 0.0),
                         "is_causal": args.get("is_causal", False), "scale": args.get("scale"),
                         "group_name": group, "world_size": world},
                        node_value(heads_first[0]).new_empty((b, h, s_q, d)))
        tokens_first = _new(g, sdpa, torch.transpose, (attended, 1, 2), {}, node_value(attended).transpose(1, 2))
    last.replace_all_uses_with(tokens_first)
    return group, world


def _gathered_dim(wait: fx.Node, src: fx.Node, world: int) -> tuple[fx.Node, int] | None:
    """How the gathered ``[W * B, ...]`` tensor becomes the output: ``cat(chunk(x, W, 0),
    dim)``, or (when every axis before ``dim`` has size 1, e.g. batch 1) a ``view`` to the
    same shape. Returns the last node and ``dim``."""
    if len(wait.users) != 1:
        return None
    user = next(iter(wait.users))
    shape, out = node_shape(src), None
    if op_name(user) == "chunk" and (user.args[1:] in ((world, 0), (world,)) and user.kwargs.get("dim", 0) == 0):
        getitems = sorted(user.users, key=lambda n: n.args[1] if op_name(n) == "getitem" else -1)
        if len(getitems) != world or [n.args[1] for n in getitems] != list(range(world)):
            return None
        cats = {next(iter(n.users)) for n in getitems if len(n.users) == 1}
        if len(cats) != 1:
            return None
        out = cats.pop()
        if op_name(out) != "cat" or list(out.args[0]) != getitems:
            return None
        return out, out.args[1] if len(out.args) > 1 else out.kwargs.get("dim", 0)
    if op_name(user) in ("view", "reshape") and shape is not None:
        got = node_shape(user)
        for dim in range(len(shape)):
            if all(s == 1 for s in shape[:dim]) and got == (*shape[:dim], shape[dim] * world, *shape[dim + 1:]):
                return user, dim
    return None


def _collapse_gather(gm: fx.GraphModule) -> tuple[str, int] | None:
    """``cat(chunk(wait(all_gather_into_tensor(contiguous(x), W, group)), W, 0), dim)`` at
    the graph output (or its ``view`` form) -> ``gather_shards(x, dim, group, W)`` at top level."""
    for node in gm.graph.nodes:
        if _kind(node) != "gather" or len(node.users) != 1:
            continue
        wait = next(iter(node.users))
        world, group = node.args[1], node.args[2]
        src = node.args[0]
        if op_name(src) == "contiguous":
            src = src.args[0]
        found = _gathered_dim(wait, src, world) if _kind(wait) == "wait" else None
        if found is None:
            continue
        last, dim = found
        with gm.graph.inserting_before(last):
            new = _new(gm.graph, last, ops.gather_shards, (src, dim, group, world), {}, node_value(last), stack=False)
        last.replace_all_uses_with(new)
        return group, world
    return None


def collapse_ulysses(gm: fx.GraphModule) -> fx.GraphModule:
    sdpas = [n for n in gm.graph.nodes if op_name(n) == "sdpa"]
    if not any(_kind(n) == "a2a" for n in gm.graph.nodes):
        return gm
    new = clone_graph_module(gm)
    by_name = {n.name: n for n in new.graph.nodes}
    found = {_collapse_attention(new, by_name[n.name]) for n in sdpas}
    gathered = _collapse_gather(new)
    found.discard(None)
    if gathered is not None:
        found.add(gathered)
    # the replaced exchanges are dead now; FX counts collectives as impure, so say they are not
    new.graph.eliminate_dead_code(is_impure_node=lambda n: _kind(n) not in ("a2a", "wait", "gather") and n.is_impure())
    if len(found) != 1 or any(_kind(n) in ("a2a", "gather") for n in new.graph.nodes):
        return gm  # something the template does not cover: leave the graph to the fallback
    new.graph.lint()
    new.recompile()
    group, world = found.pop()
    from torch.distributed.distributed_c10d import _resolve_process_group

    new.meta["specdiff_parallel"] = (group, world, torch.distributed.get_rank(_resolve_process_group(group)))
    return new
