"""Analysis: recognise a diffusers DiT in a Dynamo graph and describe it as a DiTPlan.

Reads: the Dynamo graph of a whole ``transformer.forward`` (``nn_module_stack`` and
``example_value``/``val`` metadata, placeholder names); for a family whose token stream
may carry context tokens marked by position ids (``Family.context_ids``), the
compile-time example of that one input (:func:`~specdiff_fx.graph_utils.example_value`).
Writes: ``node.meta["specdiff"]`` (the node's :class:`~specdiff_fx.layout.NodeLayout`) on
the graph it analyses; returns a frozen :class:`~specdiff_fx.plan.DiTPlan`, with the
layouts traced a second time from the image stream *and* the family's text input
(``Family.text_input``) for text subsets (``DiTPlan.text_layouts``, or
``text_subset_error`` saying why the graph has none).
Keeps true: the graph's nodes and edges are untouched.
Raises :class:`NotADiT` with a readable reason for anything it does not recognise.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..families import FAMILIES, Family, family_for_block_types
from ..graph_utils import MODULE_STATE_PREFIXES, example_value, get_operand, is_parameter_input, module_paths
from ..layout import Layout, LayoutError, Seg, node_shape, node_value, op_name, propagate_layouts, sdpa_args
from ..plan import AttentionSite, Block, DiTPlan, stream_segments


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


def _last_node_of(gm: fx.GraphModule, path: str, rank: int | None = 3) -> fx.Node | None:
    """The last non-placeholder node produced inside module ``path`` that is a tensor (of
    rank ``rank``, unless ``None``)."""
    found = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if any(p == path for p, _ in module_paths(node)):
            shape = node_shape(node)
            if shape is not None and (rank is None or len(shape) == rank):
                found = node
    return found


#: ops that only rearrange a tensor (no arithmetic): a patch embedding's output may pass
#: through them before it is the ``[B, N, D]`` token stream
_REARRANGE = {"flatten", "transpose", "permute", "view", "reshape", "contiguous", "movedim"}


def _state_inputs(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """The module-state inputs, in the two kinds the runtime stamps (``DiTPlan.state_tensors``,
    ``DiTPlan.state_values``), read off each placeholder's example value: a number, or a
    one-element tensor on the CPU, is read by value; any other tensor by storage and version."""
    tensors, values = [], []
    for i, p in enumerate(gm.graph.find_nodes(op="placeholder")):
        if not p.name.startswith(MODULE_STATE_PREFIXES):
            continue
        val = node_value(p)
        by_value = not isinstance(val, torch.Tensor) or (val.numel() == 1 and val.device.type == "cpu")
        (values if by_value else tensors).append(i)
    return {"state_tensors": tuple(tensors), "state_values": tuple(values)}


def _stream_start(gm: fx.GraphModule, path: str) -> fx.Node | None:
    """Where the image-token stream starts: the output of the embedding module ``path`` if
    it is already ``[B, N, D]``, else (a convolutional patch embedding, e.g. Wan's
    ``Conv3d`` giving ``[B, D, F, H, W]``) the last 3-d tensor of the chain of rearranging
    ops (``flatten(2).transpose(1, 2)``) that its output alone feeds."""
    node = _last_node_of(gm, path, rank=None)
    if node is None or len(node_shape(node)) == 3:
        return node
    found = None
    while len(node.users) == 1:
        node = next(iter(node.users))
        if op_name(node) not in _REARRANGE or node_shape(node) is None:
            break
        if len(node_shape(node)) == 3:
            found = node
    return found


def _gap_hint(gm: fx.GraphModule, nodes: list[fx.Node], first: int, last: int) -> str:
    """What lies between a block's nodes, for the reason of a fallback: the calls outside any
    module (diffusers' ``_native_*`` attention backends wrap each attention in
    ``torch.nn.attention._sdpa_kernel`` calls, which Dynamo records without a module stack)."""
    inside = set(nodes)
    gap = [n for n in list(gm.graph.nodes)[first:last + 1] if n not in inside]
    targets = sorted({getattr(n.target, "__name__", str(n.target)) for n in gap if n.op == "call_function"})
    if not targets:
        return ""
    hint = f" (between them, calls outside the block: {', '.join(targets[:4])}"
    if "_sdpa_kernel" in targets:
        hint += ("; diffusers' _native_* attention backends add these: the default attention backend, "
                 "set_attention_backend(\"native\"), is supported")
    return hint + ")"


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
            raise NotADiT(f"block {path} is not one contiguous run of graph nodes" + _gap_hint(gm, nodes, first, last))
        blocks.append(Block(path, kinds[path], nodes[0].name, nodes[-1].name, len(nodes)))
    return tuple(blocks)


def _input_index(gm: fx.GraphModule, *names: str) -> int:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for i, node in enumerate(placeholders):
        low = node.name.lower()
        if any(low in (f"l_kwargs_{n}_", f"l_{n}_") for n in names):
            return i
    positional = any(node.name.lower().startswith("l_args_") for node in placeholders)
    hint = ("; the transformer was called with positional arguments, which its graph does not name: pass "
            "its inputs as keywords (hidden_states=..., timestep=..., as diffusers' pipelines do)") if positional else ""
    raise NotADiT(f"no graph input named {' or '.join(names)}{hint}")


def _stream_layout(gm: fx.GraphModule, family: Family, n_stream: int,
                   parallel: tuple[str, int, int] | None) -> tuple[Layout, tuple[int, int] | None]:
    """The segments of the token stream: all image tokens, unless the family marks context
    tokens by their position ids (``Family.context_ids``: FLUX.2's reference images carry a
    nonzero time coordinate). Position ids are data, not graph structure, so they are read
    from the input's compile-time example; returns the layout and ``(input index, column)``
    for the per-call check (:meth:`DiTPlan.stream_matches`)."""
    if family.context_ids is None:
        return Layout(1, (Seg("img", n_stream),)), None
    name, column = family.context_ids
    i = _input_index(gm, name)
    ids = example_value(list(gm.graph.find_nodes(op="placeholder"))[i])
    if ids is not None and parallel is not None:  # the graph input is whole: this rank's rows
        ids = ids.chunk(parallel[1], dim=-2)[parallel[2]]
    if ids is None:
        raise NotADiT(f"{family.model_class}: cannot read the values of {name} (needed to tell reference-image "
                      "tokens from image tokens)")
    segs = stream_segments(ids, column)
    if sum(seg.length for seg in segs) != n_stream:
        raise NotADiT(f"{family.model_class}: {name} has {sum(seg.length for seg in segs)} rows for "
                      f"{n_stream} stream tokens")
    if sum(seg.kind == "img" for seg in segs) != 1:
        raise NotADiT(f"{family.model_class}: the image tokens (zero {name}[..., {column}]) are not one contiguous run")
    return Layout(1, segs), (i, column)


def _text_layouts(gm: fx.GraphModule, family: Family, start: fx.Node, end: fx.Node, n_img: int, stream: Layout,
                  sites: list[AttentionSite], parallel) -> dict:
    """The text-subset facts of the plan (``text_start``, ``num_text_tokens``,
    ``text_layouts``, ``text_subset_error``): the layouts traced from the image stream's start
    *and* the family's text input. A text subset is exact when every text token passes per-token
    ops only until an attention with image keys (whose K/V caches then cover the text), every
    text token joined to the image tokens comes from the text input, and every layout holds
    at most one text segment, of all ``M`` text tokens (so text positions in the concatenated
    text order are positions in that segment)."""
    def refuse(why: str) -> dict:
        return {"text_subset_error": why}

    if family.text_input is None:
        return refuse(f"{family.model_class} names no text input")
    if len(stream.segs) > 1:
        return refuse("context tokens in the image stream (reference images) are not supported with a text subset")
    if parallel is not None:
        return refuse("context parallelism")
    try:
        text = list(gm.graph.find_nodes(op="placeholder"))[_input_index(gm, family.text_input)]
    except NotADiT as e:
        return refuse(str(e))
    shape = node_shape(text)
    if shape is None or len(shape) != 3:
        return refuse(f"text input {text.name} is not [B, M, C]")
    m = shape[1]
    try:
        infos = propagate_layouts(gm.graph, start, end, n_img, stream, text=text)
    except LayoutError as e:
        return refuse(str(e))
    except Exception as e:  # noqa: BLE001 - an optional feature: never let it break the analysis
        return refuse(f"tracing the text tokens failed: {type(e).__name__}: {e}")
    image_sites = {site.node for site in sites}
    for node, info in infos.items():
        for lay in (info.layout, *(info.parts or ())):
            texts = [seg.length for seg in lay.segs if seg.kind == "txt"] if lay is not None else []
            if texts not in ([], [m]):
                return refuse(f"node {node.name}: text segments {texts} besides the {m} text tokens")
        if op_name(node) == "sdpa" and node.name not in image_sites:
            return refuse(f"node {node.name}: an attention over text tokens without image keys")
        if info.rewrite[:1] == ("cat",):
            tensors = node.args[0] if node.args else node.kwargs["tensors"]
            if any(tensors[i] not in infos for i in info.rewrite[1]):
                return refuse(f"node {node.name}: joins in text tokens that do not come from the text input")
    return {"text_start": text.name, "num_text_tokens": m, "text_layouts": {n.name: i for n, i in infos.items()}}


def _sample_output(gm: fx.GraphModule, end: fx.Node) -> int:
    """The position, among the graph's outputs, of the first one computed from ``end`` (the model's
    output; Dynamo may return values written back to module attributes before it)."""
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    downstream, todo = set(), [end]
    while todo:
        node = todo.pop()
        if node not in downstream:
            downstream.add(node)
            todo.extend(node.users)
    i = next((i for i, value in enumerate(outputs) if isinstance(value, fx.Node) and value in downstream), None)
    if i is None:
        raise NotADiT(f"no graph output is computed from the output projection ({end.name})")
    return i


def _condition_inputs(gm: fx.GraphModule, per_step: tuple[int, ...], token_operands: set[str]) -> tuple[int, ...]:
    """The graph inputs that stay fixed through a generation and tell interleaved ones apart
    (prompt embeddings, pooled projections, guidance, ids): every input but the latent and the
    timestep (``per_step``), the module state, those the graph never reads, and those that carry
    image tokens into the stream (``token_operands``, gathered with a token subset: ControlNet
    residuals, which a pipeline computes from the latent at every step, like the latent itself)."""
    return tuple(i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))
                 if not p.name.startswith(MODULE_STATE_PREFIXES) and i not in per_step
                 and p.users and p.name not in token_operands)


def _moving(gm: fx.GraphModule, sample_input: int, sample_output: int) -> tuple[int, int] | None:
    """Where the latent input is wider than the model's output on exactly one axis, that axis and
    the output's length on it: the leading part of the input the sampler moves (the model returns
    its velocity); the rest is conditioning concatenated to it. None otherwise."""
    latent = node_shape(list(gm.graph.find_nodes(op="placeholder"))[sample_input])
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    out = node_shape(out[sample_output] if isinstance(out, (tuple, list)) else out)
    if latent is None or out is None or len(latent) != len(out) or latent == out:
        return None
    axes = [d for d in range(len(latent)) if latent[d] != out[d]]
    if len(axes) != 1 or latent[axes[0]] < out[axes[0]]:
        return None
    return axes[0], out[axes[0]]


def analyze_dit(gm: fx.GraphModule) -> DiTPlan:
    """Find the image-token stream, blocks, attention calls and side inputs of a DiT graph."""
    modules = {path_cls for node in gm.graph.nodes for path_cls in module_paths(node)}
    family = family_for_block_types({cls for _, cls in modules})
    if family is None:
        raise NotADiT(
            "no supported DiT found: the graph has none of the transformer blocks of "
            + ", ".join(f.model_class for f in FAMILIES)
        )
    nested = sorted(p for p, cls in modules if p and cls == family.model_class)
    if nested:  # the compiled root is not on module stacks; the DiT is a submodule of what was compiled
        raise NotADiT(
            f"{family.model_class} is a submodule ({nested[0]!r}) of the compiled module: specdiff rewrites a DiT "
            f"compiled as itself, e.g. pipe.transformer = torch.compile(pipe.transformer, backend=\"specdiff\")"
        )
    if _has_symbolic_shapes(gm):
        raise DynamicShapes(f"{family.model_class} traced with dynamic (symbolic) shapes")
    start = _stream_start(gm, family.embed)
    end = _last_node_of(gm, family.out_proj)
    if start is None or end is None:
        raise NotADiT(f"{family.model_class}: no image-token stream ({family.embed} -> {family.out_proj})")
    batch, n_stream, width = node_shape(start)
    if node_shape(end)[:2] != (batch, n_stream):
        raise NotADiT(f"output projection {end.name} is not [B, L, C] over the {n_stream} stream tokens")
    parallel = gm.meta.get("specdiff_parallel")
    stream, context_ids = _stream_layout(gm, family, n_stream, parallel)
    if parallel is not None and len(stream.segs) > 1:
        raise NotADiT(f"{family.model_class}: context tokens in the image stream (reference images) under context "
                      "parallelism are not supported")
    n_img = next(seg.length for seg in stream.segs if seg.kind == "img")
    try:
        infos = propagate_layouts(gm.graph, start, end, n_img, stream)
    except LayoutError as e:
        raise NotADiT(f"{family.model_class}: {e}") from e
    if infos[end].layout != stream:
        raise NotADiT(f"output projection {end.name} does not carry the stream's tokens in their order")

    sites, cross, sides = [], [], []
    for node, info in infos.items():
        node.meta["specdiff"] = info
        for path, layout in info.gathers:
            if layout.has_img:  # text-only operands are gathered (to nothing) only with context caching
                sides.append(get_operand(node, path).name)
        if op_name(node) == "sdpa":
            args = sdpa_args(node)
            _, heads, _, head_dim = node_shape(args["query"])
            block = next((p for p, _ in module_paths(node) if p.count(".") == 1), "")
            if args["key"] in infos:  # the site's layout is its keys' (the queries may lack context tokens)
                sites.append(AttentionSite(node.name, block, infos[args["key"]].layout, heads, head_dim,
                                           args.get("scale")))
            else:  # keys without image tokens (cross-attention to text): no K/V cache, no score
                cross.append(AttentionSite(node.name, block, info.layout, heads, head_dim, args.get("scale")))
    if not sites:
        raise NotADiT(f"{family.model_class}: no attention over image tokens found")
    for info in infos.values():
        lay = info.layout
        if lay is not None and lay.axis == 0:
            raise NotADiT("a tensor carries image tokens on its batch axis")

    timestep_input, sample_input = _input_index(gm, "timestep"), _input_index(gm, "hidden_states")
    sample_output = _sample_output(gm, end)
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
        cross_attention=tuple(cross),
        side_inputs=tuple(dict.fromkeys(sides)),
        timestep_input=timestep_input,
        sample_input=sample_input,
        timestep_per_sigma=family.timestep_per_sigma,
        sample_output=sample_output,
        moving=_moving(gm, sample_input, sample_output),
        weight_input=next((i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))
                           if is_parameter_input(p)), None),
        condition_inputs=_condition_inputs(gm, (timestep_input, sample_input), set(sides)),
        **_state_inputs(gm),
        layouts={n.name: i for n, i in infos.items()},
        stream=stream if len(stream.segs) > 1 else None,
        context_ids=context_ids,
        parallel=parallel,
        **_text_layouts(gm, family, start, end, n_img, stream, sites, parallel),
    )
