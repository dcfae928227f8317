"""Analysis: recognise a diffusers DiT in a Dynamo graph and describe it as a DiTPlan.

Reads: the Dynamo graph of a whole ``transformer.forward`` (``nn_module_stack`` and
``example_value``/``val`` metadata, placeholder names).
Writes: ``node.meta["specdiff"]`` (the node's :class:`~specdiff_fx.layout.NodeLayout`) on
the graph it analyses; returns a frozen :class:`~specdiff_fx.plan.DiTPlan`.
Keeps true: the graph's nodes and edges are untouched.
Raises :class:`NotADiT` with a readable reason for anything it does not recognise.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..families import Family, family_for_block_types
from ..graph_utils import get_operand, module_paths
from ..layout import LayoutError, node_shape, op_name, propagate_layouts, sdpa_args
from ..plan import AttentionSite, Block, DiTPlan


class NotADiT(RuntimeError):
    """The graph is not one the rewrite supports; ``str(e)`` says why."""


class DynamicShapes(NotADiT):
    """A supported DiT, but traced with symbolic shapes: specialise it per shape first
    (:func:`~specdiff_fx.passes.specialize_shapes`)."""


def _has_symbolic_shapes(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, torch.Tensor) and any(not isinstance(s, int) for s in val.shape):
            return True
        if isinstance(val, torch.SymInt):
            return True
    return False


def _last_node_of(gm: fx.GraphModule, path: str) -> fx.Node | None:
    """The last non-placeholder node produced inside module ``path`` that is a 3-d tensor."""
    found = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if any(p == path for p, _ in module_paths(node)):
            shape = node_shape(node)
            if shape is not None and len(shape) == 3:
                found = node
    return found


def _blocks(gm: fx.GraphModule, family: Family) -> tuple[Block, ...]:
    runs: dict[str, list[fx.Node]] = {}
    kinds: dict[str, str] = {}
    order: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":  # parameters carry a module stack too
            continue
        for path, cls in module_paths(node):
            head, _, rest = path.partition(".")
            idx = rest.split(".")[0]
            if head in family.block_lists and idx.isdigit() and path == f"{head}.{idx}":
                if path not in runs:
                    runs[path] = []
                    order.append(path)
                runs[path].append(node)
                kinds[path] = cls
    names = [n.name for n in gm.graph.nodes]
    blocks = []
    for path in order:
        nodes = runs[path]
        first, last = names.index(nodes[0].name), names.index(nodes[-1].name)
        if last - first + 1 != len(nodes):
            raise NotADiT(f"block {path} is not one contiguous run of graph nodes")
        blocks.append(Block(path, kinds[path], nodes[0].name, nodes[-1].name, len(nodes)))
    return tuple(blocks)


def _input_index(gm: fx.GraphModule, *names: str) -> int:
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        low = node.name.lower()
        if any(low in (f"l_kwargs_{n}_", f"l_{n}_") for n in names):
            return i
    raise NotADiT(f"no graph input named {' or '.join(names)}")


def analyze_dit(gm: fx.GraphModule) -> DiTPlan:
    """Find the image-token stream, blocks, attention calls and side inputs of a DiT graph."""
    type_names = {cls for node in gm.graph.nodes for _, cls in module_paths(node)}
    family = family_for_block_types(type_names)
    if family is None:
        raise NotADiT(
            "no supported DiT found: the graph has none of the transformer blocks of "
            "SD3Transformer2DModel or FluxTransformer2DModel"
        )
    if _has_symbolic_shapes(gm):
        raise DynamicShapes(f"{family.model_class} traced with dynamic (symbolic) shapes")
    start = _last_node_of(gm, family.embed)
    end = _last_node_of(gm, family.out_proj)
    if start is None or end is None:
        raise NotADiT(f"{family.model_class}: no image-token stream ({family.embed} -> {family.out_proj})")
    batch, n_img, width = node_shape(start)
    if node_shape(end)[:2] != (batch, n_img):
        raise NotADiT(f"output projection {end.name} is not [B, N, C] over the {n_img} image tokens")
    try:
        infos = propagate_layouts(gm.graph, start, end, n_img)
    except LayoutError as e:
        raise NotADiT(f"{family.model_class}: {e}") from e
    if infos[end].layout is None or infos[end].layout.spec() != (("img", n_img),) or infos[end].layout.axis != 1:
        raise NotADiT(f"output projection {end.name} does not carry exactly the image tokens")

    sites, sides = [], []
    for node, info in infos.items():
        node.meta["specdiff"] = info
        for path, layout in info.gathers:
            if layout.has_img:  # text-only operands are gathered (to nothing) only with context caching
                sides.append(get_operand(node, path).name)
        if op_name(node) == "sdpa":
            args = sdpa_args(node)
            _, heads, _, head_dim = node_shape(args["query"])
            block = next((p for p, _ in module_paths(node) if p.count(".") == 1), "")
            sites.append(AttentionSite(node.name, block, info.layout, heads, head_dim, args.get("scale")))
    if not sites:
        raise NotADiT(f"{family.model_class}: no attention over image tokens found")
    for info in infos.values():
        lay = info.layout
        if lay is not None and lay.axis == 0:
            raise NotADiT("a tensor carries image tokens on its batch axis")

    timestep_input, sample_input = _input_index(gm, "timestep"), _input_index(gm, "hidden_states")
    return DiTPlan(
        family=family.name,
        batch=batch,
        num_image_tokens=n_img,
        width=width,
        out_channels=node_shape(end)[2],
        start=start.name,
        end=end.name,
        blocks=_blocks(gm, family),
        attention=tuple(sites),
        side_inputs=tuple(dict.fromkeys(sides)),
        timestep_input=timestep_input,
        sample_input=sample_input,
        timestep_per_sigma=family.timestep_per_sigma,
        weight_input=next((i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))
                           if "_parameters_" in p.name), None),
        condition_inputs=tuple(i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))
                               if not p.name.startswith("l_self_") and i not in (timestep_input, sample_input)),
        layouts={n.name: i for n, i in infos.items()},
    )
